"""The pipeline's report: report.json (numbers), report.md (tables + plots), a one-screen console summary.

`build_report(cfg, results)` reads the stages' results (their DONE.json contents) and adds the
acceptance checks of issue 25, one per acceptance line, each with its value and threshold, so a reader
sees at once whether RLHF helped (CIs: 95% bootstrap over prompts; gold gains are per-prompt gold totals):

    ppo_beats_sft_greedy       PPO vs SFT, greedy, gold judge, ties 1/2: win rate >= 0.60 and CI low > 0.5
    original_kinds_gold_gain   on the original seven kinds alone (task.ORIGINAL_KINDS): greedy gold gain CI low > -0.02
    tau1_gold_gain             at tau = 1 (pipeline.tau1_samples per prompt): PPO's gold gain over SFT, CI low > 0
    ppo_tau1_vs_best_of_n      PPO's tau = 1 gold >= best-of-16 from SFT (the largest n sampled), same decoding
    correctness_gain           greedy correctness gain CI low > -0.02
    no_kind_worse              no instruction kind whose greedy gold gain has CI high < 0
    max_response_share         <= 0.05 (PPO greedy: one response given to prompts it is wrong for)
    rm_heldout_labels          on the labeler's held-out rankings: RM accuracy above the SFT log-prob and
                               longer-answer baselines, and >= the labeler ceiling - 0.08
    best_of_n_beats_best_of_1  best-of-16 (the largest n) minus best-of-1 by gold, paired CI low > 0
    wall_time                  the stages' seconds <= 900
    kl_budget                  KL(PPO || SFT) <= pipeline.kl_budget (only when set; not an acceptance line)

`oracle_win_rate` is the oracle (gold-reward PPO, `pipeline.oracle`) run's greedy win rate over SFT, which the
eval stage measures beside the others: results["eval"]["win_rates"]["oracle_vs_sft"]["win_rate"]; None when the
pipeline ran no oracle.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from instruct_jax.config import Config

CHECKS = ("ppo_beats_sft_greedy", "original_kinds_gold_gain", "tau1_gold_gain", "ppo_tau1_vs_best_of_n",
          "correctness_gain", "no_kind_worse", "max_response_share", "rm_heldout_labels", "best_of_n_beats_best_of_1",
          "wall_time")
WALL_TIME_LIMIT = 900.0  # seconds per seed (issue 25)

POLICY_ORDER = ("base", "sft", "best_of_4", "best_of_16", "ppo")
ALGORITHM_ORDER = ("ppo", "dpo", "rloo", "grpo", "rft", "rloo_dpo")  # the methods table's rows (pipeline.ALGORITHMS)
ALGORITHM_FIELDS = ("gold_greedy", "gold_tau1", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "win_rate_tau1",
                    "kl", "generated_tokens", "gold_calls", "seconds")


def build_report(cfg: Config, results: dict) -> dict:
    ev = results["eval"]
    pol = ev["policies"]
    gold = {name: pol[name]["total"] for name in pol}
    for n, b in ev.get("best_of_n", {}).items():
        if n != "1":
            gold[f"best_of_{n}"] = b["total"]
    h = ev["win_rates"]["ppo_vs_sft"]
    kl = ev["kl"]["ppo||sft"]["kl"]
    label = results["label"]
    report = {
        "seed": cfg.seed,
        "gold_score": gold,
        "gold_components": {**{k: v for k, v in pol.items()},
                            **{f"best_of_{n}": b for n, b in ev.get("best_of_n", {}).items() if n != "1"}},
        "win_rate_ppo_vs_sft": h["win_rate"], "win_rate_ci_low": h["ci_low"], "win_rate_ci_high": h["ci_high"],
        "wins_ties_losses": [h["wins"], h["ties"], h["losses"]],
        "correctness_gain": h["correctness_gain"], "correctness_gain_ci_low": h["correctness_gain_ci_low"],
        "correctness_gain_ci_high": h["correctness_gain_ci_high"],
        "win_rates": ev["win_rates"],
        "rm_accuracy": ev["rm_accuracy"], "rm_accuracy_pairs": ev["rm_accuracy_pairs"],
        "rm_accuracy_own_eval": results["rm"].get("eval_accuracy"),
        "rm_accuracy_breakdown": ev["rm_accuracy_breakdown"],
        "repeated_responses": ev["repeated_responses"],
        "labeler_agreement": label["labeler_agreement"], "labeler_pairs": label["agreement_pairs"],
        "kl_ppo_sft": kl, "kl_budget": cfg.pipeline.kl_budget,
        "best_of_n": ev.get("best_of_n", {}),
        "overoptimization": ev.get("overoptimization", []),
        "gold_calls": label["gold_calls"] + ev["gold_calls_eval"] + oracle_calls(results),
        "gold_calls_by_stage": {"label": label["gold_calls"], "eval": ev["gold_calls_eval"],
                                "oracle": oracle_calls(results)},
        "eval_prompts": ev["prompts"], "eval_held_out_templates": ev["held_out_prompts"],
        "decoding": ev["decoding"],
        "labeling": {k: label[k] for k in ("rankings", "comparisons", "skipped_all_tied", "skipped_empty_sample",
                                           "mean_distinct_responses")},
        "task": results["task"],
        "seconds": {stage: r.get("seconds", 0.0) for stage, r in results.items()},
    }
    report["seconds"]["total"] = float(sum(report["seconds"].values()))
    report.update(new_fields(ev, results))
    report["algorithms"] = algorithms_table(cfg, ev, results)
    report["checks"] = checks(report)
    return report


def _get(tree, *keys):
    """tree[k0][k1]... or None where a level is missing."""
    for k in keys:
        if not isinstance(tree, dict) or tree.get(k) is None:
            return None
        tree = tree[k]
    return tree


def oracle_calls(results: dict) -> int:
    """Gold calls of the oracle run (its reward and its scale); 0 without one. Not the labeler's budget."""
    o = results.get("oracle") or {}
    return int(o.get("gold_calls_oracle", 0)) + int(o.get("gold_calls_standardize", 0))


