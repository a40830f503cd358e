"""What a compiled SPMD program says to other chips: every collective, the loop it runs in, and its bytes.

`collectives(hlo_text, slice_of)` reads the optimized HLO of a compiled step (`compiled.as_text()`;
per-device shapes after SPMD partitioning) and returns one `Collective` per collective instruction:
all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute (and their async `-start`
forms). For each it records

* the chain of `while` loops it runs inside (outermost first), each named by the source line that built
  it (the innermost instruct_jax frame of the loop's stack trace: `sampling.py:sample` is the decode
  loop) and its trip count, read from the loop condition's `counter < N` (a loop that may stop early,
  like decoding, is counted at its bound N);
* bytes per device per execution under a ring algorithm: all-gather receives (n-1)/n of its result,
  reduce-scatter and all-to-all move (n-1)/n of their operand, all-reduce 2 (n-1)/n, a permute its
  operand (n = the replica group's size);
* whether the group spans slices (DCN) or stays within one (ICI), from each partition's slice index; a
  multi-slice TPU program is compiled per slice and reaches other slices through megascale `send`s, each
  counted as a DCN collective of its transfer type over the target slices;
* whether the operand is loop-invariant data of the innermost loop (or a slice of it): the same bytes
  sent on every iteration, e.g. a weight re-gathered for every decoded token.

Pure text processing: tested on programs compiled for CPU devices and used by `plan` on TPU programs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np

OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
# Ops that pass their (largest) operand's data through: followed back when asking "is this loop-invariant?"
_PASS_THROUGH = {"bitcast", "copy", "convert", "reshape", "transpose", "dynamic-slice", "slice", "fusion",
                 "broadcast", "copy-start", "copy-done", "get-tuple-element", "all-gather", "all-gather-start",
                 "all-gather-done", "optimization-barrier"}

_COMPUTES = {"dot", "convolution", "reduce", "reduce-window", "scatter", "sort", "custom-call", "rng",
             "rng-bit-generator"}


@dataclasses.dataclass(frozen=True)
class Loop:
    where: str  # "sampling.py:sample" (innermost instruct_jax frame), or the HLO name when unknown
    trips: int  # the bound N of the condition's counter < N (1 when unknown)
    early_exit: bool  # the condition tests more than the counter (a decode loop stops when all rows are done)


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # one of OPS
    shape: str  # operand shape(s) per device, e.g. "bf16[256,128]"
    result: str  # result shape per device
    group_size: int
    bytes: float  # per device, per execution
    dcn: bool  # the replica group spans slices
    loops: tuple[Loop, ...]  # enclosing loops, outermost first
    invariant: bool  # the operand is (a slice of) data that does not change across the innermost loop
    source: str  # the instruction's op_name

    @property
    def executions(self) -> int:
        return math.prod(loop.trips for loop in self.loops)

    @property
    def bytes_per_step(self) -> float:
        return self.bytes * self.executions


# ----------------------------------------------------------------------------- parsing
@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    op: str
    operands: list[str]
    attrs: str
    args: str  # the text between the op's parentheses (a constant's value)


def _split_shape(rest: str) -> tuple[str, str]:
    """'(a, b) op(...)' or 'f32[2]{0} op(...)' -> (shape, remainder after it)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def _parse_instr(line: str) -> Optional[_Instr]:
    m = _INSTR.match(line)
    if not m:
        return None
    shape, rest = _split_shape(line[m.end():])
    op, _, rest = rest.partition("(")
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += rest[i] == "("
        depth -= rest[i] == ")"
        i += 1
    operands = re.findall(r"%([^\s,()]+)", rest[:i - 1])
    return _Instr(m.group(1), shape, op.strip(), operands, rest[i:], rest[:i - 1])


def _parse(text: str) -> tuple[dict[str, dict[str, _Instr]], dict[str, list[str]], Optional[str]]:
    """{computation: {instruction: _Instr}}, {computation: instruction names in order}, the entry's name."""
    comps, order, entry, current = {}, {}, None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                comps[current], order[current] = {}, []
                entry = current if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        ins = _parse_instr(line)
        if ins:
            comps[current][ins.name] = ins
            if line.lstrip().startswith("ROOT "):  # the root goes last: _invariant_indices reads it there
                order[current].insert(len(order[current]), ins.name)
                comps[current]["__root__"] = ins
            else:
                order[current].append(ins.name)
    return comps, order, entry


