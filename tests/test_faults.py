"""Fault injection across every stage, through the real CLI as subprocesses.

Each stage (pretrain, SFT, reward model, PPO) runs once uninterrupted, and once SIGKILLed at three
seeded random steps in succession (kill at k1, restart, kill at k2, restart, kill at k3, restart to
the end). The interrupted run must end with bitwise the same metrics rows (timing columns aside),
params exports and, for PPO, sampled responses, KL-controller coefficients and ptx losses (so the
rollout rng, the controller state and the ptx iterator resumed exactly). Pretraining writes its
checkpoints asynchronously, so a kill right after a save can also leave the newest checkpoint
without its manifest: the restart must then fall back to the one before. The pipeline is killed
inside SFT after pretraining finished, twice, and must end with the same stage outputs and report.

Corruption: the three newest complete checkpoints of a killed pretraining run are damaged three ways
(truncated file, flipped bytes, deleted shard); the restart falls back to the fourth, moves the three
aside with their reasons, and still ends bitwise equal to the uninterrupted run.

All runs share one persistent compilation cache, so restarts don't recompile. Each test writes its
kill points and outcomes to $INSTRUCT_JAX_FAULTS_REPORT/<test>.json when that variable is set
(docs/RELIABILITY.md quotes them).
"""

import json
import os
import random
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from conftest import REPO, DATA_DIR
from test_multihost_rl import exported  # noqa: E402  (reads a params export as numpy, no model needed)

KILL_ENV = "INSTRUCT_JAX_KILL_AT_STEP"
CACHE = os.path.join(tempfile.gettempdir(), "instruct_jax_faults_jax_cache")
TIMING = {"tokens_per_sec", "mfu", "step_time"}
COMMON = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.log_every=1",
          "logging.peak_flops_per_device=1e9", "checkpoint.every_steps=2", "checkpoint.keep=4"]
SHAKESPEARE = str(DATA_DIR / "tinyshakespeare.txt")

# SFT, reward model and PPO save synchronously, so each restart resumes from the last save before its
# kill; pretraining saves asynchronously (the default), where a kill can also beat the newest manifest.
STAGES = {
    # name: (command, experiment, overrides, steps, exports)
    "pretrain": ("pretrain", "tiny_cpu.py:pretrain",
                 ["data.max_rows=1500", "train.seq_len=64", "model.max_seq_len=64", "train.eval_every=5",
                  "train.global_batch_size=8"], 10, ("params",)),
    "sft": ("sft", "tiny_cpu.py:sft",
            ["checkpoint.async_save=false", "train.seq_len=128", "model.max_seq_len=128", "train.eval_every=4", "train.global_batch_size=8"],
            6, ("params",)),
    "rm": ("rm", "tiny_rm.py", ["checkpoint.async_save=false", "reward.synthetic=160", "train.eval_every=4", "train.global_batch_size=8"],
           6, ("params",)),
    "ppo": ("ppo", "tiny_ppo.py:toy",
            ["checkpoint.async_save=false", "train.init_from=", "train.global_batch_size=16", "ppo.synthetic_prompts=64", "ppo.response_len=8",
             "ppo.epochs=2", "ppo.minibatches=2", "ppo.adaptive_kl=true", "ppo.kl_target=0.2",
             "ppo.kl_horizon=100", "ppo.ema_decay=0.9", "ppo.log_samples=16", "ppo.missing_eos=replace",
             "ppo.ptx_coef=0.5", f"ppo.ptx.source={SHAKESPEARE}", "ppo.ptx.max_rows=400", "ppo.ptx_batch_size=8"],
            4, ("params", "value_params", "ema_params")),
}


def kill_points(stage: str, steps: int) -> list[int]:
    """Three distinct steps in [1, steps), seeded by the stage name (stable across runs and machines)."""
    return sorted(random.Random(f"faults-{stage}").sample(range(1, steps), 3))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny experiments' tokenizer (sentencepiece, 1024 pieces, tinyshakespeare), trained once for all runs."""
    from instruct_jax.data.tokenizer import train_sentencepiece

    prefix = tmp_path_factory.mktemp("tokenizer") / "spm"
    train_sentencepiece([SHAKESPEARE], str(prefix), vocab_size=1024)
    return f"{prefix}.model"


