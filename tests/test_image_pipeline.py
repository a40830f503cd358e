"""The image + text pipeline (instruct_jax/instructgpt/image_pipeline.py): the CI-sized run of
experiments/tiny_multimodal_cpu.py:ci goes through every stage (captioning from scratch, SFT, labels, reward model,
PPO, evaluation with the image ablation) through the command line, once per module."""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.errors import ConfigError
from instruct_jax.instructgpt.image_pipeline import POLICIES, STAGES, validate_image_pipeline
from instruct_jax.instructgpt.pipeline import read_jsonl

EXPERIMENT = str(REPO / "experiments" / "tiny_multimodal_cpu.py")


def _cli(args, workdir, timeout=1200):
    env = {**os.environ, "JAX_CACHE_DIR": str(workdir.parent / "jax_cache")}
    return subprocess.run([sys.executable, "-m", "instruct_jax", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("image_pipeline") / "run"
    proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(workdir)], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc.stdout


def test_every_stage_runs_and_the_report_has_the_ablation(ci_run):
    workdir, _ = ci_run
    assert all((workdir / stage / "DONE.json").is_file() for stage in STAGES)
    report = json.loads((workdir / "report.json").read_text())
    assert set(report["gold"]) == set(POLICIES)
    for name, w in report["win_rates"].items():
        assert 0.0 <= w["ci_low"] <= w["win_rate"] <= w["ci_high"] <= 1.0, name
        assert w["wins"] + w["ties"] + w["losses"] == w["prompts"] == 48
    assert set(report["image_ablation"]) == {"sft", "ppo"}
    for name, a in report["image_ablation"].items():
        for kind in ("blank", "shuffled"):
            drop = a[f"drop_{kind}"]
            assert math.isclose(drop["mean"], a["real"] - a[kind], abs_tol=1e-9), (name, kind)
            assert drop["ci_low"] <= drop["mean"] <= drop["ci_high"]
    assert "Image ablation" in (workdir / "report.md").read_text()


def test_task_files_hold_images_the_loaders_read(ci_run):
    """Every row of the task's files names one image per marker, as PNG files beside them; rankings point back
    at the task's images; eval prompts never show a training image."""
    workdir, _ = ci_run
    task = workdir / "task"
    for name in ("captions.jsonl", "demos.jsonl", "label_prompts.jsonl", "ppo_prompts.jsonl", "eval_prompts.jsonl"):
        for row in read_jsonl(str(task / name)):
            text = row["prompt"] if "prompt" in row else " ".join(m["content"] for m in row["messages"])
            assert text.count("<image>") == len(row["images"]) == 1, (name, row)
            assert all((task / p).is_file() for p in row["images"])
    rankings = read_jsonl(str(workdir / "label" / "rankings.jsonl"))
    assert rankings and all((workdir / "label" / r["images"][0]).resolve().is_file() for r in rankings)
    seen = {p for name in ("demos.jsonl", "label_prompts.jsonl", "ppo_prompts.jsonl")
            for row in read_jsonl(str(task / name)) for p in row["images"]}
    shown = {p for row in read_jsonl(str(task / "eval_prompts.jsonl")) for p in row["images"]}
    assert not seen & shown


def test_rerun_skips_finished_stages(ci_run):
    workdir, _ = ci_run
    before = (workdir / "report.json").read_text()
    proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(workdir)], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(f"[{s}] finished earlier: skipped" in proc.stderr + proc.stdout for s in STAGES)
    assert json.loads((workdir / "report.json").read_text()) == json.loads(before)


def test_validation_names_the_field():
    cfg = load_experiment(EXPERIMENT + ":ci")
    validate_image_pipeline(cfg)
    for overrides, field in ((["model.vision.image_size=0"], "model.vision.image_size"),
                             (["model.vision.image_token_id=5"], "model.vision.image_token_id"),
                             (["pipeline.kinds=count,compare"], "model.vision.max_images"),
                             (["pipeline.kinds=count,spell"], "pipeline.kinds"),
                             (["pipeline.caption_demos=0"], "pipeline.caption_demos")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate_image_pipeline(apply_overrides(load_experiment(EXPERIMENT + ":ci"), overrides))
