"""Profile summaries (jax.profiler) of the benchmarked steps: which ops, from which source, take the time.

    python benchmarks/profile_steps.py sft            # one SmolLM2-135M-shape SFT step, f32, 4 x 256
    python benchmarks/profile_steps.py generate --batch 8
    python benchmarks/profile_steps.py sft --tiny     # seconds

Prints the op groups (trace_summary.py) and writes them to docs/profile_<what>.json: the evidence
docs/BENCHMARKS.md cites where a target is missed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import generate  # noqa: E402
import sft_step  # noqa: E402
import trace_summary  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["sft", "generate"])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=0, help="rows (default: sft 4, generate 8)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    cfg = common.tiny_model() if args.tiny else common.smollm2_135m()
    if args.what == "sft":
        batch = args.batch or 4
        fn = sft_step.jax_step(cfg, batch, 256, sft_step.random_tokens(batch, 256, cfg.vocab_size))
    else:
        batch = args.batch or 8
        fn = generate.jax_generate(cfg, generate.random_prompt(batch, 64, cfg.vocab_size), 64)
    fn()  # compile and warm up
    summary = trace_summary.profile(fn, [fn.hlo()], top=args.top)
    summary.update(what=args.what, batch=batch, model="tiny" if args.tiny else "SmolLM2-135M shape",
                   machine=common.machine())
    out = args.out or common.default_out(f"profile_{args.what}.json", args.tiny)
    common.write_json(out, summary)
    print(trace_summary.format_summary(summary, f"{args.what} batch {batch}:"))
    return summary


if __name__ == "__main__":
    main()
