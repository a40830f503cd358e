"""Sampling throughput, instruct_jax vs transformers' `generate`, and against the machine's limits.

    python benchmarks/generate.py                 # SmolLM2-135M shape, f32, prompt 64 + 64 new, batch 1, 8, 64
    python benchmarks/generate.py --quick         # 2 repeats
    python benchmarks/generate.py --batches 8     # one batch size
    python benchmarks/generate.py --tiny          # a tiny model, seconds

Both sides sample (temperature 1, no top-k / top-p) exactly 64 new tokens after a 64-token prompt
for every row: instruct_jax's one jitted `sample` (prefill, then a lax.while_loop of decode steps over
a KV cache, no stop token) and transformers' `generate(do_sample=True, min_new_tokens=max_new_tokens)`
with its KV cache, every core, under `torch.inference_mode`. New tokens/s = batch x 64 / the median
time of a whole call (prefill included); the two alternate call by call.

Fractions of the machine's limits, over the whole call:
* bandwidth: the bytes a decoder must read at least, every decode step all weights (float32) plus
  the valid part of the KV cache, / time / the measured read bandwidth. The limit at small batch.
* compute: the model FLOPs of prefill and decoding (2 x matmul weights per token + attention) /
  time / the measured f32 matmul peak. The limit at large batch.
* floor: the fastest a call can be on this machine (`floor_seconds`): the prefill's FLOPs at the
  matmul peak plus, for every decode step, its FLOPs at the peak or its bytes at the bandwidth,
  whichever takes longer. A speed target whose time per call is below the floor is out of reach.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instruct_jax.inference.sampling import SamplingConfig, make_sampler  # noqa: E402
from instruct_jax.model.transformer import ModelInput, Transformer  # noqa: E402
from instruct_jax.model.transformer import init_params_boxed  # noqa: E402
from instruct_jax.parallel.sharding import unbox  # noqa: E402


def decode_costs(cfg, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Minimum bytes read and model FLOPs of one generate call (float32 weights and cache), in total
    and per phase: the prefill, then decode steps i = 1 .. N - 1 (the first new token comes from the
    prefill's logits), each reading every weight once and the cache of prompt_len + i tokens per row."""
    weights = common.param_count(cfg)
    # every weight but the norm scales is a matmul weight for each token; the tied table serves as the head
    matmul_weights = weights - cfg.d_model * (2 * cfg.num_layers + 1)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim  # floats per cached token
    attention = lambda length: 4 * length * cfg.num_heads * cfg.head_dim * cfg.num_layers  # noqa: E731
    prefill_flops = batch * (prompt_len * 2 * matmul_weights + sum(attention(t + 1) for t in range(prompt_len)))
    steps = range(1, new_tokens)
    step_bytes = [4 * (weights + batch * kv_per_token * (prompt_len + i)) for i in steps]
    step_flops = [batch * (2 * matmul_weights + attention(prompt_len + i + 1)) for i in steps]
    return {"bytes_read": float(sum(step_bytes)), "flops": float(prefill_flops + sum(step_flops)),
            "prefill_flops": float(prefill_flops), "step_bytes": step_bytes, "step_flops": step_flops}


def floor_seconds(costs: dict, peak: float, bandwidth: float) -> float:
    """The fastest one generate call can be on this machine: the prefill at the f32 matmul peak, and
    each decode step at whichever limit binds, its FLOPs at the peak or its bytes at the read bandwidth."""
    return costs["prefill_flops"] / peak + sum(max(f / peak, b / bandwidth)
                                               for f, b in zip(costs["step_flops"], costs["step_bytes"]))


def random_prompt(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, vocab, (batch, prompt_len)).astype(np.int32)