def _tables(text: str) -> tuple[dict[int, str], dict[int, str], dict[int, tuple[int, int, int]], dict[int, tuple]]:
    """The module's stack-trace tables: file names, function names, locations (file, function, line), frames."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = line
            sections[current] = []
        elif current and line.strip():
            sections[current].append(line)
        elif current:
            current = None
    names = {k: {int(line.split(" ", 1)[0]): line.split(" ", 1)[1].strip('"')
                 for line in sections.get(k, [])} for k in ("FileNames", "FunctionNames")}
    locations, frames = {}, {}
    for line in sections.get("FileLocations", []):
        f = dict(re.findall(r"(\w+)=(\d+)", line))
        locations[int(line.split(" ", 1)[0])] = (int(f["file_name_id"]), int(f["function_name_id"]), int(f["line"]))
    for line in sections.get("StackFrames", []):
        f = dict(re.findall(r"(\w+)=(\d+)", line))
        frames[int(line.split(" ", 1)[0])] = (int(f["file_location_id"]), int(f["parent_frame_id"]))
    return names["FileNames"], names["FunctionNames"], locations, frames


def _where(attrs: str, tables, package: str = "instruct_jax") -> Optional[str]:
    """'file.py:function' of the innermost frame inside `package` that the instruction was traced from."""
    m = re.search(r"stack_frame_id=(\d+)", attrs)
    if not m:
        return None
    files, functions, locations, frames = tables
    frame, seen = int(m.group(1)), set()
    while frame in frames and frame not in seen:
        seen.add(frame)
        location, parent = frames[frame]
        file_id, function_id, _ = locations.get(location, (0, 0, 0))
        path = files.get(file_id, "")
        if f"/{package}/" in path and not path.endswith("parallel/context.py"):
            return f"{path.rsplit('/', 1)[-1]}:{functions.get(function_id, '?').split('.<locals>')[0]}"
        if parent == frame:
            break
        frame = parent
    return None


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (a tuple's elements summed; layouts ignored)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _BYTES:
            total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _array_shapes(shape: str) -> list[str]:
    return [f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(shape) if dtype in _BYTES]


def _braced(attrs: str, key: str) -> Optional[str]:
    """The balanced {...} text after `key=` (e.g. '{{0,1},{2,3}}'), or None."""
    start = attrs.find(key + "={")
    if start < 0:
        return None
    i, depth = start + len(key) + 1, 0
    for j in range(i, len(attrs)):
        depth += attrs[j] == "{"
        depth -= attrs[j] == "}"
        if depth == 0:
            return attrs[i:j + 1]
    return None


def replica_groups(attrs: str, num_partitions: int) -> list[list[int]]:
    """The partition groups of a collective, from any of HLO's three spellings (or the permute's pairs)."""
    pairs = _braced(attrs, "source_target_pairs")
    if pairs is not None:
        return [[int(x) for x in g.split(",")] for g in re.findall(r"\{(\d+,\d+)\}", pairs)]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:  # mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: groups vary along the named axes
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        along = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        rest = [i for i in range(len(sizes)) if i not in along]
        return ids.transpose(rest + along).reshape(-1, math.prod(sizes[i] for i in along)).tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:  # iota: [groups, size] <= [dims] transposed by perm
        out_dims = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(out_dims[0], -1).tolist()
    explicit = _braced(attrs, "replica_groups")
    if explicit and explicit.strip("{}"):
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", explicit)]
    return [list(range(num_partitions))]  # {} : all partitions


def _trip_count(attrs: str, cond: str, comps) -> tuple[int, bool]:
    """(N, early_exit) of a while loop: XLA's known_trip_count when it recorded one, else the bound of the
    condition's `counter < N` (possibly and-ed with more tests: early_exit)."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if m:
        return int(m.group(1)), False
    def with_fusions(comp, depth=0):  # the condition's instructions and those of the fusions it calls
        for name, ins in comps.get(comp, {}).items():
            if name != "__root__":
                yield comp, ins
            callee = re.search(r"calls=%([^\s,}]+)", ins.attrs) if ins.op == "fusion" and depth < 4 else None
            if callee and name != "__root__":
                yield from with_fusions(callee.group(1), depth + 1)

    trips, early = None, False
    for comp, ins in with_fusions(cond):
        if ins.op == "compare" and "direction=LT" in ins.attrs and trips is None:
            instrs = comps[comp]
            bound = [instrs[o].args.strip() for o in ins.operands if o in instrs and instrs[o].op == "constant"]
            if bound and re.fullmatch(r"-?\d+", bound[0]):
                trips = int(bound[0])
                continue
        if ins.op not in ("constant", "parameter", "get-tuple-element", "bitcast", "copy", "fusion"):
            early = True
    return (trips if trips and trips > 0 else 1), early


