"""The end-to-end pipeline (instruct_jax/instructgpt/pipeline.py) and its evaluation pieces.

The CI-sized run (experiments/tiny_cpu.py:ci) goes through every stage once per module and is
shared by the tests below.
"""

import collections
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.errors import ConfigError
from instruct_jax.instructgpt.evaluate import best_of_n_pick, kl_k1, repeated_responses, rm_accuracy_breakdown
from instruct_jax.instructgpt.gold import GoldJudge
from instruct_jax.instructgpt.pipeline import METHODS, STAGES, Paths, stage_config, stage_task, validate_pipeline
from instruct_jax.instructgpt.report import CHECKS
from instruct_jax.instructgpt.task import DEMO_TAILS, DEMO_WRAPPERS, ORIGINAL_KINDS, Task, TaskSpec

EXPERIMENT = str(REPO / "experiments" / "tiny_cpu.py")
OPT_IN = tuple(m for m in METHODS if m != "ppo")  # the methods the CI config's pipeline.algorithms leaves out


def _cli(args, workdir, extra_env=None, timeout=900):
    env = {**os.environ, "JAX_CACHE_DIR": str(workdir.parent / "jax_cache"), **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "instruct_jax", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(workdir)], workdir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return workdir, proc.stdout


def _finite(tree) -> bool:
    if isinstance(tree, dict):
        return all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


