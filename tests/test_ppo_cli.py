"""`python -m instruct_jax ppo` end to end as a subprocess (toy reward, fresh policy): metrics, samples and
exports; and (slow tier) SIGKILL + restart continues bit for bit (states, adaptive KL, prompt stream)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, rerun_on_xla_cpu_deadlock

pytestmark = rerun_on_xla_cpu_deadlock

TIMING_FIELDS = {"step_time"}
REQUIRED = {"step", "score", "kl", "kl_coef", "approx_kl", "clipfrac", "entropy", "explained_variance",
            "logprob_mismatch", "max_ratio", "response_length", "eos_rate", "negative_kl_sequences"}
BASE = ["train.steps=6", "train.init_from=", "train.global_batch_size=16", "checkpoint.every_steps=2",
        "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false", "ppo.synthetic_prompts=64",
        "ppo.response_len=8", "ppo.epochs=2", "ppo.minibatches=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.5",
        "ppo.kl_horizon=100", "ppo.ema_decay=0.9", "ppo.tf_adam_eps=true"]


def cli(workdir, *overrides, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "instruct_jax", "ppo", "--experiment", str(REPO / "experiments" / "tiny_ppo.py:toy"),
           "--workdir", str(workdir), "--set", *BASE, *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def rows(workdir, name="metrics.jsonl"):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in open(os.path.join(workdir, name))]


def exported(workdir, name):
    """Every array of a params export, as numpy, by path (read without building the model)."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(os.path.join(workdir, name))
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ppo_uninterrupted")
    result = cli(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


def test_ppo_command_writes_metrics_samples_and_exports(uninterrupted):
    metrics = rows(uninterrupted)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert REQUIRED <= set(metrics[0]), REQUIRED - set(metrics[0])
    assert metrics[0]["kl"] == 0.0  # the first rollout's policy is the reference
    assert all(abs(r["approx_kl_first"]) < 1e-10 for r in metrics)
    assert all(r["logprob_mismatch"] < 1e-4 for r in metrics)
    # the adaptive controller moved beta, and each row's kl_coef is the previous row's kl_coef_next
    assert metrics[-1]["kl_coef"] != metrics[0]["kl_coef"]
    assert all(b["kl_coef"] == a["kl_coef_next"] for a, b in zip(metrics, metrics[1:]))
    samples = rows(uninterrupted, "samples.jsonl")
    assert len(samples) == 2 * 6 and {"prompt", "response", "score", "length"} <= set(samples[0])
    for name in ("params", "ema_params", "value_params"):
        assert os.path.isfile(os.path.join(uninterrupted, name, "MANIFEST.json"))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3])
def test_sigkill_and_restart_is_bitwise_identical(uninterrupted, tmp_path, kill_at):
    # Synchronous saves: the checkpoint of iteration 2 is complete when iteration 3 ends and the process dies.
    killed = cli(tmp_path, "checkpoint.async_save=false", env_extra={"INSTRUCT_JAX_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode != 0
    assert os.path.exists(tmp_path / "metrics.jsonl"), killed.stdout + killed.stderr
    assert len(rows(tmp_path)) == kill_at, killed.stdout + killed.stderr
    resumed = cli(tmp_path, "checkpoint.async_save=false")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint at iteration 2" in resumed.stdout
    assert rows(tmp_path) == rows(uninterrupted)
    assert rows(tmp_path, "samples.jsonl") == rows(uninterrupted, "samples.jsonl")
    for name in ("params", "ema_params", "value_params"):
        a, b = exported(tmp_path, name), exported(uninterrupted, name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}{k}")


RLOO = ["ppo.algorithm=rloo", "ppo.group_size=4", "train.global_batch_size=32"]  # 8 prompts x 4 samples


@pytest.mark.slow
def test_rloo_command_has_no_value_model_and_resumes_bitwise_after_sigkill(tmp_path):
    """The critic-free variant on the same loop: no value model exported, and a SIGKILL after iteration 3 resumed
    from the checkpoint of iteration 2 gives every metrics row, sample and export of the uninterrupted run."""
    whole, killed_dir = tmp_path / "whole", tmp_path / "killed"
    result = cli(whole, *RLOO, "checkpoint.async_save=false")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = rows(whole)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert "value_loss" not in metrics[0] and "group_reward_std" in metrics[0]
    assert all(r["logprob_mismatch"] < 1e-4 for r in metrics)
    assert not os.path.exists(whole / "value_params")
    killed = cli(killed_dir, *RLOO, "checkpoint.async_save=false", env_extra={"INSTRUCT_JAX_KILL_AT_STEP": "3"})
    assert killed.returncode != 0 and len(rows(killed_dir)) == 3, killed.stdout + killed.stderr
    resumed = cli(killed_dir, *RLOO, "checkpoint.async_save=false")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint at iteration 2" in resumed.stdout
    assert rows(killed_dir) == metrics
    assert rows(killed_dir, "samples.jsonl") == rows(whole, "samples.jsonl")
    for name in ("params", "ema_params"):
        a, b = exported(killed_dir, name), exported(whole, name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}{k}")