def _invariant_indices(body: str, comps, order) -> set[int]:
    """Tuple indices of a while body's state that the body returns unchanged."""
    instrs = comps[body]
    params = {n for n, i in instrs.items() if i.op == "parameter"}
    root = instrs.get("__root__")
    out = set()
    if root is None or root.op != "tuple":
        return out
    for index, operand in enumerate(root.operands):
        ins = instrs.get(operand)
        if ins and ins.op == "get-tuple-element" and ins.operands and ins.operands[0] in params:
            m = re.search(r"index=(\d+)", ins.attrs)
            if m and int(m.group(1)) == index:
                out.add(index)
    return out


def _from_invariant(name: str, comp: str, comps, invariant: set[int], depth: int = 0) -> bool:
    """Does the value `name` carry (a slice of) loop-invariant state? Follows the largest data operand back."""
    instrs = comps[comp]
    ins = instrs.get(name)
    if ins is None or depth > 32:
        return False
    if ins.op == "get-tuple-element":
        src = instrs.get(ins.operands[0]) if ins.operands else None
        if src is not None and src.op == "parameter":
            m = re.search(r"index=(\d+)", ins.attrs)
            return bool(m) and int(m.group(1)) in invariant
    if ins.op == "constant":
        return False
    if ins.op not in _PASS_THROUGH:
        return False
    if ins.op == "fusion":  # data movement only: a fusion that computes (a matmul, a reduction) makes new data
        callee = re.search(r"calls=%([^\s,}]+)", ins.attrs)
        body = comps.get(callee.group(1), {}) if callee else {}
        if any(i.op in _COMPUTES for i in body.values()):
            return False
    data = [o for o in ins.operands if o in instrs]
    if not data:
        return False
    largest = max(data, key=lambda o: shape_bytes(instrs[o].shape))
    return _from_invariant(largest, comp, comps, invariant, depth + 1)


def _moved_bytes(op: str, operand_bytes: int, n: int) -> float:
    if n <= 1:
        return 0.0
    if op == "all-gather":
        return operand_bytes * (n - 1)
    if op == "all-reduce":
        return 2 * operand_bytes * (n - 1) / n
    if op == "collective-permute":
        return float(operand_bytes)
    return operand_bytes * (n - 1) / n  # reduce-scatter, all-to-all