def oracle_win_rate(results: dict):
    """The oracle PPO run's win rate over SFT, if the pipeline produced one (see the module docstring)."""
    return _get(results.get("eval"), "win_rates", "oracle_vs_sft", "win_rate")


def algorithms_table(cfg: Config, ev: dict, results: dict) -> dict:
    """Issue 30's comparison, one entry per method trained from SFT and evaluated (ALGORITHM_ORDER): gold score
    greedy and at tau = 1, win rate vs SFT (greedy, ties 1/2) with its CI and at tau = 1, KL from SFT on the method's
    tau = 1 samples, tokens the method generated while training (the PPO phase's methods: iterations x sampled rows
    x their last iteration's mean response length, an estimate; rft: the tokens it sampled, counted; DPO: none),
    gold calls of its own (0: all read the label stage's rankings, through the reward model, the DPO policy or
    directly) and its stage's wall time."""
    out = {}
    for method in ALGORITHM_ORDER:
        if method not in ev["policies"] or f"{method}_vs_sft" not in ev["win_rates"]:
            continue
        h, t1 = ev["win_rates"][f"{method}_vs_sft"], _get(ev, "tau1", "win_rates", f"{method}_vs_sft") or {}
        stage = results.get(method, {})
        generated = 0
        if "generated_tokens" in stage:  # rft counts what it sampled
            generated = int(stage["generated_tokens"])
        elif method != "dpo":
            st = getattr(cfg.pipeline, method)
            generated = round(st.steps * st.global_batch_size * stage["response_length"]) \
                if "response_length" in stage else None
        out[method] = {"gold_greedy": ev["policies"][method]["total"],
                       "gold_tau1": _get(ev, "tau1", "policies", method, "total"),
                       "win_rate": h["win_rate"], "win_rate_ci_low": h["ci_low"], "win_rate_ci_high": h["ci_high"],
                       "win_rate_tau1": t1.get("win_rate"),
                       "kl": _get(ev, "kl", f"{method}||sft", "kl"),
                       "generated_tokens": generated,
                       "gold_calls": 0, "seconds": stage.get("seconds")}
    return out


