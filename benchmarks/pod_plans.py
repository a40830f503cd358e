"""Compile the pod experiments for their TPU topologies and record the plans in docs/plans.json.

    python benchmarks/pod_plans.py                      # every plan below (the 540B ones take minutes each)
    python benchmarks/pod_plans.py --only 540b-v5p-sft  # one plan, merged into the existing JSON

Each entry is `python -m instruct_jax plan` (instruct_jax/plan.py) run in its own subprocess on this
CPU-only machine; docs/PLANS.md tabulates the JSON. Entries that vary a setting (remat, microbatches)
answer "what change makes it fit".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from instruct_jax import plan  # noqa: E402

OUT = os.path.join(REPO, "docs", "plans.json")
E = os.path.join(REPO, "experiments")

# name -> (experiment, topology, slices, phases, overrides)
PLANS = {
    "8b-sft-v5p128": (f"{E}/llama3_8b_sft_v5p128.py", "v5p:4x4x4", 1, ("sft", "rm"), ()),
    "8b-ppo-v5p128": (f"{E}/llama3_8b_ppo_v5p128.py", "v5p:4x4x4", 1, ("ppo",), ()),
    # the 8B decoder with a SigLIP So400m tower (docs/MULTIMODAL.md), and the same experiment with the tower off
    "8b-siglip-sft-v5p128": (f"{E}/llama3_8b_multimodal_v5p128.py", "v5p:4x4x4", 1, ("sft",), ()),
    "8b-siglip-sft-v5p128-novision": (f"{E}/llama3_8b_multimodal_v5p128.py", "v5p:4x4x4", 1, ("sft",),
                                      ("model.vision.image_size=0",)),
    # LoRA (rank 16 on every projection): optimizer state for the adapters alone, the base doubling as reference
    "8b-ppo-v5p128-lora": (f"{E}/llama3_8b_ppo_v5p128.py", "v5p:4x4x4", 1, ("ppo",),
                           ("model.lora_rank=16", "model.lora_targets=q,k,v,o,gate,up,down")),
    "62b-v5p-sft": (f"{E}/palm.py:62b-v5p", "v5p:8x8x8", 1, ("sft",), ()),
    "62b-v4-sft": (f"{E}/palm.py:62b-v4", "v4:8x8x8", 1, ("sft",), ()),
    "62b-v4-sft-micro2": (f"{E}/palm.py:62b-v4", "v4:8x8x8", 1, ("sft",), ("train.microbatches=2",)),
    "540b-v5p-sft": (f"{E}/palm.py:540b-v5p", "v5p:16x16x24", 1, ("sft",), ()),
    "540b-v4-sft": (f"{E}/palm.py:540b-v4", "v4:16x16x12", 2, ("sft",), ()),
    "540b-v5p-ppo": (f"{E}/palm.py:540b-v5p-ppo", "v5p:16x16x24", 1, ("ppo",), ()),
    "540b-v4-ppo": (f"{E}/palm.py:540b-v4-ppo", "v4:16x16x12", 2, ("ppo",), ()),
}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "jax": importlib.metadata.version("jax"), "libtpu": importlib.metadata.version("libtpu")}


def table(results: dict) -> str:
    """Markdown rows of every recorded plan: one row per compiled step, GiB and GB per device.

    ICI / DCN GB: collective bytes per device per step read from the compiled program; s FLOPs / ICI / DCN: the
    floors plan.floors computes; MFU<=: model FLOPs at peak over the largest floor. Plans recorded before the
    compiled program was read (no `ici_bytes`) show '-' there."""
    rows = ["| plan | devices | step | params + opt GiB | temp GiB | total GiB | HBM GiB | fits | TFLOP model | "
            "ICI GB | DCN GB | s FLOPs | s ICI | s DCN | MFU<= | compile s |", "|" + "---|" * 16]
    for name, r in sorted(results["plans"].items()):
        hbm = r["hbm_bytes_per_device"]
        for ph in r["phases"]:
            if "error" in ph:  # the compiler's own out-of-HBM message, or whatever stopped the compile
                why = ("**no**: " + ph["error"].split("RESOURCE_EXHAUSTED: ")[-1] if ph.get("out_of_memory")
                       else "did not compile: " + ph["error"])
                rows.append(f"| {name} | {r['devices']} | {ph['phase']} | | | | "
                            f"{r['hbm_bytes_per_device'] / plan.GIB:.0f} | {why} | | | | | | | | |")
                continue
            for p in ph["pieces"]:
                state = (ph["params_bytes"] + ph["optimizer_bytes"]) / plan.GIB
                if "ici_bytes" in p:
                    f = plan.floors(p, r)
                    comm = (f"{p['ici_bytes'] / 1e9:.1f} | {p['dcn_bytes'] / 1e9:.2f} | {f['flops_s']:.2f} | "
                            f"{f['ici_s']:.2f} | {f['dcn_s']:.2f} | {f['mfu_bound']:.0%}")
                else:
                    comm = (f"- | - | {p['flops_hardware'] / r['peak_flops_per_device']:.2f} | - | - | -")
                rows.append(f"| {name} | {r['devices']} | {ph['phase']} {p['name']} | {state:.1f} | "
                            f"{p['temp'] / plan.GIB:.1f} | {p['total'] / plan.GIB:.1f} | {hbm / plan.GIB:.0f} | "
                            f"{'yes' if p['total'] <= hbm else '**no**'} | {p['flops_model'] / 1e12:.0f} | "
                            f"{comm} | {p['compile_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", default=None, choices=sorted(PLANS))
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], help="extra overrides for --only runs")
    ap.add_argument("--name", default=None, help="record under this name (a variant of one --only plan)")
    ap.add_argument("--table", action="store_true", help="print the recorded plans as a markdown table")
    ap.add_argument("--out", default=OUT, help="the JSON file plans are merged into")
    args = ap.parse_args()
    results = json.load(open(args.out)) if os.path.exists(args.out) else {"plans": {}}
    if args.table:
        print(table(results))
        return
    for name in args.only or sorted(PLANS):
        experiment, topology, slices, phases, overrides = PLANS[name]
        start = time.perf_counter()
        result = plan.run_in_subprocess(experiment, topology, slices, phases, [*overrides, *args.overrides])
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["overrides"] = [*overrides, *args.overrides]
        if os.path.exists(args.out):  # another run may have recorded plans meanwhile: merge, don't clobber
            results = json.load(open(args.out))
        results["plans"][args.name or name] = result
        results["machine"] = machine()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
        print(f"{args.name or name}: {result['wall_s']} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
