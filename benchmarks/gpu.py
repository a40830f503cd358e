"""On one GPU: bf16 SFT MFU on a ~1B model, and decode throughput against the HBM-bandwidth roofline.

    python benchmarks/gpu.py                      # Llama-3.2-1B shape, bf16; about 5 minutes on an H100
    python benchmarks/gpu.py --tiny               # a tiny model on whatever device (checks the script)
    python benchmarks/gpu.py --out docs/benchmarks_gpu.json

Two measurements, the card's name in the results:

* SFT: `build_lm`'s jitted, donated train step (forward, backward, AdamW) in bfloat16 compute with
  float32 params, batch x seq_len tokens (default 4 x 2048). MFU = tokens/s x model FLOPs per token
  (metrics.model_flops_per_token) / the card's dense bf16 peak (table below; the measured bf16
  `jnp.dot` peak is reported next to it). Target: >= 50%.
* Decode: the sampler's cost per decode step at batch 1 and 64, as (time of sample with 1 + N new
  tokens - time with 1) / N, so prefill cancels. The roofline step time reads every weight once in
  bf16 (the sampler casts matmul weights to the compute dtype once per call) plus the valid KV cache,
  at the card's HBM bandwidth (table; the measured read bandwidth is reported too). Fraction =
  roofline / measured. Target: >= 60% at batch 1.

Needs only jax, flax, optax and this repository (no datasets, no torch).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instruct_jax.config import Config, OptimConfig, TrainConfig  # noqa: E402
from instruct_jax.inference.sampling import SamplingConfig, make_sampler  # noqa: E402
from instruct_jax.metrics import model_flops_per_token  # noqa: E402
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer  # noqa: E402
from instruct_jax.model.transformer import init_params_boxed  # noqa: E402
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.sharding import batch_sharding, unbox  # noqa: E402
from instruct_jax.train.lm.build import build_lm  # noqa: E402

# Vendor datasheet figures: dense (no sparsity) bf16 FLOP/s and HBM bytes/s, by substring of device_kind.
CARDS = (
    ("H200", 989.4e12, 4.8e12),
    ("H100 PCIe", 756.0e12, 2.0e12),
    ("H100", 989.4e12, 3.35e12),  # SXM
    ("A100", 312.0e12, 2.039e12),  # 80 GB SXM
    ("L4", 121.0e12, 0.3e12),
)


def card_limits(kind: str) -> tuple[float, float] | None:
    for name, flops, bandwidth in CARDS:
        if name.lower() in kind.lower():
            return flops, bandwidth
    return None


def llama_1b(**overrides) -> ModelConfig:
    """Llama-3.2-1B's shape (1.24B params, tied embeddings), plain RoPE: the speed is the same."""
    fields = dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                  mlp_dim=8192, max_seq_len=4096, rope_theta=500000.0, tie_embeddings=True, dtype="bfloat16")
    return ModelConfig(**{**fields, **overrides})