def new_fields(ev: dict, results: dict) -> dict:
    """Issue 25's report fields, read from the eval summary (None where not measured)."""
    h = ev["win_rates"]["ppo_vs_sft"]
    t1 = _get(ev, "tau1", "win_rates", "ppo_vs_sft") or {}
    bon = ev.get("best_of_n", {})
    top = max((int(n) for n in bon), default=1)
    held = ev.get("heldout_labels") or {}
    share = _get(ev, "max_response_share", "ppo") or {}
    return {
        "win_rate_tau1": t1.get("win_rate"), "win_rate_tau1_ci_low": t1.get("ci_low"),
        "win_rate_tau1_ci_high": t1.get("ci_high"),
        "gold_gain_tau1": _get(t1, "gold_gain", "mean"), "gold_gain_tau1_ci_low": _get(t1, "gold_gain", "ci_low"),
        "gold_gain_tau1_ci_high": _get(t1, "gold_gain", "ci_high"),
        "tau1_samples_per_prompt": _get(ev, "tau1", "samples_per_prompt"),
        "gold_tau1": {name: m["total"] for name, m in (_get(ev, "tau1", "policies") or {}).items()},
        "best_of_n_decoding": ev.get("best_of_n_decoding"),
        "gold_gain": h["gold_gain"]["mean"], "gold_gain_ci_low": h["gold_gain"]["ci_low"],
        "gold_gain_original_kinds": _get(h, "original_kinds", "gold_gain"),
        "win_rate_original_kinds": _get(h, "original_kinds", "win_rate"),
        "gold_gain_by_kind": {k: v["gold_gain"] for k, v in h["by_kind"].items()},
        "win_rate_by_kind": {k: v["win_rate"] for k, v in h["by_kind"].items()},
        "gold_gain_format_instructions": _get(h, "format_instructions", "gold_gain"),
        "win_rate_format_instructions": _get(h, "format_instructions", "win_rate"),
        "win_rate_by_format": {k: v["win_rate"] for k, v in (_get(h, "by_format") or {}).items()},
        "max_response_share": share.get("share"), "max_response_text": share.get("text"),
        "best_of_n_top": top,
        "best_of_n_gain_vs_1": _get(bon, str(top), "gold_gain_vs_1"),
        "rm_accuracy_heldout_labels": held.get("rm"), "labeler_ceiling_heldout_labels": held.get("labeler_ceiling"),
        "sft_logprob_heldout_labels": held.get("sft_logprob"), "longer_answer_heldout_labels": held.get("longer_answer"),
        "heldout_label_pairs": held.get("pairs"), "heldout_label_rankings": held.get("rankings"),
        "rm_ece": held.get("rm_ece"), "rm_reliability": held.get("reliability"),
        "truncated_prompts": ev.get("truncated_prompts"), "rm_truncated_sequences": ev.get("rm_truncated_sequences"),
        "oracle_win_rate": oracle_win_rate(results),
    }


def _check(value, threshold: str, passed) -> dict:
    """One check; a value that was not measured (None) fails, and says so."""
    missing = value is None or (isinstance(value, list) and any(v is None for v in value))
    return {"value": value, "threshold": threshold + (" (not measured)" if missing else ""),
            "passed": bool(not missing and passed())}


