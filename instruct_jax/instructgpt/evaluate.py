"""Evaluate policies on prompts: decode, score by the gold judge and the reward model, compare.

    rows, summary = evaluate(runner, policies, prompts, settings, scorer=scorer, judge=judge)

`policies` maps a name to params (e.g. {"base": …, "sft": …, "ppo": …}); every policy is decoded
the same declared way (`settings.temperature`, 0 = greedy). Then, when asked for:

  best-of-n      `max(best_of)` samples per prompt from `settings.best_of_policy` at `best_of_temperature`;
                 best-of-n keeps the reward model's favourite of the first n (analytic KL log n - (n-1)/n)
  RM accuracy    on those samples: pairs the noiseless gold order separates, RM ties count 1/2; broken down
                 by kind, template split and kind of difference, next to the sampling policy's own
                 log-prob as a reward model (`rm_accuracy_breakdown`)
  KL(a || b)     `kl_samples` temperature-1 samples of a per prompt; per-response sum of k1 = log p_a - log p_b
  win rates      head to head by gold totals (by reward-model score when there is no judge), ties 1/2,
                 with a 95% bootstrap CI over prompts; and the per-prompt correctness gain's CI
  repetition     each policy's number of distinct responses and its most repeated ones, with the task kinds
                 they answer (`repeated_responses`): one answer given to many prompts of different kinds is
                 what a policy that found a reward model's blind spot looks like

`rows` (one per prompt; written to eval_samples.jsonl) hold every response with its gold components,
reward-model score and, for sampled ones, the sampler's log-prob "logp", so every number in `summary`
can be recomputed from them (`summarize(rows, settings)` does exactly that).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional, Sequence

import numpy as np

from instruct_jax.inference.runner import PolicyRunner
from instruct_jax.instructgpt.gold import WEIGHTS, GoldJudge
from instruct_jax.instructgpt.statistics import (agreement_rate, best_of_n_kl, bootstrap_ci, head_to_head,
                                                 pair_agreement)
from instruct_jax.instructgpt.task import TaskPrompt

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
    win_pairs: tuple = (("ppo", "sft"),)  # (a, b): head-to-head win rate of a over b
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
    rows = [{"prompt": p.messages[-1]["content"], "messages": p.messages, "spec": p.spec, "responses": {}}
            for p in prompts]
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


# ----------------------------------------------------------------------------- summary (from rows only)
def _value(o: dict, key: str) -> float:
    """A response's gold component ("total", "correctness", …) or its reward-model score ("rm")."""
    return float(o["rm"]) if key == "rm" else float(o["gold"][key])


def best_of_n_pick(samples: Sequence[dict], n: int) -> dict:
    """The reward model's favourite of the first n samples (first one on ties)."""
    first = samples[:n]
    return first[int(np.argmax([s["rm"] for s in first]))]


def kl_k1(samples: Sequence[dict]) -> float:
    """Mean over samples of the per-response k1 sum log p_a - log p_b."""
    return float(np.mean([s["logp"] - s["logp_ref"] for s in samples]))


def _means(outs: Sequence[dict], has_gold: bool, has_rm: bool) -> dict:
    m = {}
    if has_gold:
        for c in COMPONENTS:
            m[c] = float(np.mean([_value(o, c) for o in outs]))
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
    for name in first:
        outs = [r["responses"][name] for r in rows]
        s["policies"][name] = _means(outs, has_gold, has_rm)
        if has_gold and held.any() and (~held).any():
            s["policies"][name]["total_held_out_templates"] = float(np.mean([_value(o, "total") for o, h in
                                                                             zip(outs, held) if h]))
            s["policies"][name]["total_train_templates"] = float(np.mean([_value(o, "total") for o, h in
                                                                          zip(outs, held) if not h]))
    s["repeated_responses"] = repeated_responses(rows)
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
                s["win_rates"][f"{a}_vs_{b}"] = h
    if "samples" in rows[0] and has_rm:
        s["best_of_n"] = {}
        k = len(rows[0]["samples"])
        for n in sorted({1, *[int(n) for n in settings.best_of if int(n) <= k]}):
            picks = [best_of_n_pick(r["samples"], n) for r in rows]
            s["best_of_n"][str(n)] = {**_means(picks, has_gold, True), "kl": best_of_n_kl(n)}
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