def cli(stage: str, workdir, tokenizer: str, *extra, kill_at=None):
    command, experiment, overrides, steps, _ = STAGES[stage]
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_CACHE_DIR": CACHE}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    cmd = [sys.executable, "-m", "instruct_jax", command, "--experiment", str(REPO / "experiments" / experiment),
           "--workdir", str(workdir), "--set", *COMMON, f"data.tokenizer={tokenizer}", f"train.steps={steps}",
           *overrides, *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def jsonl(path, drop=TIMING):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in open(path)]


def assert_same_run(stage: str, got, want):
    """Bitwise: metrics rows (timings aside), every export, and PPO's samples."""
    assert jsonl(got / "metrics.jsonl") == jsonl(want / "metrics.jsonl")
    for name in STAGES[stage][4]:
        a, b = exported(got / name), exported(want / name)
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}{k}")
    if stage == "ppo":
        assert jsonl(got / "samples.jsonl") == jsonl(want / "samples.jsonl")
    if stage == "rm":
        assert json.load(open(got / "reward_norm.json")) == json.load(open(want / "reward_norm.json"))


def report(name: str, summary: dict) -> None:
    folder = os.environ.get("INSTRUCT_JAX_FAULTS_REPORT")
    if folder:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(summary, f, indent=1)


def resumed_from(stdout: str) -> int:
    """The step a (re)started run resumed from; 0 when it found no checkpoint and started afresh."""
    marker = "resumed from checkpoint at "
    return int(stdout.split(marker)[1].split()[1]) if marker in stdout else 0


def ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def kill_and_restart(stage: str, workdir, tokenizer: str) -> list[dict]:
    """Kill at each seeded point in turn, restarting after each; run to the end. Returns what happened."""
    events = []
    for k in kill_points(stage, STAGES[stage][3]):
        killed = cli(stage, workdir, tokenizer, kill_at=k)
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-5000:]
        events.append({"killed_after_step": k})
        if len(events) > 1:
            events[-2]["restart_resumed_from"] = resumed_from(killed.stdout)
    final = ok(cli(stage, workdir, tokenizer))
    events[-1]["restart_resumed_from"] = resumed_from(final.stdout)
    return events


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_at_three_points_and_restart_is_bitwise_identical(stage, tmp_path, tokenizer):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    ok(cli(stage, straight, tokenizer))
    events = kill_and_restart(stage, interrupted, tokenizer)
    assert_same_run(stage, interrupted, straight)
    for e in events:  # synchronous saves: the restart resumes from the last save before the kill
        assert e["restart_resumed_from"] == e["killed_after_step"] // 2 * 2, events
    report(f"kill_{stage}", {"stage": stage, "steps": STAGES[stage][3], "kills": events, "bitwise_equal": True})