def test_ci_pipeline_runs_every_stage_with_finite_metrics(ci_run):
    workdir, stdout = ci_run
    for stage in STAGES:  # every stage but the methods the CI config's pipeline.algorithms leaves out
        assert (workdir / stage / "DONE.json").is_file() == (stage not in OPT_IN), stage
    report = json.loads((workdir / "report.json").read_text())
    for key in ("seed", "gold_score", "win_rate_ppo_vs_sft", "win_rate_ci_low", "win_rate_ci_high",
                "correctness_gain_ci_low", "rm_accuracy", "labeler_agreement", "kl_ppo_sft", "gold_calls",
                "win_rate_tau1", "win_rate_tau1_ci_low", "gold_gain_tau1_ci_low", "max_response_share",
                "rm_accuracy_heldout_labels", "labeler_ceiling_heldout_labels", "rm_ece", "oracle_win_rate", "checks"):
        assert key in report, key
    # the oracle run (pipeline.oracle, on in the CI config) evaluated beside the others
    assert report["oracle_win_rate"] == report["win_rates"]["oracle_vs_sft"]["win_rate"]
    assert "oracle" in report["gold_score"]
    assert report["win_rate_tau1"] is not None and report["rm_ece"] is not None
    assert _finite(report)
    assert set(report["checks"]) == set(CHECKS)  # one per acceptance line; kl_budget is off in this config
    assert all(isinstance(c["passed"], bool) for c in report["checks"].values())
    md = (workdir / "report.md").read_text()
    assert md.index("## Checks") < md.index("## Most repeated responses") < md.index("## Gold score per policy")
    assert all(f"| {name} |" in md for name in CHECKS)
    assert set(report["gold_score"]) >= {"base", "sft", "ppo", "best_of_4"}
    # The gold judge is called by the labeler (K per kept prompt), the oracle run and the evaluation only.
    label = json.loads((workdir / "label" / "DONE.json").read_text())
    oracle = json.loads((workdir / "oracle" / "DONE.json").read_text())
    # the oracle: its scale (one SFT sample per PPO prompt, at most 256) and one call per rollout row
    assert oracle["gold_calls_standardize"] == min(128, 256)
    assert oracle["gold_calls_oracle"] == 4 * 32  # 4 iterations x 32 rows
    assert report["gold_calls"] == (label["gold_calls"] + report["gold_calls_by_stage"]["eval"]
                                    + oracle["gold_calls_oracle"] + oracle["gold_calls_standardize"])
    rankings = [json.loads(line) for line in (workdir / "label" / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == label["rankings"] > 0
    assert label["gold_calls"] == 4 * (label["rankings"] + label["skipped_all_tied"])
    # The side file holds the labeler's own noiseless gold totals, row for row (the test's judge re-scores them).
    extras = [json.loads(line) for line in (workdir / "label" / "ranking_gold.jsonl").read_text().splitlines()]
    assert len(extras) == len(rankings)
    judge = GoldJudge()
    for r, e in zip(rankings[:10], extras):
        spec = TaskSpec.from_dict(r["spec"])
        assert e["gold"] == pytest.approx([judge.score(spec, t).total for t in r["responses"]])
        assert len(e["sft_logp"]) == len(r["responses"]) and all(lp < 0 for lp in e["sft_logp"])
    for name in ("report.md", "scores.png", "gold_vs_proxy.png", "ppo_training.png", "rm_calibration.png",
                 "eval_samples.jsonl", "eval_label_rankings.jsonl"):
        assert (workdir / name).is_file(), name
    assert "InstructGPT pipeline, seed 0" in stdout
    # PPO wrote its snapshots, and the eval placed each on the over-optimization curve.
    # (4 iterations, 2 snapshots: an export at iteration 2, and the final policy at 4.)
    assert [p["step"] for p in report["overoptimization"]] == [2, 4]


# ----------------------------------------------------------------------------- the report, recomputed independently
# Plain numpy over the files the pipeline wrote; none of evaluate.py / statistics.py / report.py is used.
def _boot(values, seed=0, resamples=2000):
    """95% percentile bootstrap of the mean over prompts (the documented method: resample prompts with
    replacement, 2000 times, from default_rng(seed))."""
    v = np.asarray(values, float)
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    return np.quantile(means, [0.025, 0.975])


def _win(a, b):
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _agree(score, labeler_ranks):
    """(agreeing, pairs) over pairs the labeler separates (rank 1 = best), ties of the score 1/2."""
    agree = pairs = 0
    for i, j in itertools.combinations(range(len(score)), 2):
        if labeler_ranks[i] != labeler_ranks[j]:
            pairs += 1
            better_i = labeler_ranks[i] < labeler_ranks[j]
            agree += 0.5 if score[i] == score[j] else float((score[i] > score[j]) == better_i)
    return agree, pairs


def _independent_checks(rows, held, seed, top_n):
    """Every check of the report that the samples files decide: {name: (value, passed)}."""
    def total(o):
        return o["gold"]["total"]

    out = {}
    wins = [_win(total(r["responses"]["ppo"]), total(r["responses"]["sft"])) for r in rows]
    low = _boot(wins, seed)[0]
    out["ppo_beats_sft_greedy"] = ([np.mean(wins), low], np.mean(wins) >= 0.60 and low > 0.5)
    diff = [total(r["responses"]["ppo"]) - total(r["responses"]["sft"]) for r in rows]
    orig = [d for d, r in zip(diff, rows) if r["spec"]["kind"] in ORIGINAL_KINDS]
    out["original_kinds_gold_gain"] = (_boot(orig, seed)[0], _boot(orig, seed)[0] > -0.02)
    tau1 = [np.mean([total(o) for o in r["tau1"]["ppo"]]) - np.mean([total(o) for o in r["tau1"]["sft"]]) for r in rows]
    out["tau1_gold_gain"] = (_boot(tau1, seed)[0], _boot(tau1, seed)[0] > 0)
    ppo_tau1 = np.mean([total(o) for r in rows for o in r["tau1"]["ppo"]])
    firsts = [r["samples"][:top_n] for r in rows]
    best = [s[int(np.argmax([o["rm"] for o in s]))] for s in firsts]  # first of equal scores
    best_total = np.mean([total(o) for o in best])
    out["ppo_tau1_vs_best_of_n"] = ([ppo_tau1, best_total], ppo_tau1 >= best_total)
    corr = [r["responses"]["ppo"]["gold"]["correctness"] - r["responses"]["sft"]["gold"]["correctness"] for r in rows]
    out["correctness_gain"] = (_boot(corr, seed)[0], _boot(corr, seed)[0] > -0.02)
    by_kind = collections.defaultdict(list)
    for r, d in zip(rows, diff):
        by_kind[r["spec"]["kind"]].append(d)
    worse = sorted(k for k, v in by_kind.items() if _boot(v, seed)[1] < 0)
    out["no_kind_worse"] = (worse, not worse)
    wrong = collections.Counter(r["responses"]["ppo"]["text"].strip() for r in rows
                                if r["responses"]["ppo"]["gold"]["correctness"] != 1.0)
    share = max(wrong.values(), default=0) / len(rows)
    out["max_response_share"] = (share, share <= 0.05)
    acc = {}
    for name, score in (("rm", lambda r: r["rm"]), ("sft", lambda r: r["sft_logp"]),
                        ("longer", lambda r: [len(t.strip()) for t in r["responses"]]), ("ceiling", lambda r: r["gold"])):
        counts = [_agree(score(r), r["ranks"]) for r in held]
        acc[name] = sum(c[0] for c in counts) / sum(c[1] for c in counts)
    out["rm_heldout_labels"] = ([acc["rm"], acc["sft"], acc["longer"], acc["ceiling"]],
                                acc["rm"] > acc["sft"] and acc["rm"] > acc["longer"] and acc["rm"] >= acc["ceiling"] - 0.08)
    paired = [total(b) - total(s[0]) for b, s in zip(best, firsts)]
    out["best_of_n_beats_best_of_1"] = (_boot(paired, seed)[0], _boot(paired, seed)[0] > 0)
    return out


def test_report_checks_recompute_from_the_samples_files(ci_run):
    """report.json's checks and headline numbers, recomputed from eval_samples.jsonl and
    eval_label_rankings.jsonl with plain numpy (the issue: not with the summarize() the report is made by)."""
    workdir, _ = ci_run
    report = json.loads((workdir / "report.json").read_text())
    rows = [json.loads(line) for line in (workdir / "eval_samples.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (workdir / "eval_label_rankings.jsonl").read_text().splitlines()]
    assert held and all(len(r["rm"]) == len(r["responses"]) == len(r["gold"]) for r in held)
    assert report["best_of_n_top"] == 4 and len(rows[0]["samples"]) == 4  # the CI config samples best-of-4
    expected = _independent_checks(rows, held, report["seed"], report["best_of_n_top"])
    for name, (value, passed) in expected.items():
        got = report["checks"][name]
        assert got["passed"] == passed, name
        if name == "no_kind_worse":
            assert got["value"] == value, name
        else:
            assert got["value"] == pytest.approx(value), name
    # tau = 1: m samples per prompt for each policy, SFT's being its first best-of-n samples (both at tau 1)
    m = report["tau1_samples_per_prompt"]
    assert m == 4 and all(len(r["tau1"][p]) == m for r in rows for p in ("base", "sft", "ppo"))
    assert all(r["tau1"]["sft"] == r["samples"][:m] for r in rows)
    per_prompt = [np.mean([_win(a["gold"]["total"], b["gold"]["total"]) for a, b in zip(r["tau1"]["ppo"], r["tau1"]["sft"])])
                  for r in rows]
    assert report["win_rate_tau1"] == pytest.approx(np.mean(per_prompt))
    assert report["win_rate_tau1_ci_low"] == pytest.approx(_boot(per_prompt, report["seed"])[0])
    # the rest of the headline numbers
    ppo = np.array([r["responses"]["ppo"]["gold"]["total"] for r in rows])
    assert report["gold_score"]["ppo"] == pytest.approx(ppo.mean())
    assert report["kl_ppo_sft"] == pytest.approx(np.mean([o["logp"] - o["logp_ref"] for r in rows
                                                          for o in r["kl_samples"]["ppo||sft"]]))
    agree = pairs = 0
    for r in rows:  # reward model against the noiseless gold order on the best-of-n samples, ties 1/2
        a, p = _agree([o["rm"] for o in r["samples"]], [-o["gold"]["total"] for o in r["samples"]])
        agree, pairs = agree + a, pairs + p
    assert report["rm_accuracy"] == pytest.approx(agree / pairs) and report["rm_accuracy_pairs"] == pairs
    assert "policy_logprob" in report["rm_accuracy_breakdown"]  # every sample carries its "logp"
    assert report["rm_accuracy_heldout_labels"] == pytest.approx(expected["rm_heldout_labels"][0][0])
    assert report["labeler_ceiling_heldout_labels"] == pytest.approx(expected["rm_heldout_labels"][0][3])
    # calibration: both orientations of every separated pair, 10 equal bins, raw RM differences
    gain = json.loads((workdir / "eval" / "DONE.json").read_text())["heldout_labels"]["rm_gain"]
    p, y = [], []
    for r in held:
        for i, j in itertools.combinations(range(len(r["ranks"])), 2):
            if r["ranks"][i] != r["ranks"][j]:
                q = 1 / (1 + math.exp(-(r["rm"][i] - r["rm"][j]) / gain))
                p += [q, 1 - q]
                y += [float(r["ranks"][i] < r["ranks"][j]), float(r["ranks"][i] > r["ranks"][j])]
    p, y = np.array(p), np.array(y)
    which = np.minimum((p * 10).astype(int), 9)
    ece = sum(np.sum(which == b) / len(p) * abs(y[which == b].mean() - p[which == b].mean()) for b in set(which))
    assert report["rm_ece"] == pytest.approx(ece)
    # the most repeated responses, counted here
    top = collections.Counter(r["responses"]["ppo"]["text"].strip() for r in rows).most_common(1)[0]
    assert report["repeated_responses"]["ppo"]["top"][0]["prompts"] == top[1]
    assert report["truncated_prompts"] == sum(r["prompt_truncated"] for r in rows) == 0  # the CI prompts all fit


def _rm_ceiling(workdir, tmp_path, *args) -> dict:
    """Run benchmarks/rm_ceiling.py on a pipeline workdir; its JSON result."""
    out = tmp_path / "ceiling.json"
    env = {**os.environ, "JAX_CACHE_DIR": str(workdir.parent / "jax_cache")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "rm_ceiling.py"), str(workdir), "--experiment",
                           EXPERIMENT + ":ci", *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_rm_ceiling_benchmark_reproduces_the_reports_accuracies_and_trains_the_implicit_scorer(ci_run, tmp_path):
    """benchmarks/rm_ceiling.py on the CI run: its reward-model and SFT log-prob accuracies are the report's
    own, the implicit scorer starts at the SFT's log-prob ranking, and a short training run is recorded."""
    workdir, _ = ci_run
    result = _rm_ceiling(workdir, tmp_path, "--epochs", "2", "--batch", "8", "--eval-every", "4")
    report = json.loads((workdir / "report.json").read_text())
    (got,) = result["samples"].values()
    assert got["reward_model"]["accuracy"] == pytest.approx(report["rm_accuracy"], abs=1e-4)  # the JSON keeps 4 digits
    assert got["reward_model"]["pairs"] == report["rm_accuracy_pairs"]
    assert got["sft_logprob"]["accuracy"] == pytest.approx(report["rm_accuracy_breakdown"]["policy_logprob"]["accuracy"],
                                                           abs=1e-4)
    # Re-tokenizing the decoded texts can change a few samples' log-probs, not the ranking as a whole.
    assert abs(result["implicit_at_init"] - got["sft_logprob"]["accuracy"]) < 0.05
    rankings = (workdir / "label" / "rankings.jsonl").read_text().splitlines()
    training = result["implicit_training"]
    assert training["rankings"] == len(rankings) and training["steps"] == 2 * len(rankings) // 8 > 0
    assert [c["step"] for c in training["curve"]][-1] == training["steps"]
    assert all(math.isfinite(c["train_loss"]) and 0 <= c["accuracy"] <= 1 for c in training["curve"])
    assert 0 <= got["implicit"]["accuracy"] <= 1 and got["implicit"]["pairs"] == report["rm_accuracy_pairs"]


def test_rm_ceiling_scores_another_workdirs_reward_model(ci_run, tmp_path):
    """--reward-models W: W's reward model, built with W's own model shape, ranks the samples. Given the run's
    own workdir it must reproduce the report's reward-model accuracy; --epochs 0 skips the implicit scorer."""
    workdir, _ = ci_run
    result = _rm_ceiling(workdir, tmp_path, "--reward-models", str(workdir), "--epochs", "0")
    (got,) = result["samples"].values()
    report = json.loads((workdir / "report.json").read_text())
    assert got[f"rm:{workdir}"]["pairs"] == report["rm_accuracy_pairs"]
    assert got[f"rm:{workdir}"]["accuracy"] == pytest.approx(report["rm_accuracy"], abs=2e-3)
    assert "implicit" not in got and "implicit_training" not in result


def test_rerun_skips_finished_stages_and_stage_alone_needs_its_inputs(ci_run, tmp_path):
    workdir, _ = ci_run
    before = (workdir / "ppo" / "DONE.json").read_text()
    proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(workdir)], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:
        if stage not in OPT_IN:  # not in the CI config's pipeline.algorithms: never run
            assert f"[{stage}] finished earlier: skipped" in proc.stdout
    assert "[dpo]" not in proc.stdout and "[rloo]" not in proc.stdout
    assert (workdir / "ppo" / "DONE.json").read_text() == before
    # A stage alone in an empty workdir: a clear error naming what is missing.
    proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(tmp_path / "empty"),
                 "--stage", "rm"], tmp_path)
    assert proc.returncode == 2
    assert "stage 'rm' needs ['task', 'label', 'sft'] finished first" in proc.stderr


def test_label_stage_with_twins_ranks_them_beside_the_samples_and_the_reward_model_trains_on_them(ci_run, tmp_path):
    """pipeline.twins (design (a)): each ranking holds K SFT samples then the twins of the first one; the gold
    calls are K + twins per ranking; the held-out label metric keeps the samples only; the reward model trains
    on the longer rankings."""
    import shutil

    from instruct_jax.instructgpt.evaluate import heldout_rankings
    from instruct_jax.instructgpt.task import split_phrase

    workdir, _ = ci_run
    run = tmp_path / "run"
    for stage in ("task", "sft"):
        shutil.copytree(workdir / stage, run / stage)
    sets = ["--set", "pipeline.twins=3", "pipeline.label_prompts=40"]  # the first 40 of the task's 64 prompts
    for stage in ("label", "rm"):
        proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(run), "--stage", stage, *sets],
                    run)
        assert proc.returncode == 0, proc.stderr[-3000:]
    label = json.loads((run / "label" / "DONE.json").read_text())
    assert label["twins"] == 3 and label["gold_calls"] == 7 * (label["rankings"] + label["skipped_all_tied"])
    assert label["rankings"] + label["skipped_all_tied"] + label["skipped_empty_sample"] == 40
    rankings = [json.loads(line) for line in (run / "label" / "rankings.jsonl").read_text().splitlines()]
    extras = [json.loads(line) for line in (run / "label" / "ranking_gold.jsonl").read_text().splitlines()]
    judge = GoldJudge()
    for r, e in zip(rankings, extras):
        spec, (first, twin, ref, near) = TaskSpec.from_dict(r["spec"]), (r["responses"][i] for i in (0, 4, 5, 6))
        assert len(r["responses"]) == len(e["gold"]) == len(e["sft_logp"]) == 7 and e["sampled"] == 4
        assert e["gold"] == pytest.approx([judge.score(spec, t).total for t in r["responses"]])
        assert all(lp < 0 for lp in e["sft_logp"])
        assert (split_phrase(twin, DEMO_WRAPPERS)[1] is None) == (split_phrase(first, DEMO_WRAPPERS)[1] is not None)
        assert split_phrase(ref, DEMO_WRAPPERS)[1] == split_phrase(near, DEMO_WRAPPERS)[1] == split_phrase(
            first, DEMO_WRAPPERS)[1]
        if spec.kind != "constrained":
            assert judge.score(spec, ref).correctness == 1.0
    cfg = apply_overrides(load_experiment(EXPERIMENT + ":ci"), sets[1:])
    rm_data = stage_config(cfg, "rm", Paths(str(run), cfg.data.vocab_size)).data
    assert rm_data.max_responses == 7
    held = heldout_rankings(rankings, extras, rm_data, cfg.seed)
    assert held and all(len(h["responses"]) == len(h["ranks"]) == len(h["gold"]) == len(h["sft_logp"]) == 4
                        for h in held)
    rm = json.loads((run / "rm" / "DONE.json").read_text())
    metrics = [json.loads(line) for line in (run / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == cfg.pipeline.rm.steps and all(math.isfinite(m["loss"]) for m in metrics
                                                                 if "loss" in m), rm


def test_dpo_rloo_grpo_rft_stages_from_the_same_sft_are_evaluated_beside_ppo(ci_run, tmp_path):
    """pipeline.algorithms=ppo,dpo,rloo,grpo,rft: DPO trains from the SFT export on the label stage's rankings (the
    reward model's split), RLOO and GRPO from the same export against the same reward model with no value model, RFT
    fine-tunes it on the reward model's best samples for two rounds (the second from the first's export); the
    evaluation adds them to the policies, the win rates vs SFT, KL and tau = 1, and report.json's `algorithms` table
    carries every method."""
    import shutil

    workdir, _ = ci_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    (run / "eval" / "DONE.json").unlink()
    sets = ["--set", "pipeline.algorithms=ppo,dpo,rloo,grpo,rft,rloo_dpo", "pipeline.dpo.steps=6", "pipeline.rft_prompts=32",
            "pipeline.rft_samples=3", "pipeline.rft_rounds=2", "pipeline.rft.steps=3",
            "pipeline.rft.global_batch_size=16"] + [
        f"pipeline.{m}.{k}" for m in ("rloo", "grpo", "rloo_dpo") for k in ("steps=2", "global_batch_size=32",
                                                                            "seq_len=64")]
    logs = {}
    for stage in ("dpo", "rloo", "grpo", "rft", "rloo_dpo", "eval"):
        proc = _cli(["pipeline", "--experiment", EXPERIMENT + ":ci", "--workdir", str(run), "--stage", stage, *sets],
                    run)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[stage] = proc.stdout + proc.stderr
    dpo_rows = [json.loads(line) for line in open(run / "dpo" / "metrics.jsonl")]
    assert dpo_rows[-1]["step"] == 6 and "eval_accuracy" in dpo_rows[-1] and math.isfinite(dpo_rows[-1]["loss"])
    report = json.loads((run / "report.json").read_text())
    assert sorted(report["algorithms"]) == ["dpo", "grpo", "ppo", "rft", "rloo", "rloo_dpo"]
    assert f"implicit reward 0.5 * (log pi(y|x) - log pi_ref(y|x)) of the DPO policy {run / 'dpo'} against " \
           f"{run / 'sft'}" in logs["rloo_dpo"]
    rft = json.loads((run / "rft" / "DONE.json").read_text())
    assert [r["round"] for r in rft["rounds"]] == [0, 1]
    for r in rft["rounds"]:  # 32 prompts x 3 samples of at most ppo.response_len tokens, the best of each kept
        assert r["prompts"] == 32 and r["kept"] + r["skipped_all_empty"] == 32 and r["rm_kept"] >= r["rm_all"]
        assert 32 * 3 <= r["generated_tokens"] <= 32 * 3 * 24
    assert report["algorithms"]["rft"]["generated_tokens"] == sum(r["generated_tokens"] for r in rft["rounds"])
    kept = [json.loads(line) for line in open(run / "rft" / "best_1.jsonl")]
    assert len(kept) == rft["rounds"][1]["kept"] and [m["role"] for m in kept[0]["messages"]] == ["user", "assistant"]
    round0 = json.loads((run / "rft" / "round_0" / "config.json").read_text())
    round1 = json.loads((run / "rft" / "config.json").read_text())  # the last round trains in rft/ itself
    assert round0["train"]["init_from"] == str(run / "sft")
    assert round1["train"]["init_from"] == str(run / "rft" / "round_0")
    assert round1["data"]["source"] == str(run / "rft" / "best_1.jsonl")
    assert json.loads(open(run / "rft" / "metrics.jsonl").readlines()[-1])["step"] == 3
    for method in ("rloo", "grpo", "rloo_dpo"):  # 2 iterations of 8 prompts x pipeline.group_size samples, no value
        rows = [json.loads(line) for line in open(run / method / "metrics.jsonl")]
        assert rows[-1]["step"] == 2 and "group_reward_std" in rows[-1] and "value_loss" not in rows[-1]
        assert not (run / method / "value_params").exists()
        assert 0 < report["algorithms"][method]["generated_tokens"] <= 2 * 32 * 24
    for method, a in report["algorithms"].items():
        assert a["win_rate_ci_low"] <= a["win_rate"] <= a["win_rate_ci_high"]
        assert all(math.isfinite(a[k]) for k in ("gold_greedy", "gold_tau1", "win_rate_tau1", "kl", "seconds"))
    assert report["algorithms"]["dpo"]["generated_tokens"] == 0 and report["algorithms"]["ppo"]["generated_tokens"] > 0
    assert report["algorithms"]["ppo"]["win_rate"] == report["win_rate_ppo_vs_sft"]
    assert "dpo_vs_sft" in report["win_rates"] and "## Methods from the same SFT policy" in (run / "report.md").read_text()


def test_best_of_samples_keeps_each_prompts_highest_scored_non_empty_sample():
    """The rft stage's selection against a loop over plain numbers: sample k uses seed + k; empty samples never
    win; a prompt whose samples are all empty is skipped and counted."""
    from types import SimpleNamespace

    from instruct_jax.instructgpt.pipeline import best_of_samples

    texts = {0: ["a", "", "c", ""], 1: ["aa", "bb", "", ""], 2: ["aaa", "b", "cc", ""]}  # seed -> one text per prompt
    scores = {"a": 0.1, "aa": 0.5, "aaa": -1.0, "bb": 0.2, "b": 2.0, "c": 0.3, "cc": 0.0, "": 9.0}

    class Runner:
        def generate(self, params, prompts, *, temperature, max_new_tokens, seed):
            t = texts[seed - 40]
            return SimpleNamespace(texts=t, lengths=np.array([len(x) + 1 for x in t]))

    class Scorer:
        def score(self, pairs):
            return np.array([scores[text] for _, text in pairs])

    prompts = [[{"role": "user", "content": f"p{i}"}] for i in range(4)]
    best, info = best_of_samples(Runner(), None, Scorer(), prompts, 3, temperature=1.0, max_new_tokens=8, seed=40)
    expected = []
    for i, m in enumerate(prompts):
        options = [texts[k][i] for k in range(3) if texts[k][i]]
        if options:
            expected.append((m, max(options, key=scores.get)))
    assert best == expected == [(prompts[0], "aa"), (prompts[1], "b"), (prompts[2], "c")]
    assert info["kept"] == 3 and info["skipped_all_empty"] == 1 and info["samples_per_prompt"] == 3
    assert info["generated_tokens"] == sum(len(x) + 1 for t in texts.values() for x in t)
    assert info["rm_kept"] == pytest.approx(np.mean([0.5, 2.0, 0.3]))
    non_empty = [scores[x] for t in texts.values() for x in t if x]
    assert info["rm_all"] == pytest.approx(np.mean(non_empty))


def test_eval_command_on_the_pipeline_checkpoints(ci_run, tmp_path):
    workdir, _ = ci_run
    cfg = load_experiment(EXPERIMENT + ":ci")
    tok = Paths(str(workdir), cfg.data.vocab_size).tokenizer
    out = tmp_path / "eval"
    proc = _cli(["eval", "--experiment", EXPERIMENT + ":ci", "--workdir", str(out), "--policy",
                 f"sft={workdir / 'sft'}", "--policy", f"ppo={workdir / 'ppo'}", "--reward-model", str(workdir / "rm"),
                 "--kl", "ppo:sft", "--set", f"data.tokenizer={tok}", "train.seq_len=64"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "eval_summary.json").read_text())
    report = json.loads((workdir / "report.json").read_text())
    # Greedy decoding of the same checkpoints on the same prompts: the same gold scores as the pipeline.
    assert summary["policies"]["ppo"]["total"] == pytest.approx(report["gold_score"]["ppo"])
    assert summary["policies"]["sft"]["total"] == pytest.approx(report["gold_score"]["sft"])
    assert summary["win_rates"]["ppo_vs_sft"]["win_rate"] == pytest.approx(report["win_rate_ppo_vs_sft"])
    assert "best_of_n" in summary and "kl" in summary
    # tau = 1 samples drawn with the pipeline's keys: the same paired win rate; truncation counted and printed
    assert summary["tau1"]["win_rates"]["ppo_vs_sft"]["win_rate"] == pytest.approx(report["win_rate_tau1"])
    assert summary["truncated_prompts"] == 0 and "0 prompts longer than the prompt length" in proc.stdout


def test_pipeline_validation_names_the_field():
    cfg = load_experiment(EXPERIMENT + ":ci")
    for override, field in (("pipeline.responses_per_prompt=12", "pipeline.responses_per_prompt"),
                            ("pipeline.demo_chatty=1.5", "pipeline.demo_chatty"),
                            ("pipeline.demo_phrase=middle", "pipeline.demo_phrase"),
                            ("pipeline.kinds=pick,sudoku", "pipeline.kinds"),
                            ("pipeline.kinds=pick,pick", "pipeline.kinds"),
                            ("pipeline.sft.steps=0", "pipeline.sft.steps"),
                            ("pipeline.best_of=four", "pipeline.best_of"),
                            ("pipeline.max_new_tokens=200", "pipeline.max_new_tokens"),
                            ("pipeline.twins=4", "pipeline.twins"),
                            ("pipeline.algorithms=dpo", "pipeline.algorithms"),
                            ("pipeline.algorithms=ppo,reinforce", "pipeline.algorithms"),
                            ("pipeline.group_size=1", "pipeline.group_size"),
                            ("pipeline.dpo.steps=0", "pipeline.dpo.steps"),
                            ("pipeline.rloo.steps=0", "pipeline.rloo.steps"),
                            ("pipeline.rft_samples=1", "pipeline.rft_samples"),
                            ("pipeline.algorithms=ppo,rloo_dpo", "pipeline.algorithms"),
                            ("pipeline.oracle_algorithm=dpo", "pipeline.oracle_algorithm"),
                            ("pipeline.rft_rounds=0", "pipeline.rft_rounds"),
                            ("pipeline.rft_temperature=0", "pipeline.rft_temperature"),
                            ("pipeline.rft.learning_rate=0", "pipeline.rft.learning_rate"),
                            ("pipeline.twins=-1", "pipeline.twins")):
        bad = apply_overrides(load_experiment(EXPERIMENT + ":ci"), [override])
        with pytest.raises(ConfigError) as e:
            validate_pipeline(bad)
        assert e.value.field == field
    validate_pipeline(cfg)
    with pytest.raises(ConfigError, match="responses_per_prompt \\+ twins <= 9") as e:
        validate_pipeline(apply_overrides(load_experiment(EXPERIMENT + ":ci"),
                                          ["pipeline.responses_per_prompt=8", "pipeline.twins=2"]))
    assert e.value.field == "pipeline.twins"
    for bad in ("pipeline.tau1_samples=2", "pipeline.tau1_samples=-1"):
        with pytest.raises(ConfigError) as e:
            validate_pipeline(apply_overrides(load_experiment(EXPERIMENT + ":ci"), [bad]))
        assert e.value.field == "pipeline.tau1_samples"
    validate_pipeline(apply_overrides(load_experiment(EXPERIMENT + ":ci"), ["pipeline.tau1_samples=0"]))  # off
    for bad, field in (("pipeline.format_fraction=0.6", "pipeline.format_fraction"),
                       ("pipeline.demo_follow=1.5", "pipeline.demo_follow")):
        with pytest.raises(ConfigError) as e:
            validate_pipeline(apply_overrides(load_experiment(EXPERIMENT + ":ci"), [bad]))
        assert e.value.field == field
    paths = Paths("/tmp/x", cfg.data.vocab_size)
    ppo = stage_config(cfg, "ppo", paths)
    assert ppo.train.init_from == "/tmp/x/sft" and ppo.ppo.reward_model == "/tmp/x/rm"
    assert ppo.train.steps == cfg.pipeline.ppo.steps and ppo.ppo.export_every == 2
    assert ppo.ppo.ptx_coef == 0 and not ppo.ppo.ptx.source  # PPO-ptx off by default
    oracle = stage_config(cfg, "oracle", paths)
    assert (oracle.ppo.algorithm, oracle.ppo.reward, oracle.ppo.reward_model) == ("ppo", "host", "")
    rloo = apply_overrides(load_experiment(EXPERIMENT + ":ci"), ["pipeline.oracle_algorithm=rloo",
                                                                 "pipeline.rloo.steps=7"])
    oracle = stage_config(rloo, "oracle", paths)  # the verifier case of RLOO: its own stage's budget, gold reward
    assert (oracle.ppo.algorithm, oracle.ppo.group_size, oracle.train.steps) == ("rloo", 4, 7)
    assert oracle.ppo.reward == "host" and oracle.train.global_batch_size == rloo.pipeline.rloo.global_batch_size
    rloo_dpo = stage_config(cfg, "rloo_dpo", paths)  # rewarded by the DPO policy against the SFT export
    assert (rloo_dpo.ppo.algorithm, rloo_dpo.ppo.reward, rloo_dpo.ppo.reward_model) == ("rloo", "dpo", "/tmp/x/dpo")
    assert rloo_dpo.train.init_from == "/tmp/x/sft" and not rloo_dpo.ppo.implicit_reference
    ptx = stage_config(apply_overrides(load_experiment(EXPERIMENT + ":ci"), ["ppo.ptx_coef=1.0"]), "ppo", paths)
    assert ptx.ppo.ptx.source == paths.file("corpus.txt") and ptx.ppo.ptx.format == "text"  # the base LM's corpus
    own = apply_overrides(load_experiment(EXPERIMENT + ":ci"), ["ppo.ptx_coef=1.0", "ppo.ptx.source=/data/x.txt"])
    assert stage_config(own, "ppo", paths).ppo.ptx.source == "/data/x.txt"  # a declared source is kept


def test_task_stage_writes_only_the_configured_kinds(tmp_path):
    kinds = ["pick", "repeat", "reverse_list", "count_items", "spell", "list"]
    cfg = apply_overrides(load_experiment(EXPERIMENT + ":ci"), ["pipeline.kinds=" + ",".join(kinds)])
    validate_pipeline(cfg)
    paths = Paths(str(tmp_path), cfg.data.vocab_size)
    result = stage_task(cfg, paths)
    assert result["kinds"] == kinds
    for name in ("eval_prompts.jsonl", "label_prompts.jsonl", "ppo_prompts.jsonl"):
        rows = [json.loads(line) for line in open(paths.file(name))]
        assert {r["spec"]["kind"] for r in rows} == set(kinds), name
    demos = [json.loads(line)["messages"][0]["content"] for line in open(paths.file("demos.jsonl"))]
    assert any(d.startswith("Repeat the word") or d.startswith("Say ") for d in demos)
    assert not any(" plus " in d for d in demos)
    assert os.path.isfile(paths.tokenizer)


def test_demonstrators_habits_are_seeded_fractions():
    task = Task(3)
    plain = task.sft_demos(400)
    chatty = task.sft_demos(400, chatty=0.5)
    slips = task.sft_demos(400, slip=0.2)
    assert [d[0] for d in plain] == [d[0] for d in chatty] == [d[0] for d in slips]  # same prompts for any mix
    refs = [d[1]["content"] for d in plain]
    wrapped = [c[1]["content"] != r for c, r in zip(chatty, refs)]
    assert 0.42 < np.mean(wrapped) < 0.58
    for c, r, w in zip(chatty, refs, wrapped):  # a changed answer is the reference inside a chat phrase
        assert not w or c[1]["content"] in {t.format(r) for t in DEMO_WRAPPERS}
    assert 0.12 < np.mean([s[1]["content"] != r for s, r in zip(slips, refs)]) <= 0.26
    assert task.sft_demos(400, chatty=0.5) == chatty  # reproducible from the seed
    after = task.sft_demos(400, chatty=0.5, phrases=DEMO_TAILS)  # the same draws, the phrase after the answer
    for a, c, r, w in zip(after, chatty, refs, wrapped):
        if w:
            phrase = [t.format(r) for t in DEMO_WRAPPERS].index(c[1]["content"])
            assert a[1]["content"] == DEMO_TAILS[phrase].format(r)
        else:
            assert a[1]["content"] == r


def test_best_of_n_and_kl_from_rows():
    samples = [{"rm": 0.1, "id": 0}, {"rm": 0.9, "id": 1}, {"rm": 0.5, "id": 2}, {"rm": 2.0, "id": 3}]
    assert best_of_n_pick(samples, 1)["id"] == 0
    assert best_of_n_pick(samples, 3)["id"] == 1
    assert best_of_n_pick(samples, 4)["id"] == 3
    assert kl_k1([{"logp": -1.0, "logp_ref": -3.0}, {"logp": -2.0, "logp_ref": -2.5}]) == pytest.approx(1.25)


def test_repeated_responses_counts_texts_across_prompts_and_names_their_kinds():
    answers = [("add", " 81", "9"), ("spell", "81 ", "nine"), ("count", "81", "3"), ("add", "9", "9"), (None, "x", "")]
    rows = [{"spec": {"kind": k} if k else None, "responses": {"sft": {"text": s}, "ppo": {"text": p}}}
            for k, p, s in answers]
    rep = repeated_responses(rows, top=2)
    assert rep["ppo"] == {"distinct": 3, "top": [{"text": "81", "prompts": 3, "kinds": ["add", "count", "spell"]},
                                                 {"text": "9", "prompts": 1, "kinds": ["add"]}]}
    assert rep["sft"]["distinct"] == 4 and rep["sft"]["top"][0] == {"text": "9", "prompts": 2, "kinds": ["add"]}
    assert rep["sft"]["top"][1] == {"text": "", "prompts": 1, "kinds": []}  # no spec: no kind; ties by text


def test_rm_accuracy_breakdown_equals_a_pair_by_pair_count():
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        samples = []
        for _ in range(6):
            c = float(rng.choice([0.0, 0.5, 1.0]))
            total = 0.6 * c + 0.25 * float(rng.choice([0.5, 1.0]))
            samples.append({"gold": {"correctness": c, "total": total}, "rm": float(rng.choice([-1.0, 0.0, 1.0])),
                            "logp": float(rng.normal()), "tokens": int(rng.integers(1, 9))})
        rows.append({"spec": {"kind": ("add", "sort")[i % 2], "held_out": i % 3 == 0}, "samples": samples})

    def naive(keep_row, score, keep_pair=lambda a, b: True):
        agree = pairs = 0
        for r in rows:
            if not keep_row(r):
                continue
            for a, b in itertools.combinations(r["samples"], 2):
                if a["gold"]["total"] == b["gold"]["total"] or not keep_pair(a, b):
                    continue
                pairs += 1
                sa, sb = score(a), score(b)
                agree += 0.5 if sa == sb else float((sa > sb) == (a["gold"]["total"] > b["gold"]["total"]))
        return {"accuracy": agree / pairs, "pairs": pairs}

    rm, every = (lambda o: o["rm"]), (lambda r: True)
    b = rm_accuracy_breakdown(rows)
    assert b["by_kind"]["sort"] == pytest.approx(naive(lambda r: r["spec"]["kind"] == "sort", rm))
    assert b["by_template"]["held_out"] == pytest.approx(naive(lambda r: r["spec"]["held_out"], rm))
    assert b["by_difference"]["style"] == pytest.approx(
        naive(every, rm, lambda a, b: a["gold"]["correctness"] == b["gold"]["correctness"]))
    assert b["by_difference"]["correctness"] == pytest.approx(
        naive(every, rm, lambda a, b: a["gold"]["correctness"] != b["gold"]["correctness"]))
    assert b["policy_logprob"] == pytest.approx(naive(every, lambda o: o["logp"] / o["tokens"]))
    # the splits partition the pairs
    assert sum(v["pairs"] for v in b["by_kind"].values()) == sum(v["pairs"] for v in b["by_difference"].values())
    del rows[0]["samples"][0]["logp"]
    assert "policy_logprob" not in rm_accuracy_breakdown(rows)  # no baseline from partial data


def test_runner_logprob_equals_the_samplers_own(tmp_path):
    """Re-scoring a sample under the params that drew it, at its temperature (1 and 0.7), gives the sampler's
    log-probs."""
    import jax

    from instruct_jax.data.chat import load_chat_template
    from instruct_jax.inference.runner import PolicyRunner
    from instruct_jax.train.lm.build import build_lm

    cfg = apply_overrides(load_experiment(EXPERIMENT + ":ci"),
                          ["model.num_layers=1", "model.d_model=32", "model.mlp_dim=64", "model.head_dim=8",
                           "train.seq_len=64"])
    tok = _tiny_tokenizer(tmp_path)
    runner = PolicyRunner(cfg, tok, load_chat_template("builtin", tok), prompt_len=24, batch_size=16)
    params = build_lm(cfg).init_state().params
    prompts = [list(p.messages) for p in Task(0).train_prompts(20)]
    for tau in (1.0, 0.7):  # one runner, one set of params: only the sampler and the scorer compile again
        gen = runner.generate(params, prompts, temperature=tau, max_new_tokens=8, seed=1)
        again = runner.logprob(params, gen, temperature=tau)
        np.testing.assert_allclose(again, gen.logprob, rtol=1e-4, atol=1e-4, err_msg=f"tau {tau}")
    # Given texts, against a naive reference: one unpadded forward over prompt + text + end of turn per row.
    from instruct_jax.data.chat import load_chat_template as _template
    from instruct_jax.model.transformer import ModelInput, Transformer

    texts = [p.spec.reference for p in Task(0).train_prompts(20)][:6] + ["", "one two three four five six seven"]
    got = runner.logprob_texts(params, prompts[:8], texts, max_new_tokens=8)
    model, template = Transformer(cfg.model), _template("builtin", tok)
    for i, text in enumerate(texts):
        prompt = template.render_prompt(prompts[i])
        response = (tok.encode(text) + [tok.eot_id])[:8]
        ids = np.asarray([prompt + response], np.int32)
        logits = np.asarray(model.apply({"params": params}, ModelInput.unpacked(ids)).logits[0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(response))
        assert got[i] == pytest.approx(want, rel=1e-3), (i, text)  # an off-by-one position costs nats
    with pytest.raises(ValueError, match="2 prompts but 1 texts"):
        runner.logprob_texts(params, prompts[:2], ["a"], max_new_tokens=8)
    greedy = runner.generate(params, prompts, temperature=0.0, max_new_tokens=8, seed=5)
    assert greedy.texts == runner.generate(params, prompts, temperature=0.0, max_new_tokens=8, seed=6).texts
    assert jax.device_count() == 8


def _tiny_tokenizer(tmp_path):
    from instruct_jax.data.build import build_tokenizer
    from instruct_jax.data.config import DataConfig

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(Task(0).pretrain_corpus(300)) + "\n" +
                    "\n".join(p.text for p in Task(0).train_prompts(300)))
    return build_tokenizer(DataConfig(format="text", tokenizer_train_files=(str(text),), vocab_size=512),
                           str(tmp_path))
