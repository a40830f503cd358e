"""A tokenised example store: examples prepared once, on disk or in a bucket, and read by index.

Why: in memory, every host of a pod would read and tokenise the whole dataset before its first step. With a
store (`data.store`), each host tokenises only its share of the source once (`build.prepare_store`: files
dealt round-robin to hosts, or rows when there are fewer files than hosts or a row cap; a Hub dataset is
streamed and split by node) and writes one part; afterwards every host reads the small index (the examples'
offsets, from which the loader plans every batch) and, per step, the tokens of exactly the examples in the
rows its devices hold (`ExampleStore.fetch`), from a memory map locally or by ranged reads in a bucket.

Layout (one folder per side, `train/` and `eval/`, each holding the parts written by P preparing hosts):

    <store>/train/part-00000-of-00002/ids.bin        int32, every example's tokens end to end
                                      weights.bin    uint8 (LM examples): 1 where the token is a target
                                      offsets.npy    int64 [n + 1]: example i is ids[offsets[i]:offsets[i + 1]]
                                      meta.json      written last: kind, counts, DataStats, the config key
    <store>/train/part-00001-of-00002/...

Example i of the store is example i of the parts laid end to end. Prepared by one host, the order is exactly
that of the in-memory path (`load_data`), so both give the same batches bit for bit. A part whose meta.json
is missing was interrupted and is prepared again; a part whose key differs (another source, tokenizer,
sequence length, ...) is an error naming `data.store` rather than data silently reused.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
from typing import Iterable, Optional, Sequence

import numpy as np

from instruct_jax import files
from instruct_jax.data.config import DataConfigError
from instruct_jax.data.examples import LMExample, PromptExample
from instruct_jax.data.stats import DataStats

_KINDS = {"lm": LMExample, "prompt": PromptExample}
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})$")
_REMOTE_READERS = 16  # concurrent ranged reads per fetch from a bucket


def part_name(index: int, count: int) -> str:
    return f"part-{index:05d}-of-{count:05d}"


def part_done(folder: str, key: str) -> bool:
    """True when the part at `folder` was written whole for `key`; an error when it was written for another."""
    meta = files.join(folder, "meta.json")
    if not files.isfile(meta):
        return False
    found = json.loads(files.read_text(meta))["key"]
    if found != key:
        raise DataConfigError("data.store", f"{folder} was prepared for another data configuration (key {found}, "
                                            f"this run's {key}: source, format, fields, tokenizer, sequence length "
                                            "or eval split differ); delete it or point data.store elsewhere")
    return True


def write_part(folder: str, examples: Sequence, stats: DataStats, key: str) -> None:
    """Write examples (all LMExample or all PromptExample) and their stats as one part; meta.json last."""
    kind = "prompt" if examples and isinstance(examples[0], PromptExample) else "lm"
    example_type = _KINDS[kind]
    if not all(isinstance(e, example_type) for e in examples):
        raise TypeError(f"a store part holds one kind of example; got {sorted({type(e).__name__ for e in examples})}")
    offsets = np.zeros(len(examples) + 1, np.int64)
    offsets[1:] = np.cumsum([len(e.ids) for e in examples])
    ids = np.concatenate([e.ids for e in examples]).astype(np.int32) if examples else np.zeros(0, np.int32)
    files.write_bytes(files.join(folder, "ids.bin"), ids.tobytes())
    if kind == "lm":
        weights = np.concatenate([e.weights for e in examples]) if examples else np.zeros(0, np.float32)
        if not np.isin(weights, (0.0, 1.0)).all():
            raise ValueError("store parts keep 0/1 target weights; these examples carry other values")
        files.write_bytes(files.join(folder, "weights.bin"), weights.astype(np.uint8).tobytes())
    with files.path(files.join(folder, "offsets.npy")).open("wb") as f:
        np.save(f, offsets)
    stats_dict = {**stats.as_dict(), "where": stats.where}
    files.write_text(files.join(folder, "meta.json"), json.dumps(
        {"kind": kind, "examples": len(examples), "tokens": int(offsets[-1]), "stats": stats_dict, "key": key}))


def complete_parts(folder: str, key: str) -> Optional[list[str]]:
    """The part folders of one complete preparation under `folder` (all P parts written for `key`), or None."""
    if not files.isdir(folder):
        return None
    by_count: dict[int, dict[int, str]] = {}
    for name in files.listdir(folder):
        match = _PART.match(name)
        if match and part_done(files.join(folder, name), key):
            by_count.setdefault(int(match.group(2)), {})[int(match.group(1))] = files.join(folder, name)
    for count, parts in sorted(by_count.items()):
        if len(parts) == count:
            return [parts[i] for i in range(count)]
    return None


class ExampleStore:
    """The examples of one side of a store, read by index: `len`, `lengths`, `store[i]`, `fetch(ids)`.

    Only the index (offsets) is read when opened; tokens are read when asked for. `reads` counts the examples
    fetched so far (tests use it to check that a host reads only the examples of its rows).
    """

    def __init__(self, parts: Sequence[str]):
        if not parts:
            raise ValueError("an example store needs at least one part")
        self.parts = list(parts)
        metas = [json.loads(files.read_text(files.join(p, "meta.json"))) for p in self.parts]
        kinds = {m["kind"] for m in metas if m["examples"]} or {metas[0]["kind"]}
        if len(kinds) != 1:
            raise ValueError(f"store parts hold different kinds of example: {sorted(kinds)}")
        self.kind = kinds.pop()
        self.example_type = _KINDS[self.kind]
        self.stats = DataStats(name=metas[0]["stats"]["name"])
        for m in metas:
            self.stats = self.stats.merge(DataStats.from_dict(m["stats"]))
        self._offsets = []
        for p in self.parts:
            with files.path(files.join(p, "offsets.npy")).open("rb") as f:
                self._offsets.append(np.load(f))
        counts = np.array([len(o) - 1 for o in self._offsets], np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])  # first store index of each part
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64) - 1 \
            if counts.sum() else np.zeros(0, np.int64)  # positions each LM example fills (LMExample.length)
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self.remote = files.is_remote(self.parts[0])
        self.reads = 0

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index: int):
        return self.fetch([index])[int(index)]

    def __iter__(self):
        for start in range(0, len(self), 1024):
            got = self.fetch(range(start, min(start + 1024, len(self))))
            yield from (got[i] for i in sorted(got))

    def _locate(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of a store of {len(self)}")
        part = int(np.searchsorted(self._first, index, side="right")) - 1
        offsets = self._offsets[part]
        local = index - int(self._first[part])
        return part, int(offsets[local]), int(offsets[local + 1])

    def _read(self, part: int, name: str, dtype, start: int, stop: int) -> np.ndarray:
        path = files.join(self.parts[part], name)
        if not self.remote:
            key = (part, name)
            if key not in self._maps:
                size = os.path.getsize(path) // np.dtype(dtype).itemsize
                self._maps[key] = np.memmap(path, dtype=dtype, mode="r", shape=(size,)) if size else \
                    np.zeros(0, dtype)
            return np.array(self._maps[key][start:stop])
        item = np.dtype(dtype).itemsize
        return np.frombuffer(files.read_range(path, start * item, (stop - start) * item), dtype)

    def _example(self, index: int):
        part, start, stop = self._locate(int(index))
        ids = self._read(part, "ids.bin", np.int32, start, stop)
        if self.kind == "prompt":
            return PromptExample(ids)
        return LMExample(ids, self._read(part, "weights.bin", np.uint8, start, stop).astype(np.float32))

    def fetch(self, indices: Iterable[int]) -> dict:
        """{index: example} for the given store indices (each read once; concurrently from a bucket)."""
        wanted = sorted({int(i) for i in indices})
        self.reads += len(wanted)
        if self.remote and len(wanted) > 1:
            with concurrent.futures.ThreadPoolExecutor(min(_REMOTE_READERS, len(wanted))) as pool:
                return dict(zip(wanted, pool.map(self._example, wanted)))
        return {i: self._example(i) for i in wanted}


def open_store(folder: str, key: str) -> Optional[ExampleStore]:
    """The store side at `folder` when one complete preparation for `key` is there, else None."""
    parts = complete_parts(folder, key)
    return ExampleStore(parts) if parts else None
