"""Every CPU performance benchmark in one run: the machine's limits once, then SFT, generation and PPO.

    python benchmarks/run_all.py                  # full workloads, 5 repeats
    python benchmarks/run_all.py --quick          # 2 repeats (15 minutes on an idle 2-core CPU)
    python benchmarks/run_all.py --tiny           # a tiny model: checks the scripts in about a minute
    python benchmarks/run_all.py --only sft generate --batches 8
    python benchmarks/run_all.py --render docs/benchmarks.json --write-doc   # re-render, measure nothing

Writes docs/benchmarks.json (every number, the machine and its load average before and after) and
prints the markdown tables; with --write-doc it also replaces the generated section of
docs/BENCHMARKS.md (between the `results:start` / `results:end` markers), so the document never holds
a number this script did not produce. Measure on an idle machine: timings on a loaded one are slower
and noisier, though each instruct_jax / transformers pair is interleaved, so their ratio holds up better.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import generate  # noqa: E402
import ppo_iteration  # noqa: E402
import sft_step  # noqa: E402

DOC = os.path.join(common.DOCS, "BENCHMARKS.md")
START, END = "<!-- results:start (benchmarks/run_all.py --write-doc) -->", "<!-- results:end -->"
TARGETS = {"sft_speedup": 1.0, "sft_mfu": 0.65, "generate_speedup": 3.0, "ppo_rollout_share": 0.5}


def targets(result: dict) -> list[list]:
    """Rows of (target, measured, met?, what meeting it takes) for the issue's CPU targets in `result`.

    "What meeting it takes" is the share of the machine's limits the target asks for: for SFT, the
    fraction of the matmul peak at which a step would match transformers; for generation, the call
    time's floor on this machine (generate.floor_seconds) over the time the target allows, where more
    than 100% means no implementation on this machine can meet it."""
    rows = []
    if "sft" in result:
        s = result["sft"]
        mfu = s["results"]["instruct_jax"]["mfu_vs_measured_peak"]
        if "speedup_vs_transformers" in s:
            needed = s["results"]["transformers"]["mfu_vs_measured_peak"] * TARGETS["sft_speedup"]
            rows.append(["SFT tokens/s vs transformers", ">= 1.0x", f"{s['speedup_vs_transformers']:.2f}x",
                         s["speedup_vs_transformers"] >= TARGETS["sft_speedup"],
                         f"{100 * needed:.0f}% of the matmul peak"])
        rows.append(["SFT fraction of f32 matmul peak", ">= 65%", f"{100 * mfu:.1f}%", mfu >= TARGETS["sft_mfu"], ""])
    for r in result.get("generate", {}).get("results", []):
        if r["batch"] in (8, 64) and "speedup_vs_transformers" in r:
            allowed = r["transformers"]["median_s"] / TARGETS["generate_speedup"]
            rows.append([f"generate batch {r['batch']} vs transformers", ">= 3x",
                         f"{r['speedup_vs_transformers']:.2f}x",
                         r["speedup_vs_transformers"] >= TARGETS["generate_speedup"],
                         f"{allowed:.3g} s/call, floor {r['floor_s']:.3g} s: needs "
                         f"{100 * r['floor_s'] / allowed:.0f}% of roofline speed" if "floor_s" in r else ""])
    if "ppo" in result:
        share = result["ppo"]["phases"]["rollout"]["share_of_iteration"]
        rows.append(["PPO rollout share of the iteration", "<= 50%", f"{100 * share:.0f}%",
                     share <= TARGETS["ppo_rollout_share"], ""])
    return [row[:3] + ["yes" if row[3] else "**no**", row[4]] for row in rows]


def markdown(result: dict) -> str:
    m = result["machine"]
    lim = result["limits"]
    parts = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['jax_devices']}; jax {m['jax']}, "
             f"torch {m.get('torch', '-')} ({m.get('torch_threads', '-')} threads), transformers "
             f"{m.get('transformers', '-')}; load average before / after: {result['load_average_before']} / "
             f"{result['load_average_after']}; {m['time_utc']} UTC.",
             f"Limits measured in the same run: f32 `jnp.dot` peak {lim['matmul']['flops_per_s'] / 1e9:.0f} GFLOP/s "
             f"(n = {lim['matmul']['n']}), read bandwidth {lim['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s "
             f"({lim['bandwidth']['mbytes']} MiB)."]
    if "sft" in result:
        parts.append(sft_step.table(result["sft"]))
    if "generate" in result:
        parts.append(generate.table(result["generate"]))
    if "ppo" in result:
        parts.append(ppo_iteration.table(result["ppo"]))
    parts.append(common.markdown_table(["target (2-core CPU)", "wanted", "measured", "met", "what meeting it takes"],
                                       targets(result)))
    return "\n\n".join(parts)


def write_doc(text: str, path: str = DOC) -> None:
    with open(path) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{path} has no {START} ... {END} section to replace")
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + START + "\n" + text + "\n" + END + tail)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=["sft", "generate", "ppo"], default=["sft", "generate", "ppo"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64], help="generation batch sizes")
    parser.add_argument("--out", default="", help="JSON path (common.default_out)")
    parser.add_argument("--write-doc", action="store_true", help="replace the generated section of docs/BENCHMARKS.md")
    parser.add_argument("--render", metavar="JSON", help="measure nothing: print (and with --write-doc, write) "
                        "the tables of an earlier run's JSON")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            return report(json.load(f), args.write_doc)
    args.out = args.out or common.default_out("benchmarks.json", args.tiny)
    if args.tiny and args.write_doc:
        parser.error("--write-doc with --tiny: docs/BENCHMARKS.md quotes measurements; --tiny only checks scripts")
    common.torch_threads()
    result = {"benchmark": "run_all", "tiny": args.tiny, "quick": args.quick, "load_average_before": common.load_average()}
    result["limits"] = limits = common.hardware_limits(args.quick or args.tiny)
    if "sft" in args.only:
        # the fused, chunked cross-entropy alongside the default full-logits loss: its cost in speed
        result["sft"] = sft_step.run(tiny=args.tiny, quick=args.quick, limits=limits,
                                     variants={"loss_chunk=64": {"loss_chunk": 64}})
    if "generate" in args.only:
        result["generate"] = generate.run(tiny=args.tiny, quick=args.quick, batches=tuple(args.batches), limits=limits)
    if "ppo" in args.only:
        result["ppo"] = ppo_iteration.run(tiny=args.tiny, quick=args.quick, limits=limits)
    result["load_average_after"] = common.load_average()
    result["machine"] = common.machine()
    common.write_json(args.out, result)
    return report(result, args.write_doc)


def report(result: dict, write: bool) -> dict:
    text = markdown(result)
    print(text)
    if write:
        write_doc(text)
    return result


if __name__ == "__main__":
    main()
