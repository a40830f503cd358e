"""Evaluate policies on prompts: decode, score by the gold judge and the reward model, compare.

    rows, summary = evaluate(runner, policies, prompts, settings, scorer=scorer, judge=judge)

`policies` maps a name to params (e.g. {"base": …, "sft": …, "ppo": …}); every policy is decoded
the same declared way (`settings.temperature`, 0 = greedy). Then, when asked for:

  best-of-n      `max(best_of)` samples per prompt from `settings.best_of_policy` at `best_of_temperature`;
                 best-of-n keeps the reward model's favourite of the first n; its KL is measured per prompt
                 as the exact KL of best-of-n over the distinct samples drawn (their sampler log-probs,
                 `best_of_n_kl_exact`), next to the bound log n - (n-1)/n; its gold gain over best-of-1
                 with a paired bootstrap CI over prompts
  tau = 1        `tau1_samples` temperature-1 samples per prompt of each `tau1_policies` policy (the policy
                 best-of-n samples from reuses its first best-of-n samples when they are at temperature 1):
                 the regime PPO trains in. Win rate pairs A's i-th sample with B's i-th (ties 1/2), averaged
                 per prompt; gold gain = A's mean over samples - B's; both with bootstrap CIs over prompts
  RM accuracy    on those samples: pairs the noiseless gold order separates, RM ties count 1/2; broken down
                 by kind, template split and kind of difference, next to the sampling policy's own
                 log-prob as a reward model (`rm_accuracy_breakdown`)
  KL(a || b)     `kl_samples` temperature-1 samples of a per prompt; per-response sum of k1 = log p_a - log p_b
  win rates      head to head by gold totals (by reward-model score when there is no judge), ties 1/2,
                 with a 95% bootstrap CI over prompts; the per-prompt correctness and gold gains' CIs, also
                 on the original seven kinds alone and per kind
  repetition     each policy's number of distinct responses and its most repeated ones, with the task kinds
                 they answer (`repeated_responses`): one answer given to many prompts of different kinds is
                 what a policy that found a reward model's blind spot looks like; `max_response_share`,
                 the largest share of prompts given one response that is not a correct answer for them
  truncation     prompts longer than the runner's prompt length lose their start; each row says whether
                 its prompt was cut ("prompt_truncated") and the summary counts them

`rows` (one per prompt; written to eval_samples.jsonl) hold every response with its gold components,
reward-model score and, for sampled ones, the sampler's log-prob "logp", so every number in `summary`
can be recomputed from them (`summarize(rows, settings)` does exactly that).

`heldout_label_summary(rankings)` scores the labeler's held-out rankings (the reward model's own eval
split): reward-model accuracy against the labeler, next to the labeler ceiling (the noiseless gold order
against the same noisy rankings), the SFT policy's summed log-prob and the longer answer; and the reward
model's calibration, sigma(r_A - r_B) against the labeler's preferences.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from instruct_jax.data.build import is_eval
from instruct_jax.data.config import DataConfig
from instruct_jax.data.formats import row_to_record
from instruct_jax.inference.runner import PolicyRunner
from instruct_jax.instructgpt.gold import WEIGHTS, GoldJudge
from instruct_jax.instructgpt.statistics import (agreement_rate, best_of_n_kl, best_of_n_kl_exact, bootstrap_ci,
                                                 calibration, head_to_head, max_response_share, mean_with_ci,
                                                 outcomes, pair_agreement, paired_sample_outcomes)
from instruct_jax.instructgpt.task import ORIGINAL_KINDS, TaskPrompt

COMPONENTS = tuple(WEIGHTS) + ("total",)


@dataclasses.dataclass
class EvalSettings:
    temperature: float = 0.0  # decoding of every policy (0 = greedy)
    max_new_tokens: int = 24
    best_of: tuple = (4, 16)  # n values; () = no best-of-n
    best_of_policy: str = "sft"  # the policy best-of-n samples from
    best_of_temperature: float = 1.0  # temperature of those samples (also the reward-model accuracy pairs)
    kl_pairs: tuple = (("ppo", "sft"),)  # (a, b): KL(a || b) on a's temperature-1 samples
    kl_samples: int = 2
    win_pairs: tuple = (("ppo", "sft"),)  # (a, b): head-to-head win rate of a over b (greedy and tau = 1)
    tau1_samples: int = 0  # temperature-1 samples per prompt of each tau1 policy (0 = no tau = 1 evaluation)
    tau1_policies: tuple = ("sft", "ppo")  # the policies sampled at tau = 1 (those present)
    seed: int = 0


@dataclasses.dataclass
class EvalPrompt:
    """A prompt to evaluate on: chat messages, and the task spec when the gold judge can score it."""

    messages: list[dict]
    spec: Optional[dict] = None  # TaskSpec.to_dict(), or None (no gold score)

    @classmethod
    def from_task(cls, p: TaskPrompt) -> "EvalPrompt":
        return cls(list(p.messages), p.spec.to_dict())

    def task_prompt(self) -> TaskPrompt:
        return TaskPrompt.from_row({"prompt": self.messages[-1]["content"], "spec": self.spec})


def _scored(texts: Sequence[str], prompts: Sequence[EvalPrompt], scorer, judge: Optional[GoldJudge]) -> list[dict]:
    """[{"text", "rm"?, "gold"?: {correctness, format, verbosity, total}}] for one response per prompt."""
    out = [{"text": t} for t in texts]
    if scorer is not None:
        for o, s in zip(out, scorer.score([(p.messages, t) for p, t in zip(prompts, texts)])):
            o["rm"] = float(s)
    if judge is not None:
        for o, p, t in zip(out, prompts, texts):
            if p.spec is not None:
                o["gold"] = dataclasses.asdict(judge.score(p.task_prompt().spec, t))
    return out


def generate_scored(runner: PolicyRunner, params, prompts: Sequence[EvalPrompt], *, temperature: float,
                    max_new_tokens: int, seed: int, scorer=None, judge=None, logprob_under=None):
    """One scored response per prompt (+ "logp" and "logp_ref" under `logprob_under` params when given)."""
    gen = runner.generate(params, [p.messages for p in prompts], temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed)
    out = _scored(gen.texts, prompts, scorer, judge)
    for o, n, done, lp in zip(out, gen.lengths, gen.done, gen.logprob):
        o["tokens"], o["stopped"] = int(n), bool(done)
        if temperature > 0:  # the sampler's own log-prob of its sample (greedy decoding has none)
            o["logp"] = float(lp)
    if logprob_under is not None:
        for o, lr in zip(out, runner.logprob(logprob_under, gen, temperature=1.0)):
            o["logp_ref"] = float(lr)
    return out


def evaluate(runner: PolicyRunner, policies: dict[str, Any], prompts: Sequence[EvalPrompt], settings: EvalSettings,
             scorer=None, judge: Optional[GoldJudge] = None, progress=None) -> tuple[list[dict], dict]:
    """Decode and score every policy; returns (rows, summary). `progress(n)` is called as work completes."""
    tick = progress or (lambda n: None)
    cut = runner.truncated([p.messages for p in prompts])
    rows = [{"prompt": p.messages[-1]["content"], "messages": p.messages, "spec": p.spec, "prompt_truncated": bool(c),
             "responses": {}} for p, c in zip(prompts, cut)]
    for j, (name, params) in enumerate(policies.items()):
        outs = generate_scored(runner, params, prompts, temperature=settings.temperature,
                               max_new_tokens=settings.max_new_tokens, seed=settings.seed * 1000 + j,
                               scorer=scorer, judge=judge)
        for row, o in zip(rows, outs):
            row["responses"][name] = o
        tick(1)
    if settings.best_of and settings.best_of_policy in policies:
        for i in range(max(settings.best_of)):
            outs = generate_scored(runner, policies[settings.best_of_policy], prompts,
                                   temperature=settings.best_of_temperature,
                                   max_new_tokens=settings.max_new_tokens, seed=settings.seed * 1000 + 100 + i,
                                   scorer=scorer, judge=judge)
            for row, o in zip(rows, outs):
                row.setdefault("samples", []).append(o)
        tick(1)
    for name in policies:  # the i-th sample of every policy drawn with one key, whatever the other policies
        if name not in settings.tau1_policies or not settings.tau1_samples:
            continue
        reuse = (name == settings.best_of_policy and settings.best_of_temperature == 1.0
                 and len(rows[0].get("samples", ())) >= settings.tau1_samples)
        for i in range(settings.tau1_samples):
            outs = [r["samples"][i] for r in rows] if reuse else generate_scored(
                runner, policies[name], prompts, temperature=1.0, max_new_tokens=settings.max_new_tokens,
                seed=settings.seed * 1000 + 400 + i, scorer=scorer, judge=judge)
            for row, o in zip(rows, outs):
                row.setdefault("tau1", {}).setdefault(name, []).append(o)
        tick(1)
    for a, b in settings.kl_pairs:
        if a not in policies or b not in policies:
            continue
        for i in range(settings.kl_samples):
            outs = generate_scored(runner, policies[a], prompts, temperature=1.0,
                                   max_new_tokens=settings.max_new_tokens, seed=settings.seed * 1000 + 200 + i,
                                   scorer=scorer, judge=judge, logprob_under=policies[b])
            for row, o in zip(rows, outs):
                row.setdefault("kl_samples", {}).setdefault(f"{a}||{b}", []).append(o)
        tick(1)
    return rows, summarize(rows, settings)


def tau1_policy_count(policies, settings: EvalSettings) -> int:
    """How many policies evaluate() samples at tau = 1 (one progress tick each)."""
    return sum(1 for n in policies if n in settings.tau1_policies) if settings.tau1_samples else 0


# ----------------------------------------------------------------------------- summary (from rows only)
def _value(o: dict, key: str) -> float:
    """A response's gold component ("total", "correctness", …) or its reward-model score ("rm")."""
    return float(o["rm"]) if key == "rm" else float(o["gold"][key])


