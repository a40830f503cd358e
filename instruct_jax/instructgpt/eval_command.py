"""`python -m instruct_jax eval`: the pipeline's evaluation for any set of LM checkpoints.

    python -m instruct_jax eval --experiment experiments/tiny_cpu.py --workdir runs/eval \\
        --policy sft=runs/pipeline/sft --policy ppo=runs/pipeline/ppo --reward-model runs/pipeline/rm \\
        --set data.tokenizer=runs/pipeline/task/tokenizer/spm_512.model

Prompts: `--prompts FILE` (jsonl rows {"prompt": str | messages, "spec"?: the built-in task's spec}),
else the built-in task's held-out prompts for the config's seed. With specs the gold judge scores
every response and win rates are by gold totals; without, by reward-model score. Decoding follows
cfg.pipeline (decode_temperature, max_new_tokens); best-of-n (cfg.pipeline.best_of) samples from
`--best-of-from` (default: the policy named "sft", if any); cfg.pipeline.tau1_samples temperature-1
samples per prompt of every policy give the tau = 1 win rates of the `--win` pairs. Prompts longer than
the prompt length keep their end; they are counted ("truncated_prompts" in the summary, and a line
printed). Writes <workdir>/eval_samples.jsonl (every response with its scores) and
<workdir>/eval_summary.json, and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

from instruct_jax.config import Config
from instruct_jax.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", dest="policies", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="an LM export or a pretrain / sft / ppo workdir to evaluate (repeat for several)")
    p.add_argument("--reward-model", default=None, metavar="PATH", help="reward-model workdir or export for RM scores")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="jsonl prompts (default: the built-in task's held-out prompts for cfg.seed)")
    p.add_argument("--best-of-from", default=None, metavar="NAME", help="policy best-of-n samples from")
    p.add_argument("--kl", dest="kl_pairs", action="append", default=[], metavar="A:B",
                   help="also estimate KL(A || B) on A's temperature-1 samples (repeatable)")
    p.add_argument("--win", dest="win_pairs", action="append", default=[], metavar="A:B",
                   help="head-to-head pairs (default: every policy against the first one)")


def _pairs(items: list[str], names: list[str], flag: str) -> tuple:
    out = []
    for item in items:
        a, sep, b = item.partition(":")
        if not sep or a not in names or b not in names:
            raise ConfigError(flag, f"expected A:B with A and B among the policies {names}, got {item!r}")
        out.append((a, b))
    return tuple(out)


def read_prompts(path: str) -> list:
    """EvalPrompts from jsonl rows; errors name the file, line and field."""
    from instruct_jax.data.formats import to_messages
    from instruct_jax.instructgpt.evaluate import EvalPrompt

    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("prompts", f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ConfigError("prompts", f"{path}:{i}: field 'prompt': expected an object with a prompt")
            prompt = row["prompt"]
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else to_messages(prompt, "prompt")
            if not messages or not messages[-1]["content"].strip():
                raise ConfigError("prompts", f"{path}:{i}: field 'prompt': empty")
            prompts.append(EvalPrompt(messages, row.get("spec")))
    if not prompts:
        raise ConfigError("prompts", f"{path}: no prompts")
    return prompts


def main(cfg: Config, workdir: str, args) -> int:
    from instruct_jax.data.build import build_chat_template, build_tokenizer
    from instruct_jax.data.config import TRAIN_SENTENCEPIECE
    from instruct_jax.inference.runner import PolicyRunner
    from instruct_jax.instructgpt.evaluate import EvalPrompt, EvalSettings, evaluate, tau1_policy_count
    from instruct_jax.instructgpt.gold import GoldJudge
    from instruct_jax.instructgpt.pipeline import prompt_len, validate_pipeline
    from instruct_jax.instructgpt.task import Task
    from instruct_jax.metrics import progress

    validate_pipeline(cfg)
    policies = {}
    for item in args.policies:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError("policy", f"expected NAME=PATH, got {item!r}")
        policies[name] = path
    names = list(policies)
    if cfg.data.tokenizer == TRAIN_SENTENCEPIECE:
        raise ConfigError("data.tokenizer", "name the checkpoints' tokenizer (e.g. --set "
                          "data.tokenizer=runs/pipeline/task/tokenizer/spm_512.model)")
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        task = Task(cfg.seed, num_eval=cfg.pipeline.eval_prompts, held_out_fraction=cfg.pipeline.held_out_fraction,
                    kinds=cfg.pipeline.kinds)
        prompts = [EvalPrompt.from_task(t) for t in task.eval_prompts()]
    best_from = args.best_of_from or ("sft" if "sft" in policies else "")
    if best_from and best_from not in policies:
        raise ConfigError("best-of-from", f"expected one of the policies {names}, got {best_from!r}")
    settings = EvalSettings(
        temperature=cfg.pipeline.decode_temperature, max_new_tokens=cfg.pipeline.max_new_tokens,
        best_of=tuple(cfg.pipeline.best_of) if best_from and args.reward_model else (), best_of_policy=best_from,
        kl_pairs=_pairs(args.kl_pairs, names, "kl"), kl_samples=cfg.pipeline.kl_samples,
        win_pairs=_pairs(args.win_pairs, names, "win") or tuple((n, names[0]) for n in names[1:]),
        tau1_samples=cfg.pipeline.tau1_samples, tau1_policies=tuple(names), seed=cfg.seed)

    tokenizer = build_tokenizer(cfg.data)
    runner = PolicyRunner(cfg, tokenizer, build_chat_template(cfg.data, tokenizer), prompt_len(cfg))
    scorer = None
    if args.reward_model:
        from instruct_jax.inference.scorer import RewardScorer

        rm_cfg = copy.deepcopy(cfg)
        rm_cfg.data.format = "ranking"  # the scorer is a reward-model setup; the data section is only its tokenizer
        scorer = RewardScorer(rm_cfg, args.reward_model)
    judge = GoldJudge() if all(p.spec is not None for p in prompts) else None
    params = {name: runner.load(path) for name, path in policies.items()}
    bar = progress(len(params) + 1 + tau1_policy_count(params, settings) + len(settings.kl_pairs), desc="eval")
    rows, summary = evaluate(runner, params, prompts, settings, scorer=scorer, judge=judge, progress=bar.update)
    bar.close()
    summary["checkpoints"] = policies
    summary["gold_calls"] = judge.calls if judge else 0
    summary["rm_truncated_sequences"] = scorer.stats.truncated if scorer else 0
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval_samples.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(table(summary), flush=True)
    return 0


def table(summary: dict) -> str:
    """The summary as a small plain-text table."""
    lines = [f"{summary['prompts']} prompts, judged by {summary['judged_by']}; decoding {summary['decoding']}",
             f"  {summary['truncated_prompts']} prompts longer than the prompt length (kept their end); "
             f"{summary.get('rm_truncated_sequences', 0)} reward-model inputs cut to its sequence length"]
    for name, m in summary["policies"].items():
        lines.append(f"  {name:12s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    for n, b in summary.get("best_of_n", {}).items():
        lines.append(f"  best-of-{n:<4s} " + "  ".join(f"{k} {v:.3f}" for k, v in b.items() if isinstance(v, float)))
    for pair, h in summary.get("win_rates", {}).items():
        lines.append(f"  {pair}: win rate {h['win_rate']:.3f} [{h['ci_low']:.3f}, {h['ci_high']:.3f}]")
    for pair, h in summary.get("tau1", {}).get("win_rates", {}).items():
        lines.append(f"  {pair} at tau = 1 ({summary['tau1']['samples_per_prompt']} paired samples per prompt): "
                     f"win rate {h['win_rate']:.3f} [{h['ci_low']:.3f}, {h['ci_high']:.3f}]")
    if "rm_accuracy" in summary:
        lines.append(f"  reward-model accuracy vs gold: {summary['rm_accuracy']:.3f} ({summary['rm_accuracy_pairs']} pairs)")
    for pair, k in summary.get("kl", {}).items():
        lines.append(f"  KL({pair.replace('||', ' || ')}) = {k['kl']:.3f} nats")
    return "\n".join(lines)
