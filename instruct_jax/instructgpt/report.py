"""The pipeline's report: report.json (numbers), report.md (tables + plots), a one-screen console summary.

`build_report(cfg, results)` reads the stages' results (their DONE.json contents) and adds the
acceptance checks, each with its threshold, so a reader sees at once whether RLHF helped:

    ppo_beats_sft           win rate of PPO over SFT by the gold judge >= 0.65 and its CI low > 0.5
    correctness_gain        CI low of PPO's per-prompt correctness gain over SFT > 0
    ppo_beats_best_of_4     PPO's gold total > best-of-4's (reward-model pick of 4 SFT samples)
    rm_accuracy             reward model vs the noiseless gold order >= 0.80 and > the labeler's agreement
    labeler_agreement       the labeler's agreement with gold in [0.70, 0.85]
    kl_budget               KL(PPO || SFT) <= pipeline.kl_budget (when set)
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from instruct_jax.config import Config

POLICY_ORDER = ("base", "sft", "best_of_4", "best_of_16", "ppo")


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
        "gold_calls": label["gold_calls"] + ev["gold_calls_eval"],
        "gold_calls_by_stage": {"label": label["gold_calls"], "eval": ev["gold_calls_eval"]},
        "eval_prompts": ev["prompts"], "eval_held_out_templates": ev["held_out_prompts"],
        "decoding": ev["decoding"],
        "labeling": {k: label[k] for k in ("rankings", "comparisons", "skipped_all_tied", "skipped_empty_sample",
                                           "mean_distinct_responses")},
        "task": results["task"],
        "seconds": {stage: r.get("seconds", 0.0) for stage, r in results.items()},
    }
    report["seconds"]["total"] = float(sum(report["seconds"].values()))
    report["checks"] = checks(report)
    return report


def checks(r: dict) -> dict:
    """Each acceptance criterion: the measured value(s), the threshold, and whether it passed."""
    c = {
        "ppo_beats_sft": {"value": [r["win_rate_ppo_vs_sft"], r["win_rate_ci_low"]], "threshold": "win >= 0.65, CI low > 0.5",
                          "passed": r["win_rate_ppo_vs_sft"] >= 0.65 and r["win_rate_ci_low"] > 0.5},
        "correctness_gain": {"value": r["correctness_gain_ci_low"], "threshold": "CI low > 0",
                             "passed": r["correctness_gain_ci_low"] > 0},
        "rm_accuracy": {"value": [r["rm_accuracy"], r["labeler_agreement"]], "threshold": ">= 0.80 and > labeler",
                        "passed": r["rm_accuracy"] >= 0.80 and r["rm_accuracy"] > r["labeler_agreement"]},
        "labeler_agreement": {"value": r["labeler_agreement"], "threshold": "in [0.70, 0.85]",
                              "passed": 0.70 <= r["labeler_agreement"] <= 0.85},
    }
    if "best_of_4" in r["gold_score"]:
        c["ppo_beats_best_of_4"] = {"value": [r["gold_score"]["ppo"], r["gold_score"]["best_of_4"]],
                                    "threshold": "ppo > best_of_4",
                                    "passed": r["gold_score"]["ppo"] > r["gold_score"]["best_of_4"]}
    if r["kl_budget"] > 0:
        c["kl_budget"] = {"value": r["kl_ppo_sft"], "threshold": f"<= {r['kl_budget']}",
                          "passed": r["kl_ppo_sft"] <= r["kl_budget"]}
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
                           label="best-of-n (analytic KL)")
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


def markdown(report: dict, plots: Sequence[str]) -> str:
    r = report
    lines = [f"# InstructGPT pipeline on the built-in task (seed {r['seed']})", "",
             f"{r['eval_prompts']} held-out prompts ({r['eval_held_out_templates']} with paraphrase templates never "
             f"trained on); every policy decoded at temperature {r['decoding']['temperature']} "
             f"(0 = greedy), up to {r['decoding']['max_new_tokens']} tokens. Gold judge calls: {r['gold_calls']} "
             f"(labeler {r['gold_calls_by_stage']['label']}, evaluation {r['gold_calls_by_stage']['eval']}).", "",
             "## Checks", "", "| check | measured | threshold | passed |", "|---|---|---|---|"]
    for name, c in r["checks"].items():
        v = c["value"]
        shown = ", ".join(_fmt(x) for x in v) if isinstance(v, list) else _fmt(v)
        lines.append(f"| {name} | {shown} | {c['threshold']} | {'yes' if c['passed'] else '**no**'} |")
    lines += ["", "## Gold score per policy", "",
              "| policy | total | correctness | format | verbosity | RM score | tokens |", "|---|---|---|---|---|---|---|"]
    for name in POLICY_ORDER:
        if name in r["gold_components"]:
            m = r["gold_components"][name]
            lines.append(f"| {name} | {m['total']:.3f} | {m['correctness']:.3f} | {m['format']:.3f} | "
                         f"{m['verbosity']:.3f} | {m.get('rm', float('nan')):.3f} | {m['tokens']:.1f} |")
    lines += ["", "## Head to head (gold judge, ties count 1/2, 95% bootstrap CI over prompts)", "",
              "| pair | win rate | CI | wins / ties / losses | correctness gain [CI] |", "|---|---|---|---|---|"]
    for pair, h in r["win_rates"].items():
        lines.append(f"| {pair.replace('_vs_', ' vs ')} | {h['win_rate']:.3f} | [{h['ci_low']:.3f}, {h['ci_high']:.3f}] | "
                     f"{h['wins']} / {h['ties']} / {h['losses']} | {h['correctness_gain']:+.3f} "
                     f"[{h['correctness_gain_ci_low']:+.3f}, {h['correctness_gain_ci_high']:+.3f}] |")
    lines += ["", "## Reward model and labeler", "",
              f"- reward-model accuracy against the noiseless gold order: **{r['rm_accuracy']:.3f}** on "
              f"{r['rm_accuracy_pairs']} non-tied pairs of SFT samples for held-out prompts "
              f"(its own eval split of labeler rankings: {_fmt(r['rm_accuracy_own_eval'])})",
              f"- labeler agreement with gold: **{r['labeler_agreement']:.3f}** on {r['labeler_pairs']} non-tied pairs "
              f"({r['labeling']['rankings']} rankings, {r['labeling']['comparisons']} comparisons; skipped "
              f"{r['labeling']['skipped_all_tied']} all-tied, {r['labeling']['skipped_empty_sample']} with an empty sample)",
              ""] + breakdown_table(r["rm_accuracy_breakdown"]) + [
              "", "## KL and over-optimization", "",
              f"KL(PPO ‖ SFT) = **{r['kl_ppo_sft']:.3f}** nats per response (sum of k1 over τ = 1 samples)"
              + (f"; budget {r['kl_budget']}" if r["kl_budget"] else "") + ".", "",
              "| point | KL | gold total | RM score |", "|---|---|---|---|"]
    for n, b in sorted(r["best_of_n"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| best-of-{n} (SFT samples) | {b['kl']:.3f} | {b['total']:.3f} | {b['rm']:.3f} |")
    for p in r["overoptimization"]:
        lines.append(f"| PPO iteration {p['step']} (τ = 1) | {p['kl']:.3f} | {p['gold']:.3f} | {p['rm']:.3f} |")
    lines += ["", "## Most repeated responses", "",
              "One answer given to many prompts, of several kinds, is how a policy that found a blind spot of the "
              "reward model looks.", ""] + repetition_table(r["repeated_responses"], r["eval_prompts"])
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
             f"reward model    accuracy vs gold {r['rm_accuracy']:.3f}; labeler agreement {r['labeler_agreement']:.3f}",
             f"KL(PPO||SFT)    {r['kl_ppo_sft']:.3f} nats; gold calls {r['gold_calls']}", "-" * 72]
    lines += [f"{'PASS' if c['passed'] else 'FAIL'}  {name}  ({c['threshold']})" for name, c in r["checks"].items()]
    lines.append("=" * 72)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- several seeds
HEADLINE = ("win_rate_ppo_vs_sft", "win_rate_ci_low", "correctness_gain_ci_low", "rm_accuracy", "labeler_agreement",
            "kl_ppo_sft", "gold_calls")


def aggregate_seeds(reports: Sequence[dict]) -> dict:
    """Mean and std over seeds of the headline numbers and each policy's gold total."""
    out = {"seeds": [r["seed"] for r in reports], "mean": {}, "std": {}}
    keys = list(HEADLINE) + [f"gold_score.{k}" for k in reports[0]["gold_score"]]
    for k in keys:
        vals = [r["gold_score"][k.split(".", 1)[1]] if k.startswith("gold_score.") else r[k] for r in reports]
        out["mean"][k], out["std"][k] = float(np.mean(vals)), float(np.std(vals))
    out["checks_passed"] = {r["seed"]: all(c["passed"] for c in r["checks"].values()) for r in reports}
    return out


def write_seed_report(combined: dict, reports: Sequence[dict], root: str) -> None:
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump({**combined, "per_seed": list(reports)}, f, indent=2)
    lines = [f"# InstructGPT pipeline over seeds {combined['seeds']}", "", "| metric | mean ± std | per seed |",
             "|---|---|---|"]
    for k in combined["mean"]:
        per = ", ".join(_fmt(r["gold_score"][k.split('.', 1)[1]] if k.startswith("gold_score.") else r[k])
                        for r in reports)
        lines.append(f"| {k} | {combined['mean'][k]:.3f} ± {combined['std'][k]:.3f} | {per} |")
    lines += ["", "All checks passed per seed: " + ", ".join(f"{s}: {'yes' if ok else 'no'}"
                                                          for s, ok in combined["checks_passed"].items()), "",
              "Each seed's full report: `seed_<S>/report.md`.", ""]
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines), flush=True)