def best_of_n_pick(samples: Sequence[dict], n: int) -> dict:
    """The reward model's favourite of the first n samples (first one on ties)."""
    first = samples[:n]
    return first[int(np.argmax([s["rm"] for s in first]))]


def best_of_n_kl_measured(samples: Sequence[dict], n: int) -> float:
    """KL(best-of-n || sampler) for one prompt: exact over its distinct samples (by stripped text, each with
    its first "logp" and "rm"), i.e. the sampler restricted to what it was seen to draw."""
    first: dict = {}
    for o in samples:
        first.setdefault(o["text"].strip(), o)
    return best_of_n_kl_exact([o["logp"] for o in first.values()], [o["rm"] for o in first.values()], n)


def kl_k1(samples: Sequence[dict]) -> float:
    """Mean over samples of the per-response k1 sum log p_a - log p_b."""
    return float(np.mean([s["logp"] - s["logp_ref"] for s in samples]))


def _means(outs: Sequence[dict], has_gold: bool, has_rm: bool) -> dict:
    m = {}
    if has_gold:
        for c in COMPONENTS:
            m[c] = float(np.mean([_value(o, c) for o in outs]))
        asked = [o["gold"]["instruction"] for o in outs if o["gold"].get("instruction") is not None]
        if asked:  # responses to prompts with a format instruction: the fraction that followed it
            m["instruction_followed"] = float(np.mean(asked))
    if has_rm:
        m["rm"] = float(np.mean([o["rm"] for o in outs]))
    m["tokens"] = float(np.mean([o["tokens"] for o in outs]))
    m["stopped"] = float(np.mean([o["stopped"] for o in outs]))
    return m