def jax_generate(cfg, tokens: np.ndarray, new_tokens: int):
    model = Transformer(cfg)
    params = jax.jit(lambda: unbox(init_params_boxed(model, jax.random.PRNGKey(0))))()
    sampler = make_sampler(model, SamplingConfig(max_new_tokens=new_tokens, temperature=1.0))
    prompt = ModelInput.left_padded(jnp.asarray(tokens), jnp.full((tokens.shape[0],), tokens.shape[1]))
    calls = iter(range(10**9))

    def generate():
        out = sampler.sample(params, prompt, jax.random.PRNGKey(next(calls)))
        return np.asarray(out.tokens)

    generate.hlo = lambda: sampler.sample.lower(params, prompt, jax.random.PRNGKey(0)).compile().as_text()
    return generate


def torch_generate(cfg, tokens: np.ndarray, new_tokens: int):
    import torch

    common.torch_threads()
    model = common.hf_model(cfg)
    ids = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.ones_like(ids)

    def generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
                                 use_cache=True)
        assert out.shape[1] == tokens.shape[1] + new_tokens
        return out

    return generate


def run(tiny: bool = False, quick: bool = False, batches=(1, 8, 64), prompt_len: int = 64, new_tokens: int = 64,
        repeats: int = 0, limits: dict | None = None, with_torch: bool = True) -> dict:
    cfg = common.tiny_model() if tiny else common.smollm2_135m()
    repeats = repeats or (2 if quick or tiny else 3)
    limits = limits or common.hardware_limits(quick or tiny)
    bandwidth, peak = limits["bandwidth"]["bytes_per_s"], limits["matmul"]["flops_per_s"]
    results = []
    for b in batches:
        tokens = random_prompt(b, prompt_len, cfg.vocab_size, seed=b)
        cases = {"instruct_jax": jax_generate(cfg, tokens, new_tokens)}
        if with_torch:
            cases["transformers"] = torch_generate(cfg, tokens, new_tokens)
        load = common.load_average()
        times = common.interleaved(cases, repeats)
        costs = decode_costs(cfg, b, prompt_len, new_tokens)
        row = {"batch": b, "load_average": load, "bytes_read": costs["bytes_read"], "flops": costs["flops"],
               "prefill_flops": costs["prefill_flops"], "floor_s": floor_seconds(costs, peak, bandwidth)}
        for name, t in times.items():
            row[name] = {**t, "new_tokens_per_s": b * new_tokens / t["median_s"],
                         "bandwidth_fraction": costs["bytes_read"] / t["median_s"] / bandwidth,
                         "compute_fraction": costs["flops"] / t["median_s"] / peak}
        if with_torch:
            row["speedup_vs_transformers"] = row["instruct_jax"]["new_tokens_per_s"] / \
                row["transformers"]["new_tokens_per_s"]
        results.append(row)
    return {"benchmark": "generate", "model": "tiny" if tiny else "SmolLM2-135M shape", "dtype": "float32",
            "prompt_len": prompt_len, "new_tokens": new_tokens, "sampling": "temperature 1, no top-k/top-p",
            "limits": limits, "results": results}


def table(result: dict) -> str:
    rows = []
    for r in result["results"]:
        for name in ("instruct_jax", "transformers"):
            if name in r:
                x = r[name]
                rows.append([r["batch"], name, x["new_tokens_per_s"], x["median_s"],
                             f"{100 * x['bandwidth_fraction']:.1f}%", f"{100 * x['compute_fraction']:.1f}%",
                             f"{r['speedup_vs_transformers']:.2f}x" if name == "instruct_jax" and
                             "speedup_vs_transformers" in r else ""])
    return common.markdown_table(["batch", "generate (64 + 64 new)", "new tokens/s", "s/call (median)",
                                  "of read bandwidth", "of f32 matmul peak", "vs transformers"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default="", help="JSON path (common.default_out)")
    args = parser.parse_args(argv)
    args.out = args.out or common.default_out("benchmarks_generate.json", args.tiny)
    result = run(tiny=args.tiny, quick=args.quick, batches=tuple(args.batches), repeats=args.repeats,
                 with_torch=not args.no_torch)
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    main()
