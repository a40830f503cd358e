"""Attention memory (and time where it fits) at 4k-32k tokens: reference vs blockwise vs ring.

Run (writes docs/attention_memory.json; docs/LONG_CONTEXT.md holds the table):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python benchmarks/attention_memory.py [--time-max-len 4096] [--out docs/attention_memory.json]

What is measured: one causal attention forward + backward (gradients for q, k, v) of one
sequence, 8 query heads over 2 kv heads (GQA), head dim 64, float32. Memory comes from
`jax.jit(f).lower(...).compile().memory_analysis()`: XLA's own buffer plan, so the 32k
reference (a 32k x 32k score matrix per head) is measured without being allocated.
`temp_bytes` is the scratch the program needs beyond its inputs and outputs, i.e. the
activation memory that grows with length. For ring attention the numbers are per device,
with the sequence split over 8 devices of the `sequence` mesh axis. Time is the median of
a few runs after compilation, only up to --time-max-len (the CPU cannot run the 32k
reference; its memory plan alone says why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Runnable as `python benchmarks/attention_memory.py` from a fresh clone, package not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from instruct_jax.model.attention.blockwise import blockwise_attention
from instruct_jax.model.attention.masks import attention_mask, reference_attention
from instruct_jax.model.attention.ring import ring_attention
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import MeshConfig, make_mesh

LENGTHS = (4096, 8192, 16384, 32768)
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 64, 512


def attention_fn(impl: str):
    """(q, k, v, positions, segment_ids) -> (dq, dk, dv) of sum(attention output)."""

    def attend(q, k, v, pos, seg):
        if impl == "reference":
            return reference_attention(q, k, v, attention_mask(pos, pos, seg, seg))
        kernel = blockwise_attention if impl == "blockwise" else ring_attention
        return kernel(q, k, v, pos, pos, seg, seg, BLOCK, BLOCK)

    def grads(q, k, v, pos, seg):
        return jax.grad(lambda *qkv: attend(*qkv, pos, seg).sum(), argnums=(0, 1, 2))(q, k, v)

    return grads


def arguments(t: int, mesh=None):
    """Abstract (or, for timing, concrete) inputs; sharded over `sequence` when a mesh is given."""
    sharding = NamedSharding(mesh, P(None, "sequence")) if mesh is not None else None
    shapes = [((1, t, HEADS, HEAD_DIM), jnp.float32), ((1, t, KV_HEADS, HEAD_DIM), jnp.float32),
              ((1, t, KV_HEADS, HEAD_DIM), jnp.float32), ((1, t), jnp.int32), ((1, t), jnp.int32)]
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def concrete(t: int, mesh=None):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(1, t, HEADS, HEAD_DIM)), rng.normal(size=(1, t, KV_HEADS, HEAD_DIM)),
              rng.normal(size=(1, t, KV_HEADS, HEAD_DIM))]
    arrays = [jnp.asarray(a, jnp.float32) for a in arrays]
    arrays += [jnp.arange(t, dtype=jnp.int32)[None], jnp.ones((1, t), jnp.int32)]
    if mesh is not None:
        arrays = [jax.device_put(a, NamedSharding(mesh, P(None, "sequence"))) for a in arrays]
    return arrays


def measure(impl: str, t: int, time_it: bool) -> dict:
    mesh_cfg = MeshConfig(fsdp=1, sequence=8) if impl == "ring" else MeshConfig(fsdp=1)
    devices = jax.devices() if impl == "ring" else jax.devices()[:1]
    mesh = make_mesh(mesh_cfg, devices)
    with mesh_and_rules(mesh, mesh_cfg.logical_rules()):
        fn = jax.jit(attention_fn(impl))
        start = time.perf_counter()
        compiled = fn.lower(*arguments(t, mesh if impl == "ring" else None)).compile()
        compile_s = time.perf_counter() - start
        mem = compiled.memory_analysis()
        row = {"impl": impl, "length": t, "devices": len(devices), "temp_bytes": int(mem.temp_size_in_bytes),
               "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
               "compile_s": round(compile_s, 2), "step_s": None}
        if time_it:
            args = concrete(t, mesh if impl == "ring" else None)
            jax.block_until_ready(compiled(*args))
            runs = []
            for _ in range(3):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                runs.append(time.perf_counter() - start)
            row["step_s"] = round(statistics.median(runs), 3)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time-max-len", type=int, default=4096, help="time the runs up to this length (0: none)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "attention_memory.json"))
    args = parser.parse_args()
    rows = []
    for impl in ("reference", "blockwise", "ring"):
        for t in LENGTHS:
            row = measure(impl, t, time_it=t <= args.time_max_len)
            print(json.dumps(row), flush=True)
            rows.append(row)
    for impl in ("reference", "blockwise", "ring"):
        temp = {r["length"]: r["temp_bytes"] for r in rows if r["impl"] == impl}
        print(f"{impl}: temp memory 32k / 4k = {temp[32768] / temp[4096]:.1f}x")
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {jax.device_count()} emulated "
                   f"{jax.default_backend()} devices, JAX {jax.__version__}",
        "problem": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK, "batch": 1,
                    "dtype": "float32", "mask": "causal", "what": "forward + backward (dq, dk, dv)"},
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", os.path.abspath(args.out))


if __name__ == "__main__":
    main()