def collectives(text: str, slice_of: Optional[Sequence[int]] = None) -> list[Collective]:
    """Every collective of a compiled program (see the module docstring); slice_of[partition] = slice index."""
    comps, order, entry = _parse(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    tables = _tables(text)
    m = re.search(r"num_partitions=(\d+)", text)
    partitions = int(m.group(1)) if m else 1
    # A multi-slice TPU program is one slice's: its partitions are that slice's devices (ICI collectives), and
    # traffic across slices goes through megascale sends (below). Slices map partitions only when they match.
    slices = list(slice_of) if slice_of is not None and len(slice_of) == partitions else [0] * partitions
    found: list[Collective] = []
    visiting: set[str] = set()

    def walk(comp: str, loops: tuple[Loop, ...], invariant: Optional[set[int]]):
        if comp in visiting or comp not in comps:
            return
        visiting.add(comp)
        instrs = comps[comp]
        for name in order[comp]:
            ins = instrs[name]
            base = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
            if base in OPS:
                operands = [instrs[o].shape for o in ins.operands if o in instrs]
                operand_shape = ", ".join(s for sh in operands for s in _array_shapes(sh))
                groups = replica_groups(ins.attrs, partitions)
                n = max(len(g) for g in groups) if base != "collective-permute" else 2
                span = any(len({slices[i] for i in g if i < len(slices)}) > 1 for g in groups)
                source = re.search(r'op_name="([^"]*)"', ins.attrs)
                inv = invariant is not None and any(_from_invariant(o, comp, comps, invariant) for o in ins.operands)
                found.append(Collective(
                    op=base, shape=operand_shape, result=", ".join(_array_shapes(ins.shape)), group_size=n,
                    bytes=_moved_bytes(base, sum(shape_bytes(s) for s in operands), n), dcn=span,
                    loops=loops, invariant=inv, source=source.group(1) if source else ""))
            megascale = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs) if ins.op == "send" else None
            if megascale:  # a multi-slice program sends across the DCN through the megascale runtime
                target = re.search(r'_xla_megascale_target="\{([\d,]*)\}', ins.attrs)
                n = len(target.group(1).split(",")) if target else 2
                base_op = megascale.group(1).lower().replace("_", "-")
                data = _array_shapes(ins.shape)[:1]
                source = re.search(r'_xla_host_transfer_rendezvous="([^"]*)"', ins.attrs)
                found.append(Collective(
                    op=base_op, shape=", ".join(data), result=", ".join(data), group_size=n,
                    bytes=_moved_bytes(base_op if base_op in OPS else "all-to-all", sum(map(shape_bytes, data)), n),
                    dcn=True, loops=loops, invariant=False, source=f"megascale {source.group(1) if source else ''}"))
            if ins.op == "while":
                body = re.search(r"body=%([^\s,]+)", ins.attrs).group(1)
                cond = re.search(r"condition=%([^\s,]+)", ins.attrs).group(1)
                trips, early = _trip_count(ins.attrs, cond, comps)
                loop = Loop(_where(ins.attrs, tables) or body, trips, early)
                walk(cond, loops + (loop,), None)
                walk(body, loops + (loop,), _invariant_indices(body, comps, order))
                continue
            for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([^\s,}]+)", ins.attrs):
                walk(callee, loops, invariant if ins.op in ("fusion", "async-start", "call") else None)
            m2 = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            for callee in re.findall(r"%([^\s,}]+)", m2.group(1)) if m2 else ():
                walk(callee, loops, None)
        visiting.discard(comp)

    walk(entry, (), None)
    return found


def attention_heads(text: str) -> list[int]:
    """Query heads each device attends with in the Splash kernel calls of a compiled TPU program: the head dim
    of the kernel's [batch, heads, length, head_dim] output (sorted, distinct). Empty without Splash."""
    comps, _, _ = _parse(text)
    heads = set()
    for instrs in comps.values():
        for name, ins in instrs.items():
            if ins.op == "custom-call" and name.startswith("splash_mha_fwd"):
                dims = [d for dtype, d in _ARRAY.findall(ins.shape) if d.count(",") == 3]
                if dims:
                    heads.add(int(dims[0].split(",")[1]))
    return sorted(heads)


# ----------------------------------------------------------------------------- summaries
def summary(found: Sequence[Collective]) -> dict:
    """Totals per step and the per-loop table `plan` prints and stores: JSON-able."""
    ici = sum(c.bytes_per_step for c in found if not c.dcn)
    dcn = sum(c.bytes_per_step for c in found if c.dcn)
    in_loops = []
    for c in found:
        if not c.loops:
            continue
        in_loops.append({"loop": " > ".join(f"{lp.where} x{lp.trips}{'(max)' if lp.early_exit else ''}"
                                            for lp in c.loops),
                         "innermost": c.loops[-1].where, "op": c.op, "shape": c.shape, "group": c.group_size,
                         "bytes": c.bytes, "executions": c.executions, "bytes_per_step": c.bytes_per_step,
                         "dcn": c.dcn, "invariant": c.invariant, "source": c.source})
    in_loops.sort(key=lambda r: -r["bytes_per_step"])
    return {"ici_bytes": ici, "dcn_bytes": dcn, "count": len(found), "in_loops": in_loops}