def checks(r: dict) -> dict:
    """Each acceptance line of issue 25: the measured value(s), the threshold, and whether it passed."""
    n = r["best_of_n_top"]
    bon = r["gold_score"].get(f"best_of_{n}") if n > 1 else None
    same = (r["best_of_n_decoding"] or {}).get("temperature") == 1.0  # PPO's tau = 1 samples vs SFT's best-of-n
    orig = r["gold_gain_original_kinds"] or {}
    worse = sorted(k for k, g in r["gold_gain_by_kind"].items() if g["ci_high"] < 0)
    held = [r["rm_accuracy_heldout_labels"], r["sft_logprob_heldout_labels"], r["longer_answer_heldout_labels"],
            r["labeler_ceiling_heldout_labels"]]
    gain_n = r["best_of_n_gain_vs_1"] or {}
    c = {
        "ppo_beats_sft_greedy": _check([r["win_rate_ppo_vs_sft"], r["win_rate_ci_low"]], "win >= 0.60, CI low > 0.5",
                                       lambda: r["win_rate_ppo_vs_sft"] >= 0.60 and r["win_rate_ci_low"] > 0.5),
        "original_kinds_gold_gain": _check(orig.get("ci_low"), "greedy gold gain on the original seven kinds, CI low > -0.02",
                                           lambda: orig["ci_low"] > -0.02),
        "tau1_gold_gain": _check(r["gold_gain_tau1_ci_low"], "PPO - SFT gold at tau = 1, CI low > 0",
                                 lambda: r["gold_gain_tau1_ci_low"] > 0),
        "ppo_tau1_vs_best_of_n": _check([r["gold_tau1"].get("ppo"), bon] if same else None,
                                        f"PPO tau = 1 gold >= best-of-{n} (SFT, tau = 1; the issue asks n = 16)",
                                        lambda: r["gold_tau1"]["ppo"] >= bon),
        "correctness_gain": _check(r["correctness_gain_ci_low"], "CI low > -0.02",
                                   lambda: r["correctness_gain_ci_low"] > -0.02),
        "no_kind_worse": _check(worse, "no kind with gold gain CI high < 0", lambda: not worse),
        "max_response_share": _check(r["max_response_share"], "<= 0.05", lambda: r["max_response_share"] <= 0.05),
        "rm_heldout_labels": _check(held, "RM > SFT log-prob and > longer answer, RM >= labeler ceiling - 0.08",
                                    lambda: held[0] > held[1] and held[0] > held[2] and held[0] >= held[3] - 0.08),
        "best_of_n_beats_best_of_1": _check(gain_n.get("ci_low") if n > 1 else None,
                                            f"best-of-{n} - best-of-1 gold, paired CI low > 0 (the issue asks n = 16)",
                                            lambda: gain_n["ci_low"] > 0),
        "wall_time": _check(r["seconds"]["total"], f"<= {WALL_TIME_LIMIT:.0f} s", lambda: r["seconds"]["total"] <= WALL_TIME_LIMIT),
    }
    if r["kl_budget"] > 0:
        c["kl_budget"] = _check(r["kl_ppo_sft"], f"<= {r['kl_budget']}", lambda: r["kl_ppo_sft"] <= r["kl_budget"])
    return c


