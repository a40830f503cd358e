"""How well can a scorer built from the SFT policy rank the policy's own samples? (issue 7's 0.80 bar)

    export XLA_FLAGS=--xla_force_host_platform_device_count=8
    python benchmarks/rm_ceiling.py runs/pipeline                  # after `python -m instruct_jax pipeline`
    # also on training-template prompts (docs/rm_ceiling.json has both):
    head -240 runs/pipeline/task/ppo_prompts.jsonl > runs/ppo240.jsonl
    python -m instruct_jax eval --experiment experiments/tiny_cpu.py --workdir runs/ev-train \
        --set data.tokenizer=runs/pipeline/task/tokenizer/spm_1024.model --policy sft=runs/pipeline/sft \
        --reward-model runs/pipeline/rm --prompts runs/ppo240.jsonl --best-of-from sft
    python benchmarks/rm_ceiling.py runs/pipeline --samples runs/pipeline/eval_samples.jsonl runs/ev-train/eval_samples.jsonl

On a finished pipeline workdir (docs/PIPELINE.md), every scorer below ranks the same SFT samples
(`eval_samples.jsonl`: 16 temperature-1 samples per prompt) and is scored like the report's
`rm_accuracy`: agreement with the noiseless gold order on the pairs gold separates, ties 1/2.

* reward_model: the pipeline's reward model (its scores recorded in the samples file);
* sft_logprob: the SFT policy's own mean log-prob per token (recorded), a scorer that knows exactly
  what the policy knows and was never trained on a preference;
* implicit: a copy of the SFT policy trained on the labeler's rankings (`label/rankings.jsonl`) with
  the reward model's own ranking loss (train/rm/ranking.py: -log sigmoid(r_better - r_worse), all C(K, 2)
  pairs of a ranking in one batch element) on r = beta * mean log-prob per token of each response
  (SimPO's reward, without its margin). It starts as
  sft_logprob and may move only as far as the rankings teach it. Reported after a fixed number of
  epochs (`--epochs`), with its curve every `--eval-every` steps; nothing is selected on the
  evaluation pairs.

* rm:<workdir>: with `--reward-models W [W ...]`, the reward model of another pipeline workdir, with
  that workdir's own model shape (its `config.json`), e.g. a larger reward model on the same labels:

      cp -r runs/pipeline/task runs/pipeline/label runs/big/   # same task, tokenizer and rankings
      for s in pretrain sft rm; do python -m instruct_jax pipeline --experiment experiments/tiny_cpu.py \
          --workdir runs/big --stage $s --set model.d_model=256 model.num_heads=8 model.head_dim=32 \
          model.num_kv_heads=4 model.mlp_dim=768; done
      python benchmarks/rm_ceiling.py runs/pipeline --reward-models runs/big --epochs 0

Each is broken down by task kind; `--epochs 0` skips the implicit scorer. A second samples file
(`--samples A B`) scores the same trained scorer on other prompts, e.g. an `eval` command run on training-template prompts (`ppo_prompts`).
Runs on the first JAX device only (mesh 1 x 1). JSON goes to --out (default docs/rm_ceiling.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import machine, write_json  # noqa: E402
from instruct_jax.config import load_experiment, section_from_dict  # noqa: E402
from instruct_jax.data.build import build_chat_template, build_tokenizer  # noqa: E402
from instruct_jax.inference.logprobs import policy_outputs  # noqa: E402
from instruct_jax.inference.runner import PolicyRunner, _SampleLike  # noqa: E402
from instruct_jax.inference.sampling import prompt_and_response  # noqa: E402
from instruct_jax.inference.scorer import RewardScorer  # noqa: E402
from instruct_jax.instructgpt.pipeline import Paths, prompt_len, stage_config  # noqa: E402
from instruct_jax.instructgpt.statistics import agreement_rate, pair_agreement  # noqa: E402
from instruct_jax.model.transformer import ModelInput  # noqa: E402
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.train.rm.ranking import ranking_loss_sum  # noqa: E402


def accuracy(rows: list[dict], scores: list[np.ndarray]) -> dict:
    """Agreement with gold over every prompt's sample pairs, overall and per task kind."""
    by_kind = collections.defaultdict(list)
    for r, s in zip(rows, scores):
        gold = [o["gold"]["total"] for o in r["samples"]]
        by_kind[r["spec"]["kind"]].append(pair_agreement(s, gold))
    every = [c for counts in by_kind.values() for c in counts]
    return {"accuracy": agreement_rate(every), "pairs": int(sum(c[1] for c in every)),
            "by_kind": {k: round(agreement_rate(v), 4) for k, v in sorted(by_kind.items())}}


