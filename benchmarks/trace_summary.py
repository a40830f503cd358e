"""Where a jitted step's time goes: a jax.profiler trace reduced to a table of XLA ops by source.

    summary = profile(fn, compiled_hlo_texts, steps=1)     # fn runs the step(s) to completion
    print(format_summary(summary))

`profile` traces `fn` with `jax.profiler` (Perfetto JSON), sums the duration of every XLA op event
(fusions, dots, copies: the names in the compiled HLO), and labels each op with the source it came
from: the `op_name` metadata XLA keeps on every instruction (e.g.
`jit(step)/jvp(Transformer)/layers/while/body/attn/dot_general`), shortened to the model-level part.
Ops are grouped by that label, so "attn/dot_general" collects every attention matmul of every
layer, forward and backward (transpose(jvp(...)) marks the backward).

The CPU backend runs one op at a time per step (its thunk executor), so op time adds up to about the
step's wall time; the table shows each group's share.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Callable, Iterable

import jax

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")
_NOISE = re.compile(r"^(jit\([^)]*\)/)+|pjit\([^)]*\)/|checkpoint/|rematted_computation/|while/body/|"
                    r"while/cond/|closed_call/|remat\([^)]*\)/")


def op_sources(hlo_texts: Iterable[str]) -> dict[str, str]:
    """HLO instruction name -> its op_name metadata, from compiled HLO text(s)."""
    names = {}
    for text in hlo_texts:
        for line in text.splitlines():
            m = _INSTR.match(line)
            if m:
                names.setdefault(m.group(1), m.group(2))
    return names


def short_source(op_name: str, depth: int = 4) -> str:
    """The last `depth` meaningful parts of an op_name, with the backward pass marked."""
    backward = "transpose(" in op_name
    cleaned = _NOISE.sub("", re.sub(r"(transpose|jvp|vmap)\(([^()]*)\)", r"\2", op_name))
    parts = [p for p in cleaned.split("/") if p and not p.startswith("jit(")]
    label = "/".join(parts[-depth:])
    return ("bwd: " if backward else "") + label


def trace_events(logdir: str) -> list[dict]:
    path = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(fn: Callable[[], object], hlo_texts: Iterable[str], top: int = 25, depth: int = 4) -> dict:
    """Run fn under the profiler; {"wall_ms", "op_ms", "groups": [{"source", "ms", "share", "ops"}], "top_ops"}."""
    sources = op_sources(hlo_texts)
    with tempfile.TemporaryDirectory() as logdir:
        import time

        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        events = trace_events(logdir)
    per_op = collections.Counter()
    for e in events:
        if "dur" in e and e.get("name") in sources:
            per_op[e["name"]] += e["dur"] / 1e3
    groups = collections.defaultdict(lambda: {"ms": 0.0, "ops": 0})
    for name, ms in per_op.items():
        g = groups[short_source(sources[name], depth)]
        g["ms"] += ms
        g["ops"] += 1
    op_ms = sum(per_op.values())
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["ms"])
    return {"wall_ms": wall * 1e3, "op_ms": op_ms,
            "groups": [{"source": k, "ms": v["ms"], "share": v["ms"] / max(op_ms, 1e-9), "ops": v["ops"]}
                       for k, v in ranked[:top]],
            "top_ops": [{"op": n, "source": sources[n], "ms": ms} for n, ms in per_op.most_common(top)]}


def format_summary(summary: dict, title: str = "") -> str:
    lines = [f"{title} wall {summary['wall_ms']:.0f} ms, XLA ops {summary['op_ms']:.0f} ms".strip()]
    for g in summary["groups"]:
        lines.append(f"  {g['ms']:9.1f} ms {100 * g['share']:5.1f}%  ({g['ops']:3d} ops)  {g['source']}")
    return "\n".join(lines)