# ----------------------------------------------------------------------------- plots
def _plots(report: dict, results: dict, root: str) -> list[str]:
    """PNG plots next to report.md; returns their file names (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    rows = _read_metrics(os.path.join(root, "ppo", "metrics.jsonl"))
    if rows:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        steps = [r["step"] for r in rows]
        ax[0].plot(steps, [r["score"] for r in rows], label="reward-model score")
        ax[0].set_xlabel("PPO iteration"), ax[0].set_title("score (normalized RM)")
        ax[1].plot(steps, [r["kl"] for r in rows], color="C1")
        ax[1].set_xlabel("PPO iteration"), ax[1].set_title("KL(policy || SFT) per response, nats")
        fig.tight_layout(), fig.savefig(os.path.join(root, "ppo_training.png"), dpi=100), plt.close(fig)
        made.append("ppo_training.png")
    curve = report["overoptimization"]
    bon = report["best_of_n"]
    if curve or bon:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        for i, (key, title) in enumerate((("gold", "gold total"), ("rm", "reward-model score"))):
            if curve:
                ax[i].plot([0.0] + [p["kl"] for p in curve],
                           [bon["1"]["total" if key == "gold" else "rm"]] + [p[key] for p in curve], "o-",
                           label="PPO snapshots (τ=1 samples)")
            if bon:
                ns = sorted(bon, key=int)
                ax[i].plot([bon[n]["kl"] for n in ns], [bon[n]["total" if key == "gold" else "rm"] for n in ns], "s--",
                           label="best-of-n (measured KL)")
            ax[i].set_xlabel("KL from SFT (nats)"), ax[i].set_title(title)
        ax[0].legend(fontsize=7)
        fig.tight_layout(), fig.savefig(os.path.join(root, "gold_vs_proxy.png"), dpi=100), plt.close(fig)
        made.append("gold_vs_proxy.png")
    comps = report["gold_components"]
    names = [n for n in POLICY_ORDER if n in comps]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bottom = np.zeros(len(names))
    for key, weight in (("correctness", 0.6), ("format", 0.25), ("verbosity", 0.15)):
        vals = np.array([comps[n][key] * weight for n in names])
        ax.bar(names, vals, bottom=bottom, label=f"{weight} × {key}")
        bottom += vals
    ax.set_ylabel("gold total"), ax.set_ylim(0, 1), ax.legend(fontsize=7, loc="upper left")
    ax.set_title("gold score per stage (held-out prompts)")
    fig.tight_layout(), fig.savefig(os.path.join(root, "scores.png"), dpi=100), plt.close(fig)
    made.append("scores.png")
    if report["rm_reliability"]:
        bins = report["rm_reliability"]
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], ":", color="gray", label="calibrated")
        ax.plot([b["mean_predicted"] for b in bins], [b["frequency"] for b in bins], "o-",
                label=f"reward model (ECE {report['rm_ece']:.3f})")
        for b in bins:
            ax.annotate(str(b["count"]), (b["mean_predicted"], b["frequency"]), fontsize=6)
        ax.set_xlabel("σ(r_A − r_B)"), ax.set_ylabel("labeler prefers A (fraction)"), ax.legend(fontsize=7)
        ax.set_title("reward model on held-out label pairs")
        fig.tight_layout(), fig.savefig(os.path.join(root, "rm_calibration.png"), dpi=100), plt.close(fig)
        made.append("rm_calibration.png")
    sft_rows = [r for r in _read_metrics(os.path.join(root, "sft", "metrics.jsonl")) if "eval_loss" in r]
    if sft_rows:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        ax.plot([r["step"] for r in sft_rows], [r["eval_loss"] for r in sft_rows], "o-")
        ax.set_xlabel("SFT step"), ax.set_title("SFT validation loss")
        fig.tight_layout(), fig.savefig(os.path.join(root, "sft_loss.png"), dpi=100), plt.close(fig)
        made.append("sft_loss.png")
    return made


def _read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- files
def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _shown(v) -> str:
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) or "none"
    return _fmt(v)


def _ci(g) -> str:
    """"+0.012 [-0.010, +0.034]" for a mean_with_ci dict; "—" when not measured."""
    return f"{g['mean']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" if g else "—"


def markdown(report: dict, plots: Sequence[str]) -> str:
    r = report
    lines = [f"# InstructGPT pipeline on the built-in task (seed {r['seed']})", "",
             f"{r['eval_prompts']} held-out prompts ({r['eval_held_out_templates']} with paraphrase templates never "
             f"trained on, {r['truncated_prompts']} cut to the prompt length); every policy decoded at temperature "
             f"{r['decoding']['temperature']} (0 = greedy), up to {r['decoding']['max_new_tokens']} tokens, and with "
             f"{r['tau1_samples_per_prompt'] or 0} temperature-1 samples per prompt. Gold judge calls: {r['gold_calls']} "
             f"(labeler {r['gold_calls_by_stage']['label']}, evaluation {r['gold_calls_by_stage']['eval']}, "
             f"oracle run {r['gold_calls_by_stage'].get('oracle', 0)}).", "",
             "## Checks", "", "| check | measured | threshold | passed |", "|---|---|---|---|"]
    for name, c in r["checks"].items():
        lines.append(f"| {name} | {_shown(c['value'])} | {c['threshold']} | {'pass' if c['passed'] else '**fail**'} |")
    lines += ["", "## Oracle headroom", "",
              (f"PPO against the gold judge itself (the upper reference, never the headline): win rate over SFT "
               f"{r['oracle_win_rate']:.3f}, against {r['win_rate_ppo_vs_sft']:.3f} for PPO on the reward model."
               if r["oracle_win_rate"] is not None else "No oracle run in this pipeline.")]
    lines += ["", "## Most repeated responses", "",
              "One answer given to many prompts, of several kinds, is how a policy that found a blind spot of the "
              f"reward model looks. Largest share of prompts given one PPO response that is wrong for them: "
              f"{_fmt(r['max_response_share'])} (`{r['max_response_text'] or ''}`).", ""]
    lines += repetition_table(r["repeated_responses"], r["eval_prompts"])
    lines += ["", "## Gold score per policy", "",
              "| policy | total | correctness | format | verbosity | RM score | tokens |", "|---|---|---|---|---|---|---|"]
    for name in POLICY_ORDER:
        if name in r["gold_components"]:
            m = r["gold_components"][name]
            lines.append(f"| {name} | {m['total']:.3f} | {m['correctness']:.3f} | {m['format']:.3f} | "
                         f"{m['verbosity']:.3f} | {m.get('rm', float('nan')):.3f} | {m['tokens']:.1f} |")
    for name, total in r["gold_tau1"].items():
        lines.append(f"| {name} (τ = 1, mean of samples) | {total:.3f} | | | | | |")
    lines += ["", "## Head to head (gold judge, ties count 1/2, 95% bootstrap CI over prompts)", "",
              "| pair | win rate | CI | wins / ties / losses | gold gain [CI] | correctness gain [CI] |",
              "|---|---|---|---|---|---|"]
    for pair, h in r["win_rates"].items():
        lines.append(f"| {pair.replace('_vs_', ' vs ')} | {h['win_rate']:.3f} | [{h['ci_low']:.3f}, {h['ci_high']:.3f}] | "
                     f"{h['wins']} / {h['ties']} / {h['losses']} | {_ci(h.get('gold_gain'))} | {h['correctness_gain']:+.3f} "
                     f"[{h['correctness_gain_ci_low']:+.3f}, {h['correctness_gain_ci_high']:+.3f}] |")
    if r["win_rate_tau1"] is not None:
        lines.append(f"| ppo vs sft at τ = 1 ({r['tau1_samples_per_prompt']} paired samples per prompt) | "
                     f"{r['win_rate_tau1']:.3f} | [{r['win_rate_tau1_ci_low']:.3f}, {r['win_rate_tau1_ci_high']:.3f}] | | "
                     f"{r['gold_gain_tau1']:+.3f} [{r['gold_gain_tau1_ci_low']:+.3f}, {r['gold_gain_tau1_ci_high']:+.3f}] | |")
    lines += ["", "PPO vs SFT (greedy) by instruction kind:", "", "| kinds | win rate | gold gain [CI] |", "|---|---|---|"]
    if r["win_rate_original_kinds"] is not None:
        lines.append(f"| the original seven, plain requests | {r['win_rate_original_kinds']:.3f} | "
                     f"{_ci(r['gold_gain_original_kinds'])} |")
    if r.get("win_rate_format_instructions") is not None:
        lines.append(f"| with a format instruction (new) | {r['win_rate_format_instructions']:.3f} | "
                     f"{_ci(r['gold_gain_format_instructions'])} |")
    lines += [f"| {k} | {r['win_rate_by_kind'][k]:.3f} | {_ci(g)} |" for k, g in r["gold_gain_by_kind"].items()]
    lines += ["", "## Reward model and labeler", ""]
    if r["rm_accuracy_heldout_labels"] is not None:
        lines += [f"On the labeler's rankings of the reward model's held-out label prompts ({r['heldout_label_rankings']} "
                  f"rankings, {r['heldout_label_pairs']} pairs the labeler separates; ties count 1/2):", "",
                  "| scorer | agreement with the labeler |", "|---|---|",
                  f"| reward model | **{r['rm_accuracy_heldout_labels']:.3f}** |",
                  f"| labeler ceiling (noiseless gold order) | {r['labeler_ceiling_heldout_labels']:.3f} |",
                  f"| SFT policy's summed log-prob | {r['sft_logprob_heldout_labels']:.3f} |",
                  f"| longer answer (characters) | {r['longer_answer_heldout_labels']:.3f} |", "",
                  f"Calibration of σ(r_A − r_B) (raw reward-model scores) against the labeler's preference, each pair "
                  f"in both orientations, 10 bins: expected calibration error **{r['rm_ece']:.3f}** (rm_calibration.png).", ""]
    lines += [f"- reward-model accuracy against the noiseless gold order: **{r['rm_accuracy']:.3f}** on "
              f"{r['rm_accuracy_pairs']} non-tied pairs of SFT samples for held-out eval prompts "
              f"(its own eval split of labeler rankings: {_fmt(r['rm_accuracy_own_eval'])})",
              f"- labeler agreement with gold: **{r['labeler_agreement']:.3f}** on {r['labeler_pairs']} non-tied pairs "
              f"({r['labeling']['rankings']} rankings, {r['labeling']['comparisons']} comparisons; skipped "
              f"{r['labeling']['skipped_all_tied']} all-tied, {r['labeling']['skipped_empty_sample']} with an empty sample)",
              ""] + breakdown_table(r["rm_accuracy_breakdown"]) + [
              "", "## KL and over-optimization", "",
              f"KL(PPO ‖ SFT) = **{r['kl_ppo_sft']:.3f}** nats per response (sum of k1 over τ = 1 samples)"
              + (f"; budget {r['kl_budget']}" if r["kl_budget"] else "") + ". Best-of-n's KL is measured per prompt: "
              "the exact KL of best-of-n over the distinct samples drawn (their SFT log-probs, renormalized), "
              "next to the bound log n − (n − 1)/n that holds for samples that never repeat.", "",
              "| point | KL | KL bound | gold total | gold gain over best-of-1 [paired CI] | RM score |",
              "|---|---|---|---|---|---|"]
    for n, b in sorted(r["best_of_n"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| best-of-{n} (SFT samples) | {b['kl']:.3f} | {b.get('kl_bound', float('nan')):.3f} | "
                     f"{b['total']:.3f} | {_ci(b.get('gold_gain_vs_1'))} | {b['rm']:.3f} |")
    for p in r["overoptimization"]:
        lines.append(f"| PPO iteration {p['step']} (τ = 1) | {p['kl']:.3f} | | {p['gold']:.3f} | | {p['rm']:.3f} |")
    if len(r.get("algorithms", {})) > 1:  # pipeline.algorithms: the methods side by side (docs/ALGORITHMS.md)
        lines += ["", "## Methods from the same SFT policy and rankings (gold judge; win rate vs SFT, greedy, ties 1/2)",
                  "", "| method | gold greedy | gold τ = 1 | win rate [CI] | win rate τ = 1 | KL from SFT | "
                  "generated tokens | gold calls | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for name, a in r["algorithms"].items():
            lines.append(f"| {name} | {_shown(a['gold_greedy'])} | {_shown(a['gold_tau1'])} | {a['win_rate']:.3f} "
                         f"[{a['win_rate_ci_low']:.3f}, {a['win_rate_ci_high']:.3f}] | {_shown(a['win_rate_tau1'])} | "
                         f"{_shown(a['kl'])} | {_shown(a['generated_tokens'])} | {a['gold_calls']} | "
                         f"{_shown(a['seconds'])} |")
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["seconds"].items()]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def breakdown_table(b: dict) -> list[str]:
    """Markdown rows of the reward model's accuracy by kind, template split and kind of difference."""
    lines = ["| pairs of SFT samples | RM accuracy | pairs |", "|---|---|---|"]
    for group, label in (("by_kind", "kind {}"), ("by_template", "{} templates"), ("by_difference", "differ in {}")):
        for name, a in b[group].items():
            lines.append(f"| {label.format(name)} | {_fmt(a['accuracy'])} | {a['pairs']} |")
    if "policy_logprob" in b:
        a = b["policy_logprob"]
        lines.append(f"| all, ranked by the SFT policy's own mean log-prob per token (baseline) | "
                     f"{_fmt(a['accuracy'])} | {a['pairs']} |")
    return lines


