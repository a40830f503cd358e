"""End to end: `rm` learns a synthetic preference, normalizes, exports; `score` and RewardScorer read it back."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from instruct_jax.checkpoint import CheckpointManager, export_params
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.data.config import DataConfig
from instruct_jax.inference.scorer import RewardScorer, score_batch_size, score_token_sequences
from instruct_jax.train.lm.build import build_lm
from instruct_jax.train.rm.ranking import IDENTITY_NORM
from instruct_jax.train.rm.trainer import build_rm, build_rm_data, fresh_state, reference_sequences

EXPERIMENT = str(REPO / "experiments" / "tiny_rm.py")
OVERRIDES = ["train.steps=60", "train.eval_every=30", "reward.synthetic=1000", "reward.normalize_std=true",
             "reward.reference_max_examples=200", "logging.progress_bar=false", "logging.tensorboard=false",
             "logging.peak_flops_per_device=1e9", "checkpoint.every_steps=30"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def config():
    return apply_overrides(load_experiment(EXPERIMENT), list(OVERRIDES))


def cli(command, workdir, *extra):
    cmd = [sys.executable, "-m", "instruct_jax", command, "--experiment", EXPERIMENT, "--workdir", str(workdir),
           "--set", *OVERRIDES, *extra]
    result = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-rm")
    cli("rm", workdir)
    return workdir


def test_rm_learns_a_synthetic_preference_and_logs_evaluations(trained):
    rows = [json.loads(line) for line in open(trained / "metrics.jsonl")]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [30, 60] and rows[-1]["step"] == 60
    final = json.load(open(trained / "eval.json"))
    assert final["eval_accuracy"] >= 0.9, final
    assert final["eval_accuracy_ci_low"] < final["eval_accuracy"] < final["eval_accuracy_ci_high"]
    assert final["eval_pairs"] > 300 and final["eval_length_balanced_accuracy"] >= 0.85
    assert final["data"]["eval"]["rows"] + final["data"]["train"]["rows"] == 1000


def test_normalization_is_stored_everywhere_and_centres_the_reference_set(trained):
    cfg = config()
    norm = json.load(open(trained / "reward_norm.json"))
    assert CheckpointManager(trained / "checkpoints", every_steps=0, keep=1).latest_step() == 60
    meta = json.load(open(trained / "checkpoints" / "60" / "meta" / "metadata"))  # the final checkpoint's meta
    assert meta["norm"] == pytest.approx(norm)
    scorer = RewardScorer(cfg, str(trained))
    assert scorer.norm == pytest.approx(norm) and norm["gain"] != 1.0 and norm["bias"] != 0.0
    # Score the reference set again through the export: mean 0 and (normalize_std) std 1.
    data = build_rm_data(cfg, str(trained))
    refs = reference_sequences(cfg, data)
    kwargs = dict(seq_len=cfg.train.seq_len, batch_size=score_batch_size(cfg, scorer.mesh),
                  mesh=scorer.mesh, rules=scorer.rules)
    scores = score_token_sequences(scorer.score_step, scorer.params, scorer.norm, refs, **kwargs)
    assert len(scores) == 200 and abs(scores.mean()) < 1e-4 and scores.std() == pytest.approx(1.0, rel=1e-4)
    raw = score_token_sequences(scorer.score_step, scorer.params, IDENTITY_NORM, refs, **kwargs)
    np.testing.assert_allclose(scores, raw * norm["gain"] + norm["bias"], rtol=1e-5, atol=1e-5)
    # The Python API on strings: the rule's better answer scores higher.
    good, bad = scorer.score([("Say something.", "good sweet day and the sea"),
                              ("Say something.", "bad foul day and the sea")])
    assert good > bad


def test_score_cli_matches_the_python_api(trained, tmp_path):
    rows = [{"prompt": "Describe the weather.", "response": "good kind rain and the wind"},
            {"prompt": [{"role": "user", "content": "Describe the weather."}], "response": "vile sad rain of it day"},
            {"prompt": "\n\nHuman: Say something.\n\nAssistant:", "response": "the sea is cold and it"},
            {"prompt": "Describe the weather. " * 20, "response": "good kind rain"}]  # longer than train.seq_len=48
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = cli("score", trained, "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"))
    out = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert [{k: v for k, v in r.items() if k not in ("score", "truncated")} for r in out] == rows
    # The cut prompt is counted, not silent: a field per row and a line on stderr.
    assert [r["truncated"] for r in out] == [False, False, False, True]
    assert "score: 1 of 4 (prompt, response) pairs longer than train.seq_len=48" in proc.stderr
    expected = RewardScorer(config(), str(trained)).score([(r["prompt"], r["response"]) for r in rows])
    np.testing.assert_allclose([r["score"] for r in out], expected, rtol=1e-5, atol=1e-5)


def test_trunk_starts_from_an_lm_export_and_the_head_fresh(tmp_path):
    cfg = config()
    lm = build_lm(cfg)
    lm_params = lm.init_state().params
    export_params(tmp_path / "sft" / "params", lm_params)
    cfg.train.init_from = str(tmp_path / "sft")  # a workdir: its params/ export is used
    setup = build_rm(cfg)
    state = fresh_state(setup)
    assert set(state.params) == {"trunk", "head"}
    expected = {k: v for k, v in jax.device_get(lm_params).items() if k != "lm_head"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["trunk"]), expected)
    head = jax.device_get(state.params["head"])  # fresh: bias 0, kernel ~ N(0, 1 / (d_model + 1))
    assert float(head["bias"]) == 0.0 and 0.5 < float(np.std(head["kernel"])) * np.sqrt(cfg.model.d_model + 1) < 1.5


def test_reference_set_from_demonstrations_or_best_ranked_answers(trained, tmp_path):
    demos = [{"prompt": "Say something.", "response": "good day"}, {"prompt": "Hi", "response": "kind sea"}]
    (tmp_path / "demos.jsonl").write_text("".join(json.dumps(d) + "\n" for d in demos))
    cfg = config()
    cfg.reward.reference = DataConfig(source=str(tmp_path / "demos.jsonl"), format="sft")
    data = build_rm_data(cfg, str(trained))  # the run's tokenizer and template
    expected = [data.template.render([{"role": "user", "content": d["prompt"]},
                                      {"role": "assistant", "content": d["response"]}])[0] for d in demos]
    assert [list(s) for s in reference_sequences(cfg, data)] == expected
    # Comparisons as the reference: their best-ranked answers (both, on a tie at the top).
    ranked = {"prompt": "Hi", "responses": ["good", "bad", "kind"], "ranks": [1, 2, 1]}
    (tmp_path / "ranked.jsonl").write_text(json.dumps(ranked) + "\n")
    cfg.reward.reference = DataConfig(source=str(tmp_path / "ranked.jsonl"), format="ranking")
    answers = [data.tokenizer.decode(s) for s in reference_sequences(cfg, data)]
    assert [a.endswith(w) for a, w in zip(answers, ("good", "kind"))] == [True, True] and len(answers) == 2
