"""Loader throughput in tokens/s on the data files in data/: how fast the input pipeline can feed a step.

    python benchmarks/loader_throughput.py                  # table on stdout, JSON to --out
    python benchmarks/loader_throughput.py --seconds 1 --out /tmp/loader.json

Each case prepares its examples once (read, tokenize: reported as prepare_s), then builds batches
for about `--seconds` of wall-clock: first `global_batch(step)` alone (numpy, one host building
every row), then through `iterate(0, sharding)` with background prefetch, which adds the transfer
into jax.Arrays over all local devices. tokens/s counts real (non-padding) tokens; fill is the
fraction of positions that are real tokens (what packing buys). The same run measures the
tiny model's training tokens/s (experiments/tiny_cpu.py, SFT step): the loader keeps up when its
tokens/s is well above the model's.

For the formats a tokenised store holds (text, sft, prompt; `data.store`), the same case also runs through
a store: `store_prepare_s` (tokenise and write, one host), `global_batch` built from the store (examples read
from memory-mapped files per step), and one host of 4 building its quarter of the rows (every 4th row, as
interleaved as a pod's), with the share of the store's examples that host read per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from instruct_jax.data.build import load_data, load_stored_data, make_loader, prepare_store  # noqa: E402
from instruct_jax.data.config import DataConfig  # noqa: E402
from instruct_jax.data.formats import SELF_INSTRUCT_FIELDS  # noqa: E402
from instruct_jax.data.tokenizer import train_sentencepiece  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def cases(shared: str) -> list[dict]:
    """(name, DataConfig, global batch, seq_len): one per format the phases read."""
    self_instruct = {k: v for k, v in SELF_INSTRUCT_FIELDS.items() if k != "format"}
    return [
        {"name": "text packed (tinyshakespeare)", "batch": 32, "seq_len": 256,
         "cfg": DataConfig(source=f"{shared}/tinyshakespeare.txt", format="text")},
        {"name": "sft packed (self-instruct)", "batch": 16, "seq_len": 512,
         "cfg": DataConfig(source=f"{shared}/self_instruct_seed_tasks.jsonl", **self_instruct)},
        {"name": "sft padded (self-instruct)", "batch": 16, "seq_len": 512,
         "cfg": DataConfig(source=f"{shared}/self_instruct_seed_tasks.jsonl", packing=False, **self_instruct)},
        {"name": "pairwise (hh-rlhf, K=2)", "batch": 16, "seq_len": 512,
         "cfg": DataConfig(source=f"{shared}/hh_helpful_base_test.jsonl.gz", format="pairwise", transcript="hh")},
        {"name": "prompts (hh-rlhf, left-padded)", "batch": 64, "seq_len": 512,
         "cfg": DataConfig(source=f"{shared}/hh_helpful_base_test.jsonl.gz", format="prompt", transcript="hh",
                           prompt_field="chosen")},
    ]


def real_tokens(batch: dict) -> tuple[int, int]:
    """(non-padding tokens, positions) of a batch."""
    seg = np.asarray(batch["segment_ids"])
    return int((seg > 0).sum()), seg.size


def measure(make_batch, seconds: float) -> dict:
    """Build batches for step 0, 1, ... until `seconds` pass; tokens/s over real tokens."""
    tokens = positions = steps = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        t, p = real_tokens(make_batch(steps))
        tokens, positions, steps = tokens + t, positions + p, steps + 1
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": round(elapsed, 3), "tokens_per_s": round(tokens / elapsed),
            "batches_per_s": round(steps / elapsed, 1), "fill": round(tokens / positions, 3)}


def tiny_model_tokens_per_s(seconds: float) -> dict:
    """Training tokens/s (all positions) of experiments/tiny_cpu.py's SFT step on the local devices."""
    from instruct_jax.config import apply_overrides, load_experiment
    from instruct_jax.train.lm.build import build_lm

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = apply_overrides(load_experiment(os.path.join(repo, "experiments", "tiny_cpu.py") + ":sft"), ["mesh.data=1"])
    b, t = cfg.train.global_batch_size, cfg.train.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(8, cfg.model.vocab_size, size=(b, t)).astype(np.int32)
    batch = {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": np.ones((b, t), np.float32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32)}
    setup = build_lm(cfg)
    state = setup.init_state()
    state, metrics = setup.train_step(state, batch)  # compile
    jax.block_until_ready(metrics)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 3:
        state, metrics = setup.train_step(state, batch)
        jax.block_until_ready(metrics)
        steps += 1
    elapsed = time.perf_counter() - start
    return {"global_batch": b, "seq_len": t, "steps": steps, "tokens_per_s": round(steps * b * t / elapsed)}


def store_case(cfg, tok, batch: int, seq_len: int, seconds: float, folder: str) -> dict:
    """The case through a tokenised store: prepare time, batches from it, and one host of 4's share."""
    t0 = time.perf_counter()
    prepare_store(cfg, tok, seq_len=seq_len, seed=0, folder=folder)
    prepare_s = time.perf_counter() - t0
    store = load_stored_data(cfg, tok, seq_len=seq_len, seed=0, folder=folder).train
    loader = make_loader(store, cfg, tok, global_batch_size=batch, seq_len=seq_len, seed=0)
    whole = measure(loader.global_batch, seconds)
    rows = np.arange(0, batch, 4)  # host 0 of 4, rows interleaved
    store.reads = 0
    host = measure(lambda step: loader.rows_at(step, rows), seconds)
    return {"prepare_s": round(prepare_s, 2), "numpy": whole, "host_0_of_4": host,
            "host_0_of_4_reads_per_step": round(store.reads / host["steps"], 1), "store_examples": len(store)}


def run(seconds: float, shared: str) -> dict:
    workdir = tempfile.mkdtemp(prefix="loader_bench_")
    tok = train_sentencepiece([f"{shared}/tinyshakespeare.txt"], f"{workdir}/spm", vocab_size=1024)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    results = []
    for case in cases(shared):
        cfg, batch, seq_len = case["cfg"], case["batch"], case["seq_len"]
        t0 = time.perf_counter()
        data = load_data(cfg, tok, seq_len=seq_len, seed=0)
        prepare_s = time.perf_counter() - t0
        loader = make_loader(data.train, cfg, tok, global_batch_size=batch, seq_len=seq_len, seed=0)
        numpy_stats = measure(loader.global_batch, seconds)
        with loader.iterate(0, sharding, prefetch=4) as it:
            jax_stats = measure(lambda _: jax.block_until_ready(next(it)), seconds)
        row = {"case": case["name"], "format": cfg.format, "packing": loader.packing,
               "global_batch": batch, "seq_len": seq_len, "examples": len(data.train),
               "prepare_s": round(prepare_s, 2), "numpy": numpy_stats, "sharded_prefetch": jax_stats}
        if cfg.format in ("text", "sft", "prompt"):
            row["store"] = store_case(cfg, tok, batch, seq_len, seconds, tempfile.mkdtemp(dir=workdir))
        results.append(row)
    return {"benchmark": "loader_throughput", "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
            "jax_devices": f"{len(jax.devices())} x {jax.devices()[0].platform}", "tokenizer": repr(tok),
            "seconds_per_case": seconds, "results": results,
            "tiny_model_train": tiny_model_tokens_per_s(seconds)}


def table(report: dict) -> str:
    head = f"{'case':34} {'B x T':>10} {'fill':>5} {'numpy tok/s':>12} {'sharded tok/s':>14} {'prep s':>7}"
    lines = [f"loader throughput on {report['machine']} ({report['jax_devices']})", head, "-" * len(head)]
    for r in report["results"]:
        shape = f"{r['global_batch']}x{r['seq_len']}"
        lines.append(f"{r['case']:34} {shape:>10} {r['numpy']['fill']:>5.2f} {r['numpy']['tokens_per_s']:>12,} "
                     f"{r['sharded_prefetch']['tokens_per_s']:>14,} {r['prepare_s']:>7.2f}")
    lines.append("")
    head = f"{'through a store':34} {'prep s':>7} {'numpy tok/s':>12} {'1 of 4 hosts tok/s':>19} {'read/step':>10}"
    lines += [head, "-" * len(head)]
    for r in report["results"]:
        if "store" in r:
            st = r["store"]
            lines.append(f"{r['case']:34} {st['prepare_s']:>7.2f} {st['numpy']['tokens_per_s']:>12,} "
                         f"{st['host_0_of_4']['tokens_per_s']:>19,} "
                         f"{st['host_0_of_4_reads_per_step']:>5.1f}/{st['store_examples']}")
    m = report["tiny_model_train"]
    lines.append(f"tiny_cpu.py SFT train step ({m['global_batch']}x{m['seq_len']}): {m['tokens_per_s']:,} tokens/s "
                 f"-- the loader must stay well above this")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="measuring time per case and path")
    parser.add_argument("--shared", default=SHARED, help="folder with the data files (default: data/)")
    parser.add_argument("--out", default="docs/loader_throughput.json", help="where the JSON report goes")
    args = parser.parse_args()
    report = run(args.seconds, os.path.normpath(args.shared))
    print(table(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
