"""Lazy safetensors reading and streaming writing, in numpy.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header
length n, n bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}, then one byte buffer. Reading memory-maps the file: slicing a
tensor touches only the pages of the rows asked for, so an importer can hand each device
its shard without ever holding a whole tensor. We read the format ourselves rather than
through `safetensors.safe_open(framework="numpy")` because that cannot return bfloat16
(the dtype Llama 3, Mistral and Qwen2 ship in); `ml_dtypes` gives numpy a bfloat16.

A Hugging Face checkpoint is one `model.safetensors` or several shards named by
`model.safetensors.index.json` ({"weight_map": {tensor name: file}}); `SafetensorsCheckpoint`
reads either. `write_checkpoint` writes either, streaming one tensor at a time.

    ckpt = SafetensorsCheckpoint("path/to/folder")
    ckpt.shape("model.embed_tokens.weight")                          # (49152, 576)
    ckpt.read("model.embed_tokens.weight", (slice(0, 8), slice(None)))  # float32 [8, 576]
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFile:
    """One .safetensors file, memory-mapped; tensors come back as lazy numpy views."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._start = 8 + n
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > self._start else None

    def names(self) -> list[str]:
        return list(self.entries)

    def view(self, name: str) -> np.ndarray:
        """The stored tensor as a read-only numpy view (nothing is read until it is sliced)."""
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        if end == begin:
            return np.zeros(e["shape"], DTYPES[e["dtype"]])
        raw = self._map[self._start + begin:self._start + end]
        return raw.view(DTYPES[e["dtype"]]).reshape(e["shape"])


class SafetensorsCheckpoint:
    """A folder's `model.safetensors`, its sharded `model.safetensors.index.json`, or one file."""

    def __init__(self, path: str):
        if os.path.isfile(path):
            files = {path: SafetensorsFile(path)}
        elif os.path.isfile(os.path.join(path, INDEX_FILE)):
            with open(os.path.join(path, INDEX_FILE)) as f:
                weight_map = json.load(f)["weight_map"]
            files = {p: SafetensorsFile(os.path.join(path, p)) for p in sorted(set(weight_map.values()))}
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            files = {SINGLE_FILE: SafetensorsFile(os.path.join(path, SINGLE_FILE))}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path!r}")
        self._where = {name: f for f in files.values() for name in f.names()}

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].entries[name]["shape"])

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """float32 copy of tensor[index] (a tuple of slices); only the indexed bytes are read."""
        if name not in self._where:
            raise KeyError(f"checkpoint has no tensor {name!r}")
        return np.asarray(self._where[name].view(name)[index], dtype=np.float32)


# ----------------------------------------------------------------------------- writing
def _header(entries: Sequence[tuple[str, tuple, np.dtype]], metadata: dict) -> tuple[bytes, int]:
    """(header bytes padded to 8, payload size) for tensors laid out back to back in order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the payload 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw, offset


def write_file(path: str, entries: Sequence[tuple[str, tuple, np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """Write one file whose tensors (name, shape, dtype) come from `produce(name)`, one at a time."""
    head, _ = _header(entries, {"format": "pt", **(metadata or {})})
    with open(path, "wb") as f:
        f.write(head)
        for name, shape, dtype in entries:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: expected shape {tuple(shape)}, got {array.shape}")
            f.write(array.tobytes())


def write_checkpoint(folder: str, entries: Iterable[tuple[str, tuple, np.dtype]],
                     produce: Callable[[str], np.ndarray], max_shard_bytes: int = 5 << 30,
                     write: bool = True) -> list[str]:
    """Write `model.safetensors`, or shards of at most max_shard_bytes plus the index, into folder.

    produce(name) is called exactly once per tensor, in order, on every process (so it may
    run collectives); only a process with write=True touches the disk. Returns the file names.
    """
    entries = list(entries)
    shards, current, size = [], [], 0
    for e in entries:
        nbytes = math.prod(e[1]) * e[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        if write:
            write_file(os.path.join(folder, name), shard, produce)
        else:
            for e in shard:
                produce(e[0])
    if write and len(shards) > 1:
        total = sum(math.prod(e[1]) * e[2].itemsize for e in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {e[0]: name for name, shard in zip(names, shards) for e in shard}}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return names