def sft_mfu(cfg: ModelConfig, batch: int, seq_len: int, steps: int, peak: float) -> dict:
    config = Config(name="bench-gpu-sft", model=cfg, mesh=MeshConfig(data=1, fsdp=1),
                    optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, decay="constant"),
                    train=TrainConfig(steps=1000, global_batch_size=batch, seq_len=seq_len))
    setup = build_lm(config, jax.devices()[:1])
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    host = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((batch, seq_len), np.float32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
            "segment_ids": np.ones((batch, seq_len), np.int32)}
    data = {k: jax.device_put(v, batch_sharding(setup.mesh, setup.rules)) for k, v in host.items()}
    state = setup.init_state()
    for _ in range(2):  # compile, warm up
        state, metrics = setup.train_step(state, data)
    float(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = setup.train_step(state, data)
    loss = float(metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    tps = batch * seq_len / seconds
    flops = model_flops_per_token(cfg, seq_len)
    return {"batch": batch, "seq_len": seq_len, "remat": cfg.remat, "step_s": seconds, "tokens_per_s": tps,
            "flops_per_token": flops, "mfu": tps * flops / peak, "loss": loss}


def decode_roofline(cfg: ModelConfig, batch: int, prompt_len: int, new_tokens: int, bandwidth: float,
                    repeats: int) -> dict:
    """Measured seconds per decode step vs weights (bf16) + valid KV cache read at `bandwidth`."""
    model = Transformer(cfg)
    params = jax.jit(lambda: unbox(init_params_boxed(model, jax.random.PRNGKey(0))))()
    tokens = np.random.default_rng(batch).integers(1, cfg.vocab_size, (batch, prompt_len)).astype(np.int32)
    prompt = ModelInput.left_padded(jnp.asarray(tokens), jnp.full((batch,), prompt_len))
    timings = {}
    for n in (1, 1 + new_tokens):
        sampler = make_sampler(model, SamplingConfig(max_new_tokens=n, temperature=1.0))
        jax.block_until_ready(sampler.sample(params, prompt, jax.random.PRNGKey(0)))  # compile
        best = float("inf")
        for r in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(sampler.sample(params, prompt, jax.random.PRNGKey(r + 1)))
            best = min(best, time.perf_counter() - start)
        timings[n] = best
    step_s = (timings[1 + new_tokens] - timings[1]) / new_tokens
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = common.param_count(cfg) * itemsize
    kv = batch * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize * (prompt_len + new_tokens / 2)
    roofline_s = (weights + kv) / bandwidth
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "step_s": step_s,
            "tokens_per_s": batch / step_s, "roofline_step_s": roofline_s, "fraction_of_roofline": roofline_s / step_s,
            "bytes_per_step": weights + kv}


def run(tiny: bool = False, batch: int = 4, seq_len: int = 2048, steps: int = 5, remat: str = "none",
        decode_batches=(1, 64), prompt_len: int = 128, new_tokens: int = 128) -> dict:
    device = jax.devices()[0]
    kind = device.device_kind
    declared = card_limits(kind)
    if tiny:
        cfg = common.tiny_model(dtype="bfloat16", remat=remat)
        batch, seq_len, steps, prompt_len, new_tokens = 2, 64, 2, 16, 8
    else:
        cfg = llama_1b(remat=remat)
    measured = {"matmul_bf16": common.matmul_peak(1024 if tiny else 8192, 3, jnp.bfloat16),
                "bandwidth": common.read_bandwidth(64 if tiny else 4096, 3)}
    peak = declared[0] if declared else measured["matmul_bf16"]["flops_per_s"]
    bandwidth = declared[1] if declared else measured["bandwidth"]["bytes_per_s"]
    result = {"benchmark": "gpu", "device": kind, "platform": device.platform, "model": "tiny" if tiny else
              "Llama-3.2-1B shape", "dtype": cfg.dtype, "params": common.param_count(cfg),
              "declared_peak_bf16_flops": declared[0] if declared else None,
              "declared_hbm_bytes_per_s": declared[1] if declared else None, "measured": measured,
              "peak_used": peak, "bandwidth_used": bandwidth}
    result["sft"] = sft_mfu(cfg, batch, seq_len, steps, peak)
    result["decode"] = [decode_roofline(cfg, b, prompt_len, new_tokens, bandwidth, 3) for b in decode_batches]
    return result


def table(result: dict) -> str:
    s = result["sft"]
    rows = [[f"SFT bf16 {s['batch']} x {s['seq_len']}", f"{s['tokens_per_s']:,.0f} tokens/s",
             f"{100 * s['mfu']:.1f}% MFU", ">= 50%"]]
    for d in result["decode"]:
        rows.append([f"decode batch {d['batch']}", f"{d['tokens_per_s']:,.0f} tokens/s ({1e3 * d['step_s']:.2f} ms/step)",
                     f"{100 * d['fraction_of_roofline']:.1f}% of HBM roofline", ">= 60%" if d["batch"] == 1 else ""])
    return f"{result['device']} ({result['model']})\n\n" + common.markdown_table(
        ["measurement", "throughput", "vs the card", "target"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model: checks the script on any device")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--remat", default="none", help="model.remat for the SFT step (none | dots | full ...)")
    parser.add_argument("--out", default=os.path.join(common.DOCS, "benchmarks_gpu.json"))
    args = parser.parse_args(argv)
    result = run(tiny=args.tiny, batch=args.batch, seq_len=args.seq_len, steps=args.steps, remat=args.remat)
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    main()