def per_row(flat: np.ndarray, rows: list[dict]) -> list[np.ndarray]:
    """Flat per-sample scores, in the rows' order, split back into one array per prompt."""
    return list(np.split(np.asarray(flat), np.cumsum([len(r["samples"]) for r in rows])[:-1]))


class ImplicitScorer:
    """beta * mean log-prob per token of a response under an LM's params (prompt in the chat template)."""

    def __init__(self, runner: PolicyRunner, response_len: int, beta: float):
        self.runner, self.n, self.beta = runner, response_len, beta
        tok = runner.tokenizer
        self.pad, self.stop = tok.pad_id, tok.eot_id
        self.score = jax.jit(self.scores)

    def encode(self, prompts: list[str], texts: list[str]) -> tuple[np.ndarray, ...]:
        """Left-padded prompts and right-padded responses (re-tokenized text + the end-of-turn token)."""
        pt, pl = self.runner.encode([[{"role": "user", "content": p}] for p in prompts])
        rt = np.full((len(texts), self.n), self.pad, np.int32)
        rl = np.zeros(len(texts), np.int32)
        for i, text in enumerate(texts):
            ids = (self.runner.tokenizer.encode(text) + [self.stop])[:self.n]
            rt[i, :len(ids)], rl[i] = ids, len(ids)
        return pt, pl, rt, rl

    def scores(self, params, pt, pl, rt, rl) -> jax.Array:
        inputs = prompt_and_response(ModelInput.left_padded(pt, pl), _SampleLike(rt, rl))
        logprobs, _ = policy_outputs(self.runner.model, params, inputs, rt, pt.shape[1], 1.0)
        mask = (jnp.arange(self.n)[None] < rl[:, None]).astype(jnp.float32)
        return self.beta * jnp.sum(logprobs * mask, axis=1) / jnp.maximum(rl, 1)

    def score_rows(self, params, rows: list[dict], batch: int = 256) -> list[np.ndarray]:
        prompts = [r["prompt"] for r in rows for _ in r["samples"]]
        enc = self.encode(prompts, [o["text"] for r in rows for o in r["samples"]])
        flat = np.concatenate([np.asarray(self.score(params, *(x[a:a + batch] for x in enc)))
                               for a in range(0, len(prompts), batch)])
        return per_row(flat, rows)


def train_implicit(scorer: ImplicitScorer, params, rankings: list[dict], k: int, args, evaluate) -> tuple:
    steps = int(args.epochs * len(rankings) / args.batch)
    tx = optax.adam(optax.cosine_decay_schedule(args.lr, steps))

    def loss_fn(p, pt, pl, rt, rl, ranks):  # the reward model's own loss (train/rm/ranking.py), on r = implicit
        total, prompts, stats = ranking_loss_sum(scorer.scores(p, pt, pl, rt, rl).reshape(-1, k), ranks)
        return total / jnp.maximum(prompts, 1.0), stats["correct"] / jnp.maximum(stats["pairs"], 1.0)

    @jax.jit
    def step(p, opt, pt, pl, rt, rl, ranks):
        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, pt, pl, rt, rl, ranks)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt, loss, acc

    opt, curve, start = tx.init(params), [], time.time()
    order = np.random.default_rng(args.seed).permutation(len(rankings))
    for s in range(steps):
        idx = [order[(s * args.batch + i) % len(order)] for i in range(args.batch)]
        batch = [rankings[i] for i in idx]
        enc = scorer.encode([r["prompt"] for r in batch for _ in range(k)],
                            [(r["responses"] + [""] * k)[j] for r in batch for j in range(k)])
        ranks = np.array([(list(r["ranks"]) + [0] * k)[:k] for r in batch], np.int32)
        params, opt, loss, acc = step(params, opt, *enc, ranks)
        if (s + 1) % args.eval_every == 0 or s + 1 == steps:
            curve.append({"step": s + 1, "train_loss": float(loss), "train_batch_accuracy": float(acc),
                          "accuracy": evaluate(params), "seconds": round(time.time() - start, 1)})
            print(f"  step {s + 1}/{steps}: loss {float(loss):.3f}, accuracy vs gold {curve[-1]['accuracy']}",
                  flush=True)
    return params, curve, steps