def _accuracy(rows: Sequence[dict], score: Callable[[dict], float], **split) -> dict:
    """Pooled agreement of `score` on the samples with the gold order: {"accuracy", "pairs"}."""
    counts = []
    for r in rows:
        gold = [o["gold"]["total"] for o in r["samples"]]
        same = [o["gold"]["correctness"] for o in r["samples"]] if split else None
        counts.append(pair_agreement([score(o) for o in r["samples"]], gold, same, **split))
    return {"accuracy": agreement_rate(counts), "pairs": int(sum(c[1] for c in counts))}


def rm_accuracy_breakdown(rows: Sequence[dict]) -> dict:
    """Where the reward model ranks the samples like gold, and a baseline it should beat.

    by_kind / by_template: per task kind, and held-out paraphrase vs training templates.
    by_difference: pairs whose correctness differs ("correctness") vs pairs equal in correctness
    that differ only in format or verbosity ("style").
    policy_logprob: the same pairs ranked by the sampling policy's own mean log-prob per token, a
    reward model that knows only what the policy knows (absent without the samples' "logp").
    """
    out: dict = {"by_kind": {}, "by_template": {}}
    for kind in sorted({r["spec"]["kind"] for r in rows}):
        out["by_kind"][kind] = _accuracy([r for r in rows if r["spec"]["kind"] == kind], lambda o: o["rm"])
    for name, held in (("held_out", True), ("train", False)):
        part = [r for r in rows if bool(r["spec"].get("held_out")) == held]
        if part:
            out["by_template"][name] = _accuracy(part, lambda o: o["rm"])
    out["by_difference"] = {"correctness": _accuracy(rows, lambda o: o["rm"], want_same=False),
                            "style": _accuracy(rows, lambda o: o["rm"], want_same=True)}
    if all("logp" in o for r in rows for o in r["samples"]):
        out["policy_logprob"] = _accuracy(rows, lambda o: o["logp"] / max(o["tokens"], 1))
    return out


