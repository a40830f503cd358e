"""LoRA against full fine-tuning: the built-in task's SFT stage, side by side, same steps (issue 30's 10% bar).

    export XLA_FLAGS=--xla_force_host_platform_device_count=8
    python benchmarks/lora_sft.py runs/pipeline                     # a pipeline workdir with task/ and pretrain/
    python benchmarks/lora_sft.py runs/pipeline --steps 60 --rank 16 --targets q,k,v,o,gate,up,down --lora-lr 3e-3 1e-2

From the pipeline's own pretrained export and SFT config (its demonstrations, held-out 10%, batch and sequence
length), each run trains `--steps` steps with early stopping off and evaluates every `--eval-every` steps:
full fine-tuning at the pipeline's SFT learning rate, then LoRA (rank `--rank` on `--targets`, alpha `--alpha`)
at each `--lora-lr`. Reported: validation loss at the last step and at its best evaluation, the ratio to full
fine-tuning's, trainable parameters, optimizer-state bytes and seconds. JSON to --out (default docs/lora_sft.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import jax


def optimizer_bytes(workdir: str, cfg) -> tuple[int, int]:
    """(trainable params, optimizer-state bytes) of the run's TrainState, from its builder (nothing allocated)."""
    from instruct_jax.model.lora import is_trainable
    from instruct_jax.parallel.mesh import make_mesh
    from instruct_jax.train.lm.build import abstract_lm_state

    abstract, _ = abstract_lm_state(cfg, make_mesh(cfg.mesh, jax.devices()))
    leaves = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
    trainable = sum(x.size for p, x in leaves if not cfg.model.lora_rank or is_trainable(p, cfg.model.lora_train))
    opt = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.opt_state) if hasattr(x, "size"))
    return int(trainable), int(opt)


def run(cfg, workdir: str) -> dict:
    from instruct_jax.train.lm.trainer import run_lm

    start = time.perf_counter()
    run_lm(cfg, workdir, phase="sft")
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    trainable, opt = optimizer_bytes(workdir, cfg)
    return {"final_step": evals[-1][0], "final_eval_loss": evals[-1][1], "best_eval_loss": min(e for _, e in evals),
            "best_step": min(evals, key=lambda e: e[1])[0], "curve": evals, "trainable_params": trainable,
            "optimizer_bytes": opt, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="a pipeline workdir with task/ and a finished pretrain/ stage")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="q,k,v,o,gate,up,down")
    p.add_argument("--lora-lr", type=float, nargs="+", default=[3e-3])
    p.add_argument("--train", default="embedding,lm_head", help="params trained in full beside the adapters "
                   "(model.lora_train; the chat template's tokens never appear in pretraining); '' for none")
    p.add_argument("--out", default="docs/lora_sft.json")
    args = p.parse_args()

    from instruct_jax.config import load_experiment
    from instruct_jax.instructgpt.pipeline import Paths, stage_config

    base = load_experiment(os.path.join(args.workdir, "config.json"))
    paths = Paths(args.workdir, base.data.vocab_size)
    sft = stage_config(base, "sft", paths)
    sft.train.steps, sft.train.eval_every, sft.train.early_stop_patience = args.steps, args.eval_every, 0
    sft.checkpoint.every_steps = args.steps
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["full"] = {"learning_rate": sft.optim.learning_rate, **run(sft, os.path.join(tmp, "full"))}
        for lr in args.lora_lr:
            c = copy.deepcopy(sft)
            c.model.lora_rank, c.model.lora_alpha = args.rank, args.alpha
            c.model.lora_targets = tuple(args.targets.split(","))
            c.model.lora_train = tuple(t for t in args.train.split(",") if t)
            c.optim.learning_rate = lr
            results[f"lora_lr{lr:g}"] = {"learning_rate": lr, **run(c, os.path.join(tmp, f"lora{lr:g}"))}
    full = results["full"]
    for r in results.values():
        r["final_ratio"] = r["final_eval_loss"] / full["final_eval_loss"]
        r["best_ratio"] = r["best_eval_loss"] / full["best_eval_loss"]
    out = {"workdir": args.workdir, "steps": args.steps, "rank": args.rank, "alpha": args.alpha,
           "targets": args.targets, "lora_train": args.train, "d_model": base.model.d_model, "machine": f"{platform.machine()}, "
           f"{os.cpu_count()} cores, {jax.device_count()} {jax.devices()[0].platform} devices", "runs": results}
    print("| run | lr | eval loss at step %d (÷ full) | best eval loss (÷ full) | trainable params | "
          "optimizer bytes | seconds |" % args.steps)
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['learning_rate']:g} | {r['final_eval_loss']:.4f} ({r['final_ratio']:.3f}) | "
              f"{r['best_eval_loss']:.4f} at {r['best_step']} ({r['best_ratio']:.3f}) | {r['trainable_params']:,} | "
              f"{r['optimizer_bytes']:,} | {r['seconds']:.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