def repetition_table(rep: dict, prompts: int) -> list[str]:
    """Markdown rows: per policy, its distinct responses and the most repeated ones with their kinds."""
    lines = ["| policy | distinct responses | most repeated (prompts: kinds) |", "|---|---|---|"]
    for name in (n for n in POLICY_ORDER if n in rep):
        top = "; ".join(f"`{t['text'] or '(empty)'}` ({t['prompts']}: {', '.join(t['kinds'])})" for t in rep[name]["top"])
        lines.append(f"| {name} | {rep[name]['distinct']} of {prompts} | {top.replace('|', '/')} |")
    return lines


def write_report(report: dict, results: dict, root: str) -> None:
    plots = _plots(report, results, root)
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(markdown(report, plots))


def console_summary(r: dict) -> str:
    """One screen: the checks and the headline numbers."""
    gs = "  ".join(f"{k} {v:.3f}" for k, v in r["gold_score"].items())
    lines = ["", "=" * 72, f"InstructGPT pipeline, seed {r['seed']}: {r['eval_prompts']} held-out prompts, "
             f"{r['seconds']['total']:.0f} s", "-" * 72,
             f"gold total      {gs}",
             f"PPO vs SFT      win rate {r['win_rate_ppo_vs_sft']:.3f} [{r['win_rate_ci_low']:.3f}, "
             f"{r['win_rate_ci_high']:.3f}]  (W/T/L {'/'.join(map(str, r['wins_ties_losses']))})",
             f"correctness     gain {r['correctness_gain']:+.3f} [{r['correctness_gain_ci_low']:+.3f}, "
             f"{r['correctness_gain_ci_high']:+.3f}]",
             f"PPO vs SFT τ=1  win rate {_fmt(r['win_rate_tau1'])} (CI low {_fmt(r['win_rate_tau1_ci_low'])}); "
             f"gold gain CI low {_fmt(r['gold_gain_tau1_ci_low'])}",
             f"reward model    accuracy vs gold {r['rm_accuracy']:.3f}; labeler agreement {r['labeler_agreement']:.3f}",
             f"held-out labels RM {_fmt(r['rm_accuracy_heldout_labels'])}, labeler ceiling "
             f"{_fmt(r['labeler_ceiling_heldout_labels'])}, SFT log-prob {_fmt(r['sft_logprob_heldout_labels'])}, "
             f"longer {_fmt(r['longer_answer_heldout_labels'])}; ECE {_fmt(r['rm_ece'])}",
             f"KL(PPO||SFT)    {r['kl_ppo_sft']:.3f} nats; gold calls {r['gold_calls']}", "-" * 72]
    lines += [f"{'PASS' if c['passed'] else 'FAIL'}  {name}  ({c['threshold']})" for name, c in r["checks"].items()]
    lines.append("=" * 72)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several seeds