def largest_file(folder):
    files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = largest_file(step_dir / "state")
    os.truncate(path, os.path.getsize(path) // 2)
    return "truncated"


def flip_bytes(step_dir):
    path = largest_file(step_dir / "state")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return "sha256"


def delete_shard(step_dir):
    os.remove(largest_file(step_dir / "state"))
    return "missing"


@pytest.mark.slow
def test_pretrain_kills_and_three_corrupt_checkpoints_fall_back_and_match(tmp_path, tokenizer):
    """Pretraining: the three kills, then a run killed at step 8 with its newest three checkpoints
    damaged (truncated / flipped / deleted shard): the restart resumes from step 2."""
    straight, interrupted, corrupted = tmp_path / "straight", tmp_path / "interrupted", tmp_path / "corrupted"
    ok(cli("pretrain", straight, tokenizer))
    events = kill_and_restart("pretrain", interrupted, tokenizer)
    assert_same_run("pretrain", interrupted, straight)
    for e in events:  # asynchronous saves: a kill right after one can beat its manifest (then the one before)
        assert e["killed_after_step"] - 4 <= e["restart_resumed_from"] <= e["killed_after_step"], events

    killed = cli("pretrain", corrupted, tokenizer, "checkpoint.async_save=false", kill_at=8)
    assert killed.returncode == -signal.SIGKILL
    ckpts = corrupted / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ckpts) if p.isdigit()) == [2, 4, 6, 8]
    damage = {8: truncate, 6: flip_bytes, 4: delete_shard}
    expected = {step: fn(ckpts / str(step)) for step, fn in damage.items()}
    resumed = ok(cli("pretrain", corrupted, tokenizer))
    assert resumed_from(resumed.stdout) == 2
    assert_same_run("pretrain", corrupted, straight)
    aside = {int(name.split("-")[0]): (ckpts / "corrupt" / name / "REASON.txt").read_text()
             for name in os.listdir(ckpts / "corrupt")}
    assert aside.keys() == expected.keys()
    for step, word in expected.items():
        assert word in aside[step], (step, aside[step])
    report("kill_pretrain", {"stage": "pretrain", "steps": STAGES["pretrain"][3], "kills": events,
                             "bitwise_equal": True})
    report("corruption", {"stage": "pretrain", "killed_after_step": 8,
                          "damaged": {str(s): fn.__name__ for s, fn in damage.items()},
                          "reasons": {str(s): r.strip() for s, r in aside.items()}, "resumed_from": 2,
                          "bitwise_equal": True})


# ----------------------------------------------------------------------------- the pipeline
# tiny_cpu.py:ci shrunk: pretrain 2 steps, SFT 4, reward model 2, PPO 2, checkpoints every 2 steps.
# KILL_AT_STEP=3 is reached first by SFT (pretrain has only 2 steps): the pipeline dies inside SFT,
# after pretrain finished; KILL_AT_STEP=4 kills the restarted SFT again after its last step (before
# its export and DONE marker); the third run finishes everything.
PIPELINE = ["pipeline.pretrain.steps=2", "pipeline.sft.steps=4", "pipeline.rm.steps=2", "pipeline.ppo.steps=2",
            "checkpoint.every_steps=2", "logging.progress_bar=false", "logging.tensorboard=false"]


def pipeline(workdir, kill_at=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "JAX_CACHE_DIR": CACHE}
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = str(kill_at)
    cmd = [sys.executable, "-m", "instruct_jax", "pipeline", "--experiment",
           str(REPO / "experiments" / "tiny_cpu.py:ci"), "--workdir", str(workdir), "--set", *PIPELINE]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)


def without_seconds(tree):
    """The report without its wall times: "seconds" and the wall-time check (its value is the seconds)."""
    if isinstance(tree, dict):
        return {k: without_seconds(v) for k, v in tree.items() if k not in ("seconds", "wall_time")}
    return tree


@pytest.mark.slow
def test_pipeline_killed_within_and_between_stages_resumes_to_the_same_result(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    ok(pipeline(straight))
    events = []
    for k in (3, 4):
        killed = pipeline(interrupted, kill_at=k)
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-5000:]
        events.append({"killed_after_step": k, "stage": "sft",
                       "stages_done_before": sorted(s for s in os.listdir(interrupted)
                                                    if (interrupted / s / "DONE.json").is_file())})
    final = ok(pipeline(interrupted))
    assert "[pretrain] finished earlier: skipped" in final.stdout
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert jsonl(interrupted / stage / "metrics.jsonl") == jsonl(straight / stage / "metrics.jsonl"), stage
        a, b = exported(interrupted / stage / "params"), exported(straight / stage / "params")
        for key in b:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stage}{key}")
    for name in ("label/rankings.jsonl", "eval_samples.jsonl"):
        assert jsonl(interrupted / name) == jsonl(straight / name), name
    assert without_seconds(json.load(open(interrupted / "report.json"))) == \
        without_seconds(json.load(open(straight / "report.json")))
    report("kill_pipeline", {"stage": "pipeline", "kills": events, "bitwise_equal": True})
