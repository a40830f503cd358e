"""SFT train step tokens/s, instruct_jax vs transformers + PyTorch, and both as a fraction of the matmul peak.

    python benchmarks/sft_step.py                 # SmolLM2-135M shape, f32, batch 4 x 256, 5 interleaved repeats
    python benchmarks/sft_step.py --quick         # 2 repeats
    python benchmarks/sft_step.py --tiny          # a tiny model, seconds (checks the script, not the speed)

One step is what a trainer runs per batch: forward, backward and AdamW (global-norm clipping 1.0,
b2 0.95, no weight decay) on the same model shape, the same random token batch (every position a
target) and float32 on both sides. instruct_jax runs `train/lm/build.py`'s jitted, state-donating step
(`build_lm`) on one device; transformers runs `LlamaForCausalLM(labels=...)`, `loss.backward()`,
`clip_grad_norm_` and `torch.optim.AdamW` with every core. The two alternate step by step
(`common.interleaved`) and the median is kept.

MFU = tokens/s x model FLOPs per token (metrics.model_flops_per_token: 6 x matmul weights + attention,
PaLM appendix B) / the f32 `jnp.dot` peak measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (puts the repo on sys.path)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instruct_jax.config import Config, OptimConfig, TrainConfig  # noqa: E402
from instruct_jax.metrics import model_flops_per_token  # noqa: E402
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.sharding import batch_sharding  # noqa: E402
from instruct_jax.train.lm.build import build_lm  # noqa: E402

OPTIM = dict(learning_rate=1e-4, warmup_steps=0, decay="constant", b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
             grad_clip=1.0)


def random_tokens(batch: int, seq_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def jax_step(model_cfg, batch: int, seq_len: int, tokens: np.ndarray):
    """A callable running one instruct_jax SFT step (and waiting for it), and the setup."""
    cfg = Config(name="bench-sft", model=model_cfg, mesh=MeshConfig(data=1, fsdp=1),
                 optim=OptimConfig(**OPTIM), train=TrainConfig(steps=1000, global_batch_size=batch, seq_len=seq_len))
    setup = build_lm(cfg, jax.devices()[:1])
    sharding = batch_sharding(setup.mesh, setup.rules)
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
            "segment_ids": np.ones((batch, seq_len), np.int32)}
    data = {k: jax.device_put(v, sharding) for k, v in host.items()}
    box = {"state": setup.init_state()}

    def step():
        box["state"], metrics = setup.train_step(box["state"], data)
        return float(metrics["loss"])  # waits for the step

    step.hlo = lambda: setup.train_step.lower(box["state"], data).compile().as_text()  # for trace_summary
    return step


def torch_step(model_cfg, tokens: np.ndarray):
    """A callable running one transformers + PyTorch step (forward, backward, clip, AdamW)."""
    import torch

    common.torch_threads()
    model = common.hf_model(model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM["learning_rate"], betas=(OPTIM["b1"], OPTIM["b2"]),
                            eps=OPTIM["eps"], weight_decay=OPTIM["weight_decay"])
    ids = torch.from_numpy(tokens.astype(np.int64))
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def run(tiny: bool = False, quick: bool = False, batch: int = 4, seq_len: int = 256, repeats: int = 0,
        limits: dict | None = None, with_torch: bool = True, variants: dict | None = None) -> dict:
    """variants: extra instruct_jax cases, {name: ModelConfig overrides} (e.g. {"chunked loss": {"loss_chunk": 64}})."""
    model_cfg = common.tiny_model() if tiny else common.smollm2_135m()
    repeats = repeats or (2 if quick or tiny else 5)
    limits = limits or common.hardware_limits(quick or tiny)
    tokens = random_tokens(batch, seq_len, model_cfg.vocab_size)
    cases = {"instruct_jax": jax_step(model_cfg, batch, seq_len, tokens)}
    for name, overrides in (variants or {}).items():
        cases[f"instruct_jax ({name})"] = jax_step(dataclasses.replace(model_cfg, **overrides), batch, seq_len, tokens)
    if with_torch:
        cases["transformers"] = torch_step(model_cfg, tokens)
    load_before = common.load_average()
    times = common.interleaved(cases, repeats)
    flops = model_flops_per_token(model_cfg, seq_len)
    peak = limits["matmul"]["flops_per_s"]
    rows = {}
    for name, t in times.items():
        tps = batch * seq_len / t["median_s"]
        rows[name] = {**t, "tokens_per_s": tps, "mfu_vs_measured_peak": tps * flops / peak}
    out = {"benchmark": "sft_step", "model": "tiny" if tiny else "SmolLM2-135M shape", "dtype": "float32",
           "batch": batch, "seq_len": seq_len, "flops_per_token": flops, "limits": limits, "results": rows,
           "load_average_before": load_before, "load_average_after": common.load_average()}
    if with_torch:
        out["speedup_vs_transformers"] = rows["instruct_jax"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"]
    return out


def table(result: dict) -> str:
    rows = [[name, r["tokens_per_s"], r["median_s"], f"{100 * r['mfu_vs_measured_peak']:.1f}%"]
            for name, r in result["results"].items()]
    text = common.markdown_table(["SFT step (fwd+bwd+AdamW)", "tokens/s", "s/step (median)", "of f32 matmul peak"],
                                 rows)
    if "speedup_vs_transformers" in result:
        text += f"\n\ninstruct_jax / transformers: {result['speedup_vs_transformers']:.2f}x"
    return text


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script in seconds")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller limit probes")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--no-torch", action="store_true", help="instruct_jax only")
    parser.add_argument("--variant", nargs=2, action="append", metavar=("FIELD", "VALUE"), default=[],
                        help="also time instruct_jax with model.FIELD=VALUE (int or str), e.g. --variant loss_chunk 64")
    parser.add_argument("--out", default="", help="JSON path (common.default_out)")
    args = parser.parse_args(argv)
    args.out = args.out or common.default_out("benchmarks_sft.json", args.tiny)
    variants = {f"{k}={v}": {k: int(v) if v.lstrip("-").isdigit() else v} for k, v in args.variant}
    result = run(tiny=args.tiny, quick=args.quick, repeats=args.repeats, with_torch=not args.no_torch,
                 variants=variants)
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    main()