HEADLINE = ("win_rate_ppo_vs_sft", "win_rate_ci_low", "correctness_gain_ci_low", "win_rate_tau1",
            "win_rate_tau1_ci_low", "gold_gain_tau1_ci_low", "max_response_share", "rm_accuracy",
            "rm_accuracy_heldout_labels", "labeler_ceiling_heldout_labels", "rm_ece", "labeler_agreement",
            "oracle_win_rate", "kl_ppo_sft", "gold_calls")


def _seed_value(report: dict, key: str):
    """A headline key, `gold_score.<policy>` or `algorithms.<method>.<field>` of one seed's report (None: absent)."""
    if key.startswith("gold_score."):
        return report["gold_score"].get(key.split(".", 1)[1])
    if key.startswith("algorithms."):
        _, method, field = key.split(".", 2)
        return report.get("algorithms", {}).get(method, {}).get(field)
    return report.get(key)


def aggregate_seeds(reports: Sequence[dict]) -> dict:
    """Mean and std over seeds of the headline numbers (nan where a seed did not measure one), each policy's gold
    total and every field of the methods table (`algorithms.<method>.<field>`); every seed's checks."""
    out = {"seeds": [r["seed"] for r in reports], "mean": {}, "std": {}}
    keys = list(HEADLINE) + [f"gold_score.{k}" for k in reports[0]["gold_score"]]
    methods = reports[0].get("algorithms", {})
    keys += [f"algorithms.{m}.{f}" for m in methods for f in ALGORITHM_FIELDS] if len(methods) > 1 else []
    for k in keys:
        vals = [_seed_value(r, k) for r in reports]
        vals = [float("nan") if v is None else v for v in vals]
        out["mean"][k], out["std"][k] = float(np.mean(vals)), float(np.std(vals))
    out["checks"] = {r["seed"]: {name: c["passed"] for name, c in r["checks"].items()} for r in reports}
    out["checks_passed"] = {r["seed"]: all(c["passed"] for c in r["checks"].values()) for r in reports}
    return out


def write_seed_report(combined: dict, reports: Sequence[dict], root: str) -> None:
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump({**combined, "per_seed": list(reports)}, f, indent=2)
    seeds = list(combined["checks"])
    lines = [f"# InstructGPT pipeline over seeds {combined['seeds']}", "", "## Checks per seed", "",
             "| check | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name in combined["checks"][seeds[0]]:
        lines.append(f"| {name} | " + " | ".join("pass" if combined["checks"][s].get(name) else "**fail**"
                                                for s in seeds) + " |")
    lines += ["", "## Headline numbers", "", "| metric | mean ± std | per seed |", "|---|---|---|"]
    for k in combined["mean"]:
        per = ", ".join(_fmt(_seed_value(r, k)) for r in reports)
        lines.append(f"| {k} | {combined['mean'][k]:.3f} ± {combined['std'][k]:.3f} | {per} |")
    lines += ["", "All checks passed per seed: " + ", ".join(f"{s}: {'yes' if ok else 'no'}"
                                                          for s, ok in combined["checks_passed"].items()), "",
              "Each seed's full report: `seed_<S>/report.md`.", ""]
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)
