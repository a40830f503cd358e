"""End to end through the CLI, as subprocesses: SIGKILL + restart is bitwise identical; SIGTERM saves and exits."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from instruct_jax.checkpoint import MANIFEST_NAME

TIMING_FIELDS = {"tokens_per_sec", "mfu", "step_time"}
BASE = ["train.steps=12", "checkpoint.every_steps=4", "checkpoint.async_save=false", "logging.log_every=1", "train.eval_every=6",
        "logging.progress_bar=false", "logging.peak_flops_per_device=1e9", "train.seq_len=64",
        "model.max_seq_len=64"]


def cli(workdir, *overrides, env_extra=None, wait=True):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           **(env_extra or {})}
    cmd = [sys.executable, "-m", "instruct_jax", "sft", "--experiment", str(REPO / "experiments" / "tiny_cpu.py") + ":sft",
           "--workdir", str(workdir), "--set", *BASE, *overrides]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def metrics(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def final_params(workdir):
    import jax

    from instruct_jax.checkpoint import load_params
    from instruct_jax.config import load_experiment, apply_overrides
    from instruct_jax.parallel.mesh import make_mesh
    from instruct_jax.train.lm.build import abstract_lm_state

    cfg = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_cpu.py") + ":sft"), BASE)
    abstract, _ = abstract_lm_state(cfg, make_mesh(cfg.mesh))
    return jax.device_get(load_params(os.path.join(workdir, "params"), abstract.params))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = cli(workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    return workdir


@pytest.mark.parametrize("kill_at", [6, 9])
def test_sigkill_and_restart_is_bitwise_identical(uninterrupted, tmp_path, kill_at):
    killed = cli(tmp_path, env_extra={"INSTRUCT_JAX_KILL_AT_STEP": str(kill_at)})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    resumed = cli(tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from checkpoint at step" in resumed.stdout
    assert metrics(tmp_path) == metrics(uninterrupted)
    want, got = final_params(uninterrupted), final_params(tmp_path)
    import jax

    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = cli(tmp_path, "train.steps=100000", "checkpoint.every_steps=0", wait=False)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "preemption signal received: saved checkpoint at step" in out
    step = int(out.split("saved checkpoint at step ")[1].split(",")[0])
    assert os.path.isdir(tmp_path / "checkpoints" / str(step))
    assert os.path.isfile(tmp_path / "checkpoints" / str(step) / MANIFEST_NAME)  # complete, verified on restore
    # A restart resumes from it.
    resumed = cli(tmp_path, f"train.steps={step + 2}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from checkpoint at step {step}" in resumed.stdout


def test_plateau_counts_evaluations_without_improvement():
    from instruct_jax.train.lm.trainer import Plateau

    p = Plateau(patience=2, min_delta=0.05, meta={})
    seen = []
    for loss in [3.0, 2.0, 1.97, 2.5, 1.5, 1.6, 1.49]:
        p.update(loss)
        seen.append((p.evals_since_best, p.reached))
    # 1.97 is not 0.05 better than 2.0; 1.49 is not 0.05 better than 1.5
    assert seen == [(0, False), (0, False), (1, False), (2, True), (0, False), (1, False), (2, True)]
    resumed = Plateau(2, 0.05, p.meta())
    assert (resumed.best, resumed.evals_since_best, resumed.reached) == (1.5, 2, True)
    assert not Plateau(0, 0.0, {"evals_without_improvement": 9}).reached  # patience 0 = off


def test_early_stop_ends_at_the_plateau_and_survives_a_restart(tmp_path):
    # min_delta 100 makes every evaluation after the first a non-improvement: evals at 3 and 6 -> stop at 6.
    stop = ["train.eval_every=3", "train.early_stop_patience=1", "train.early_stop_min_delta=100"]
    straight = cli(tmp_path / "straight", *stop)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "early stop at step 6" in straight.stdout
    rows = metrics(tmp_path / "straight")
    assert rows[-1]["step"] == 6 and rows[-1]["evals_without_improvement"] == 1
    assert os.path.isfile(os.path.join(tmp_path / "straight", "params", MANIFEST_NAME))
    again = cli(tmp_path / "straight", *stop)  # started again after it stopped: nothing more to do
    assert again.returncode == 0 and "resumed from checkpoint at step 6" in again.stdout, again.stdout + again.stderr
    assert metrics(tmp_path / "straight") == rows
    # Killed after step 4 (checkpoint at 4 carries the plateau state), restarted: the same stop, the same rows.
    killed = cli(tmp_path / "killed", *stop, env_extra={"INSTRUCT_JAX_KILL_AT_STEP": "4"})
    assert killed.returncode != 0
    resumed = cli(tmp_path / "killed", *stop)
    assert resumed.returncode == 0 and "early stop at step 6" in resumed.stdout, resumed.stdout + resumed.stderr
    assert metrics(tmp_path / "killed") == rows
    np.testing.assert_equal(final_params(tmp_path / "killed"), final_params(tmp_path / "straight"))
