"""`rm` killed mid-run and restarted (then re-run once finished) ends with the same metrics and normalization."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TIMING_FIELDS = {"tokens_per_sec", "mfu", "step_time"}
OVERRIDES = ["train.steps=40", "train.eval_every=20", "reward.synthetic=400", "logging.progress_bar=false",
             "logging.tensorboard=false", "logging.log_every=5", "checkpoint.every_steps=10",
             "logging.peak_flops_per_device=1e9"]


def rm(workdir, kill_at=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if kill_at is not None:
        env["INSTRUCT_JAX_KILL_AT_STEP"] = str(kill_at)
    cmd = [sys.executable, "-m", "instruct_jax", "rm", "--experiment", str(REPO / "experiments" / "tiny_rm.py"),
           "--workdir", str(workdir), "--set", *OVERRIDES]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def rows(workdir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in open(workdir / "metrics.jsonl")]


@pytest.mark.slow
def test_killed_restarted_and_rerun_rm_matches_an_uninterrupted_one(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert rm(straight).returncode == 0
    assert rm(interrupted, kill_at=25).returncode != 0  # SIGKILL after step 25; checkpoints at 10, 20
    resumed = rm(interrupted)
    assert resumed.returncode == 0 and "resumed from checkpoint at step 20" in resumed.stdout
    assert rows(interrupted) == rows(straight)
    again = rm(interrupted)  # a finished run, re-run: restores step 40 and rewrites the same final row
    assert again.returncode == 0 and "resumed from checkpoint at step 40" in again.stdout
    assert rows(interrupted) == rows(straight)
    assert json.load(open(interrupted / "reward_norm.json")) == json.load(open(straight / "reward_norm.json"))