def repeated_responses(rows: Sequence[dict], top: int = 3) -> dict:
    """Per policy: how many distinct responses it gave, and its `top` most repeated ones.

    {"sft": {"distinct": 180, "top": [{"text": "9", "prompts": 12, "kinds": ["add", "count"]}, ...]}}
    (whitespace-stripped texts; "kinds" only where the prompts have task specs; ties in count by text).
    """
    out = {}
    for name in rows[0]["responses"]:
        by_text: dict = collections.defaultdict(list)
        for r in rows:
            by_text[r["responses"][name]["text"].strip()].append(r)
        ranked = sorted(by_text.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:top]
        out[name] = {"distinct": len(by_text),
                     "top": [{"text": text, "prompts": len(rs),
                              "kinds": sorted({r["spec"]["kind"] for r in rs if r["spec"]})} for text, rs in ranked]}
    return out


def gains(rows: Sequence[dict], a: str, b: str, seed: int = 0) -> dict:
    """A's gold gain over B (greedy responses, per prompt) with bootstrap CIs: on every prompt, on the
    original seven kinds alone (with their win rate), and per kind (with its win rate)."""
    ga = np.array([_value(r["responses"][a], "total") for r in rows])
    gb = np.array([_value(r["responses"][b], "total") for r in rows])
    kinds = np.array([r["spec"]["kind"] for r in rows])

    def part(sel) -> dict:
        return {"win_rate": float(outcomes(ga[sel], gb[sel]).mean()), "gold_gain": mean_with_ci(ga[sel] - gb[sel], seed)}

    formats = np.array([(r["spec"].get("params") or {}).get("format") or "" for r in rows])
    out = {"gold_gain": mean_with_ci(ga - gb, seed), "by_kind": {k: part(kinds == k) for k in sorted(set(kinds))}}
    # "today's seven kinds": their plain requests; a format instruction (task.FORMATS) makes a new kind of prompt
    original = np.isin(kinds, ORIGINAL_KINDS) & (formats == "")
    out["original_kinds"] = part(original) if original.any() else None
    out["format_instructions"] = part(formats != "") if (formats != "").any() else None
    out["by_format"] = {f: part(formats == f) for f in sorted(set(formats) - {""})}
    return out


def tau1_summary(rows: Sequence[dict], settings: EvalSettings, has_gold: bool, has_rm: bool) -> dict:
    """Means of each policy's tau = 1 samples; paired win rates and gold gains with bootstrap CIs over prompts."""
    names = list(rows[0]["tau1"])
    key = "total" if has_gold else "rm"
    out = {"samples_per_prompt": len(rows[0]["tau1"][names[0]]), "temperature": 1.0, "policies": {}, "win_rates": {}}
    for name in names:
        out["policies"][name] = _means([o for r in rows for o in r["tau1"][name]], has_gold, has_rm)
    for a, b in settings.win_pairs:
        if a in names and b in names:
            va = np.array([[_value(o, key) for o in r["tau1"][a]] for r in rows])
            vb = np.array([[_value(o, key) for o in r["tau1"][b]] for r in rows])
            h = mean_with_ci(paired_sample_outcomes(va, vb), settings.seed)
            h["win_rate"] = h.pop("mean")
            h[f"{'gold' if has_gold else 'rm'}_gain"] = mean_with_ci(va.mean(axis=1) - vb.mean(axis=1), settings.seed)
            out["win_rates"][f"{a}_vs_{b}"] = h
    return out