def other_rm_config(experiment: str, workdir: str):
    """The `rm` stage config of another pipeline workdir, with the model shape it was trained with."""
    cfg = load_experiment(experiment)
    cfg.mesh = MeshConfig(data=1, fsdp=1)
    with open(os.path.join(workdir, "config.json")) as f:  # nested sections (model.vision) rebuilt
        cfg.model = section_from_dict(type(cfg.model), json.load(f)["model"], "config.json:model")
    return stage_config(cfg, "rm", Paths(workdir, cfg.data.vocab_size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workdir", help="a finished pipeline workdir (sft/, label/, eval_samples.jsonl)")
    ap.add_argument("--experiment", default="experiments/tiny_cpu.py", help="the pipeline's experiment file")
    ap.add_argument("--samples", nargs="+", help="eval_samples.jsonl files (default: the workdir's own)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=16, help="rankings per step")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0, help="order of the rankings")
    ap.add_argument("--reward-models", nargs="*", default=[], metavar="WORKDIR",
                    help="other pipeline workdirs whose rm/ also ranks the samples (their own model shape)")
    ap.add_argument("--out", default="docs/rm_ceiling.json")
    args = ap.parse_args()

    cfg = load_experiment(args.experiment)
    cfg.mesh = MeshConfig(data=1, fsdp=1)
    c = stage_config(cfg, "ppo", Paths(args.workdir, cfg.data.vocab_size))
    tokenizer = build_tokenizer(c.data)
    runner = PolicyRunner(c, tokenizer, build_chat_template(c.data, tokenizer), prompt_len(cfg),
                          devices=jax.devices()[:1])
    scorer = ImplicitScorer(runner, cfg.ppo.response_len, args.beta)
    files = args.samples or [os.path.join(args.workdir, "eval_samples.jsonl")]
    sets = {f: [json.loads(line) for line in open(f)] for f in files}
    result = {"workdir": args.workdir, "args": vars(args), "machine": machine(), "samples": {}}
    for f, rows in sets.items():
        result["samples"][f] = {
            "prompts": len(rows),
            "reward_model": accuracy(rows, [np.array([o["rm"] for o in r["samples"]]) for r in rows]),
            "sft_logprob": accuracy(rows, [np.array([o["logp"] / max(o["tokens"], 1) for o in r["samples"]])
                                           for r in rows])}
    for other in args.reward_models:
        rm = RewardScorer(other_rm_config(args.experiment, other), os.path.join(other, "rm"), jax.devices()[:1])
        for f, rows in sets.items():
            scores = rm.score([(r["messages"], o["text"]) for r in rows for o in r["samples"]])
            result["samples"][f][f"rm:{other}"] = accuracy(rows, per_row(scores, rows))
    if args.epochs > 0:
        run_implicit(scorer, runner, cfg, args, sets, result)
    print(json.dumps(result["samples"], indent=1))
    write_json(args.out, result)


def run_implicit(scorer: ImplicitScorer, runner: PolicyRunner, cfg, args, sets: dict, result: dict) -> None:
    """Train the implicit scorer from the SFT params on the labeler's rankings; add its accuracies to `result`."""
    main_rows = next(iter(sets.values()))

    def evaluate(params) -> float:
        return round(accuracy(main_rows, scorer.score_rows(params, main_rows))["accuracy"], 4)

    params = runner.load(os.path.join(args.workdir, "sft"))
    k = cfg.pipeline.responses_per_prompt
    rankings = [json.loads(line) for line in open(os.path.join(args.workdir, "label", "rankings.jsonl"))]
    result["implicit_at_init"] = evaluate(params)  # = sft_logprob up to re-tokenization of the texts
    print(f"implicit scorer at init (the SFT's mean log-prob): {result['implicit_at_init']}", flush=True)
    params, curve, steps = train_implicit(scorer, params, rankings, k, args, evaluate)
    result["implicit_training"] = {"rankings": len(rankings), "steps": steps, "curve": curve}
    for f, rows in sets.items():
        result["samples"][f]["implicit"] = accuracy(rows, scorer.score_rows(params, rows))


if __name__ == "__main__":
    main()
