"""What every performance benchmark shares: the model shape, the machine's limits, fair timing, JSON.

* `smollm2_135m()`: the SmolLM2-135M shape the issue fixes (30 layers, d_model 576, 9 heads / 3 KV
  heads, head 64, MLP 1536, vocabulary 49,152, tied embeddings), float32, randomly initialised:
  speed does not depend on the weights' values.
* `hf_model(cfg)`: the same architecture as a transformers `LlamaForCausalLM` (interop/hf_config.py
  writes its config.json), float32, eval mode, randomly initialised.
* `hardware_limits()`: this machine's f32 `jnp.dot` matmul peak and memory read bandwidth, measured
  by XLA in the calling process, so every fraction in a result is against the same run's limits.
* `interleaved(cases, repeats)`: each repeat runs every case in turn (an untimed call, then the
  timed one: steady state, not the first call after the other library) and the median per case is
  kept. On a shared machine the load drifts; interleaving exposes both systems to the same drift,
  so their ratio stays meaningful even when absolute times move.
* `machine()`: CPU model, cores, versions and the load average (`uptime`) at that moment.

Benchmarks run on the process's JAX devices as they are (one CPU device unless XLA_FLAGS says
otherwise); they never set device counts themselves.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instruct_jax.model.config import ModelConfig  # noqa: E402

DOCS = os.path.join(REPO, "docs")


def default_out(name: str, tiny: bool) -> str:
    """Where a script writes its JSON: docs/ for measurements, runs/benchmarks/ for --tiny script checks
    (a tiny run must never replace the measured numbers the docs quote)."""
    return os.path.join(REPO, "runs", "benchmarks", name) if tiny else os.path.join(DOCS, name)


# ----------------------------------------------------------------------------- model shapes
def smollm2_135m(**overrides) -> ModelConfig:
    """SmolLM2-135M's shape (vocabulary 49,152 as in its config.json), float32 unless overridden."""
    fields = dict(vocab_size=49152, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                  mlp_dim=1536, max_seq_len=2048, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)
    return ModelConfig(**{**fields, **overrides})


def tiny_model(**overrides) -> ModelConfig:
    """A seconds-sized stand-in with every feature of the real shape (GQA, tied embeddings): --tiny runs."""
    fields = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                  max_seq_len=512, tie_embeddings=True)
    return ModelConfig(**{**fields, **overrides})


def param_count(cfg: ModelConfig) -> int:
    """Weights of the model (embedding counted once when tied)."""
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    layer = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.num_layers * layer + cfg.vocab_size * d + head + d


def hf_model(cfg: ModelConfig, seed: int = 0):
    """transformers' LlamaForCausalLM with `cfg`'s architecture, float32, eval mode, random weights."""
    import torch
    import transformers

    from instruct_jax.interop.hf_config import hf_config_from_model

    torch.manual_seed(seed)
    hf = hf_config_from_model(cfg, "llama")
    hf.pop("architectures")
    hf.pop("model_type")
    config = transformers.LlamaConfig(**hf)
    return transformers.LlamaForCausalLM(config).float().eval()


def torch_threads() -> int:
    """Give PyTorch every core, as XLA's CPU backend takes them all."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


# ----------------------------------------------------------------------------- machine
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where the numbers came from: CPU, cores, JAX devices, library versions, the load right now."""
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "load_average_1_5_15": load_average(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------- hardware limits
def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` calls (after one warm-up call): the machine's limit, not its average."""
    jax.block_until_ready(fn())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> dict:
    """Best FLOP/s of one n x n `jnp.dot` (2 n^3 FLOPs) on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    seconds = _best_seconds(lambda: dot(a, b), repeats)
    return {"n": n, "dtype": jnp.dtype(dtype).name, "seconds": seconds, "flops_per_s": 2.0 * n**3 / seconds}


def read_bandwidth(mbytes: int = 512, repeats: int = 5) -> dict:
    """Best bytes/s of reading a float32 array of `mbytes` MiB once (a sum; the result is 4 KiB).

    The array is far larger than the caches (32 MiB L3 here), so this is DRAM read bandwidth as XLA
    reaches it: the rate decoding needs to stream the weights and the KV cache. The sum runs over
    rows of 1024 floats so every core takes a share of the rows.
    """
    rows = mbytes * 2**20 // 4 // 1024
    x = jnp.ones((rows, 1024), jnp.float32)
    total = jax.jit(lambda a: jnp.sum(a, axis=1))
    seconds = _best_seconds(lambda: total(x), repeats)
    return {"mbytes": mbytes, "seconds": seconds, "bytes_per_s": x.nbytes / seconds}


def hardware_limits(quick: bool = False) -> dict:
    """{"matmul": ..., "bandwidth": ...} measured now; --quick uses smaller problems."""
    return {"matmul": matmul_peak(1024 if quick else 2048, 3 if quick else 5),
            "bandwidth": read_bandwidth(128 if quick else 512, 3 if quick else 5)}


# ----------------------------------------------------------------------------- timing
def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                settle: int = 1) -> dict[str, dict]:
    """Median and spread of each case's seconds, the cases run in turn every repeat.

    Each callable must finish its work before returning (block_until_ready / a host value). The
    `warmup` first rounds (compilation, allocator warm-up) are run but not kept. In every round each
    case first runs `settle` untimed calls, then the timed one. Without it, the call right after
    another system's is slower than the same call in a loop (measured: the first instruct_jax SFT
    case of each round after a PyTorch step took 10.5-10.7 s, the same step 8.3-8.4 s when it
    followed another JAX step, whichever loss variant came first; most likely faulting in memory
    the other library freed). A training loop running steps back to back never pays that, so the
    timed call is each system's steady state, while interleaving still spreads a drift in the
    machine's load over every case.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(warmup + repeats):
        for name, fn in cases.items():
            for _ in range(settle if r >= warmup else 0):
                fn()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "repeats": len(ts)}
            for name, ts in times.items()}


def rounded(tree, digits: int = 4):
    """Floats rounded to `digits` significant digits, for readable JSON."""
    if isinstance(tree, dict):
        return {k: rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [rounded(v, digits) for v in tree]
    if isinstance(tree, (float, np.floating)):
        x = float(tree)
        return x if x == 0 or not math.isfinite(x) else round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return tree


def write_json(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rounded(result), f, indent=2)
        f.write("\n")


def finish(result: dict, out: str, table: Callable[[dict], str]) -> dict:
    """A script's last step: record the machine, write the JSON to `out`, print the table."""
    result["machine"] = machine()
    write_json(out, result)
    print(table(result))
    return result


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