def summarize(rows: Sequence[dict], settings: EvalSettings) -> dict:
    """Every reported number, recomputed from the rows alone."""
    has_gold = all(r["spec"] is not None for r in rows)
    first = rows[0]["responses"]
    has_rm = all("rm" in o for o in first.values())
    key = "total" if has_gold else "rm"
    s: dict = {"prompts": len(rows), "judged_by": "gold" if has_gold else ("reward model" if has_rm else "none"),
               "decoding": {"temperature": settings.temperature, "max_new_tokens": settings.max_new_tokens},
               "policies": {}}
    held = np.array([bool(r["spec"] and r["spec"].get("held_out")) for r in rows])
    s["held_out_prompts"] = int(held.sum())
    s["truncated_prompts"] = int(sum(bool(r.get("prompt_truncated")) for r in rows))
    for name in first:
        outs = [r["responses"][name] for r in rows]
        s["policies"][name] = _means(outs, has_gold, has_rm)
        if has_gold and held.any() and (~held).any():
            s["policies"][name]["total_held_out_templates"] = float(np.mean([_value(o, "total") for o, h in
                                                                             zip(outs, held) if h]))
            s["policies"][name]["total_train_templates"] = float(np.mean([_value(o, "total") for o, h in
                                                                          zip(outs, held) if not h]))
    s["repeated_responses"] = repeated_responses(rows)
    if has_gold:
        s["max_response_share"] = {}
        for name in first:
            share, text = max_response_share([r["responses"][name]["text"] for r in rows],
                                             [r["responses"][name]["gold"]["correctness"] == 1.0 for r in rows])
            s["max_response_share"][name] = {"share": share, "text": text}
    if has_gold or has_rm:
        s["win_rates"] = {}
        for a, b in settings.win_pairs:
            if a in first and b in first:
                va = [_value(r["responses"][a], key) for r in rows]
                vb = [_value(r["responses"][b], key) for r in rows]
                h = head_to_head(va, vb, seed=settings.seed)
                if has_gold:
                    gain = [_value(r["responses"][a], "correctness") - _value(r["responses"][b], "correctness")
                            for r in rows]
                    h["correctness_gain"] = float(np.mean(gain))
                    h["correctness_gain_ci_low"], h["correctness_gain_ci_high"] = bootstrap_ci(gain, seed=settings.seed)
                    h.update(gains(rows, a, b, settings.seed))
                s["win_rates"][f"{a}_vs_{b}"] = h
    if "tau1" in rows[0] and (has_gold or has_rm):
        s["tau1"] = tau1_summary(rows, settings, has_gold, has_rm)
    if "samples" in rows[0] and has_rm:
        s["best_of_n"] = {}
        s["best_of_n_decoding"] = {"temperature": settings.best_of_temperature,
                                   "max_new_tokens": settings.max_new_tokens}
        k = len(rows[0]["samples"])
        measured = all("logp" in o for r in rows for o in r["samples"])
        one = [best_of_n_pick(r["samples"], 1) for r in rows]
        for n in sorted({1, *[int(n) for n in settings.best_of if int(n) <= k]}):
            picks = [best_of_n_pick(r["samples"], n) for r in rows]
            b = {**_means(picks, has_gold, True), "kl_bound": best_of_n_kl(n),
                 "kl_method": "exact over distinct samples" if measured else "bound"}
            b["kl"] = float(np.mean([best_of_n_kl_measured(r["samples"], n) for r in rows])) if measured \
                else b["kl_bound"]
            if has_gold and n > 1:
                b["gold_gain_vs_1"] = mean_with_ci([_value(x, "total") - _value(y, "total")
                                                    for x, y in zip(picks, one)], settings.seed)
            s["best_of_n"][str(n)] = b
        if has_gold:
            overall = _accuracy(rows, lambda o: o["rm"])
            s["rm_accuracy"], s["rm_accuracy_pairs"] = overall["accuracy"], overall["pairs"]
            pairs = sum(len(r["samples"]) * (len(r["samples"]) - 1) // 2 for r in rows)
            s["sample_pairs_gold_tied"] = 1.0 - s["rm_accuracy_pairs"] / pairs
            s["rm_accuracy_breakdown"] = rm_accuracy_breakdown(rows)
    if "kl_samples" in rows[0]:
        s["kl"] = {}
        for pair in rows[0]["kl_samples"]:
            samples = [o for r in rows for o in r["kl_samples"][pair]]
            s["kl"][pair] = {"kl": kl_k1(samples), **_means(samples, has_gold, has_rm)}
    return s


# ----------------------------------------------------------------------------- the labeler's held-out rankings
def heldout_rankings(rankings: Sequence[dict], gold_rows: Sequence[dict], data_cfg: DataConfig, seed: int) -> list[dict]:
    """The label stage's rankings on the reward model's held-out side (the `rm` phase's own seeded split by
    prompt, data.eval_fraction), each merged with its ranking_gold.jsonl row ("gold", "sft_logp") and
    carrying its chat "messages". Only the SFT samples are kept (the first `"sampled"` responses of a ranking;
    `pipeline.twins` adds constructed responses after them): the reward model is judged on the policy's
    own distribution, whatever it trained on, so designs with and without twins compare on the same kind of
    pairs."""
    if len(rankings) != len(gold_rows):
        raise ValueError(f"rankings.jsonl has {len(rankings)} rows but ranking_gold.jsonl {len(gold_rows)}")
    out = []
    for row, extra in zip(rankings, gold_rows):
        record = row_to_record(row, data_cfg)
        if is_eval(record, data_cfg.eval_fraction, seed):
            k = int(extra.get("sampled", len(row["responses"])))
            out.append({"prompt": row["prompt"], "messages": list(record.prompt), "spec": row.get("spec"),
                        "responses": list(row["responses"])[:k], "ranks": list(row["ranks"])[:k],
                        "gold": list(extra["gold"])[:k], "sft_logp": list(extra["sft_logp"])[:k]})
    return out


def heldout_label_summary(rankings: Sequence[dict], rm_gain: float = 1.0, bins: int = 10) -> dict:
    """Scorers against the labeler's rankings, on every pair of a ranking the labeler separates (ties 1/2).

    Each ranking: {"responses": [str], "ranks": [int] (1 = best), "gold": [noiseless gold totals],
    "rm": [normalized reward-model scores], "sft_logp": [summed SFT log-probs]}. Scorers: the reward model,
    the labeler ceiling (the gold totals: how far the labeler's noise lets any scorer agree), the SFT
    policy's summed log-prob and the longer answer (characters, stripped). Calibration: sigma(r_A - r_B)
    on raw reward-model scores (normalized difference / `rm_gain`) against the labeler's preference, each
    pair counted in both orientations so the bins do not depend on response order.
    """
    scorers = {"rm": lambda r: r["rm"], "labeler_ceiling": lambda r: r["gold"], "sft_logprob": lambda r: r["sft_logp"],
               "longer_answer": lambda r: [len(t.strip()) for t in r["responses"]]}
    out: dict = {"rankings": len(rankings)}
    for name, score in scorers.items():
        counts = [pair_agreement(score(r), -np.asarray(r["ranks"], float)) for r in rankings]
        out[name] = agreement_rate(counts)
        out["pairs"] = int(sum(c[1] for c in counts))
    p, y = [], []
    for r in rankings:
        ranks, rm = np.asarray(r["ranks"], float), np.asarray(r["rm"], float) / rm_gain
        i, j = np.triu_indices(len(ranks), k=1)
        sep = ranks[i] != ranks[j]
        prob = 1.0 / (1.0 + np.exp(-(rm[i] - rm[j])[sep]))
        pref = (ranks[i] < ranks[j])[sep].astype(float)
        p += list(prob) + list(1.0 - prob)
        y += list(pref) + list(1.0 - pref)
    out["rm_gain"] = rm_gain
    out["rm_ece"], out["reliability"] = calibration(p, y, bins) if p else (float("nan"), [])
    return out
