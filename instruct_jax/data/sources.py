"""Reading raw rows: a Hub dataset (via `datasets`) or local jsonl / json / parquet / text files.

Every row comes out as `(where, value)`: `where` names the place ("data/train.jsonl:12", or
"Anthropic/hh-rlhf[test]:row 5" for datasets-backed rows, counted from 0 like `ds[i]`), and
`value` is a dict (json, parquet, Hub), a str (text files), or a MalformedDataError for a row that
couldn't even be parsed. Yielding errors as values lets one place (instructgpt/pipeline.py) apply the
`on_malformed` policy to every kind of failure.

Why local jsonl / json / text are read here rather than by `datasets.load_dataset("json", ...)`:
its JSON builder fails the whole file at the first bad line, without the line number, and can't
skip a row or a non-UTF-8 byte. Parquet and Hub datasets are read by `datasets` (typed columns,
no line structure to lose).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
from typing import Iterator

from instruct_jax import files
from instruct_jax.data.stats import MalformedDataError

_DECOMPRESS = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress, ".lzma": lzma.decompress}
_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
          ".txt": "text", ".text": "text", ".md": "text"}


def file_kind(path: str) -> str:
    """"data/x.jsonl.gz" -> "jsonl": the format under any compression suffix."""
    stem, ext = os.path.splitext(path)
    if ext in _DECOMPRESS:
        stem, ext = os.path.splitext(stem)
    if ext not in _KINDS:
        raise ValueError(f"{path}: unknown file type {ext!r}; expected one of {sorted(_KINDS)} "
                         f"(optionally compressed {sorted(_DECOMPRESS)})")
    return _KINDS[ext]


def read_bytes(path: str) -> bytes:
    """File contents, decompressed according to the extension."""
    data = files.read_bytes(path)
    ext = os.path.splitext(path)[1]
    return _DECOMPRESS[ext](data) if ext in _DECOMPRESS else data


def local_files(source: str) -> list[str] | None:
    """The files a source names, or None when it names a Hub dataset.

    A source is comma-separated parts; each part is a glob, a folder (every known file in it,
    recursively, sorted) or a file. A part that names nothing here but looks like a path (has a
    known extension or a leading ./ / ~) is an error rather than a Hub lookup that would fail
    later with a confusing network message.
    """
    found_files: list[str] = []
    parts = [p.strip() for p in source.split(",") if p.strip()]
    for part in parts:
        part = os.path.expanduser(part)
        if files.is_remote(part):  # gs://bucket/...: a glob, a folder or a file in a bucket
            found_files += _remote_files(part)
            continue
        if any(c in part for c in "*?["):
            matched = sorted(glob.glob(part, recursive=True))
            if not matched:
                raise FileNotFoundError(f"data source {part!r} matches no files")
            found_files += matched
        elif os.path.isdir(part):
            found = sorted(p for p in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                           if os.path.isfile(p) and _known(p))
            if not found:
                raise FileNotFoundError(f"data source folder {part!r} holds no jsonl/json/parquet/txt files")
            found_files += found
        elif os.path.isfile(part):
            found_files.append(part)
        elif _known(part) or part.startswith((".", "/", "~")) or len(parts) > 1:
            raise FileNotFoundError(f"data source {part!r} does not exist")
        else:
            return None  # a Hub name like "Anthropic/hh-rlhf"
    return found_files


def _remote_files(url: str) -> list[str]:
    """The files a bucket URL names: a glob (in its last parts), a folder (recursively) or one file."""
    scheme, _, rest = url.partition("://")
    if any(c in rest for c in "*?["):
        root = rest.split("/", 1)[0]
        pattern = rest.split("/", 1)[1] if "/" in rest else ""
        matched = sorted(f"{scheme}://{root}/{p.relative_to(files.path(f'{scheme}://{root}'))}"
                         for p in files.path(f"{scheme}://{root}").glob(pattern))
        if not matched:
            raise FileNotFoundError(f"data source {url!r} matches no files")
        return matched
    if files.isdir(url):
        found = [full for rel, full in files.walk_files(url).items() if _known(rel)]
        if not found:
            raise FileNotFoundError(f"data source folder {url!r} holds no jsonl/json/parquet/txt files")
        return found
    if files.isfile(url):
        return [url]
    raise FileNotFoundError(f"data source {url!r} does not exist")


def _known(path: str) -> bool:
    try:
        file_kind(path)
        return True
    except ValueError:
        return False


def iter_rows(source: str, *, split: str = "train", hub_config: str = "", hub_data_dir: str = "",
              text_unit: str = "paragraph", max_rows: int = 0,
              shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[str, object]]:
    """All rows of a source as (where, dict | str | MalformedDataError); at most max_rows if > 0.

    shard = (i, n): only host i's share of n, for preparing a data store on n hosts at once. Files are dealt
    round-robin (host i reads files i, i + n, ...) when there are at least n of them and no row cap; else
    every host reads the rows in order and keeps rows i, i + n, ... of the first max_rows (it parses the
    rest, but tokenises only its own). A Hub dataset is streamed and split by node (`datasets`'
    `split_dataset_by_node`: whole shards per host when they divide evenly, else every n-th row); capped, the
    hosts read max_rows rows in all, each once, though not always the first max_rows of one host's order.
    """
    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {shard}: need 0 <= index < count")
    paths = local_files(source)
    if paths is None:
        if count > 1:
            yield from hub_rows_shard(source, split, hub_config, hub_data_dir, shard, max_rows)
            return
        streams = [hub_rows(source, split, hub_config, hub_data_dir)]
    else:
        by_file = count > 1 and not max_rows and len(paths) >= count
        streams = [file_rows(path, text_unit) for path in (paths[index::count] if by_file else paths)]
        if by_file:
            index, count = 0, 1  # this host's files, every row of them
    n = 0
    for stream in streams:
        for item in stream:
            if max_rows and n >= max_rows:
                return
            n += 1
            if (n - 1) % count == index:
                yield item


def file_rows(path: str, text_unit: str = "paragraph") -> Iterator[tuple[str, object]]:
    kind = file_kind(path)
    if kind == "parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=[files.local_copy(path)], split="train")
        yield from ((f"{path}:row {i}", row) for i, row in enumerate(ds))
        return
    data = read_bytes(path)
    if kind == "jsonl":
        yield from jsonl_rows(path, data)
    elif kind == "json":
        yield from json_rows(path, data)
    else:
        yield from text_rows(path, data, text_unit)


def hub_rows(name: str, split: str, config: str = "", data_dir: str = "") -> Iterator[tuple[str, object]]:
    import datasets

    ds = datasets.load_dataset(name, config or None, data_dir=data_dir or None, split=split)
    yield from ((f"{name}[{split}]:row {i}", row) for i, row in enumerate(ds))


def hub_rows_shard(name: str, split: str, config: str, data_dir: str, shard: tuple[int, int],
                   max_rows: int = 0) -> Iterator[tuple[str, object]]:
    """Host shard[0]'s share of a streamed Hub dataset (the first max_rows rows if > 0), split by node."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    ds = datasets.load_dataset(name, config or None, data_dir=data_dir or None, split=split, streaming=True)
    if max_rows:
        ds = ds.take(max_rows)
    ds = split_dataset_by_node(ds, rank=shard[0], world_size=shard[1])
    yield from ((f"{name}[{split}]:host {shard[0]} of {shard[1]} row {i}", row) for i, row in enumerate(ds))


# ----------------------------------------------------------------------------- line-precise readers
def _decode_line(raw: bytes, first: bool) -> str:
    """UTF-8 text of one line (a BOM on the first line is dropped); MalformedDataError names the byte."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise MalformedDataError("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8")


def _parse_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise MalformedDataError("bad_json", f"invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MalformedDataError("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def jsonl_rows(path: str, data: bytes) -> Iterator[tuple[str, object]]:
    """One JSON object per line; blank lines are ignored. Lines are numbered from 1, as in an editor."""
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if not raw.strip():
            continue
        try:
            yield where, _parse_object(_decode_line(raw.rstrip(b"\r"), number == 1))
        except MalformedDataError as e:
            yield where, e.at(where)


def json_rows(path: str, data: bytes) -> Iterator[tuple[str, object]]:
    """A JSON array of objects ("file:item i") or a single object; a .json holding JSON lines works too."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        yield f"{path}:{line}", MalformedDataError("not_utf8", f"byte 0x{data[e.start]:02x} is not valid UTF-8",
                                                   where=f"{path}:{line}")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: it is JSON lines under a .json name
            yield from jsonl_rows(path, data)
        else:
            yield f"{path}:{e.lineno}", MalformedDataError("bad_json", f"invalid JSON ({e.msg}, column {e.colno})",
                                                           where=f"{path}:{e.lineno}")
        return
    except RecursionError:
        yield path, MalformedDataError("bad_json", "invalid JSON (nesting too deep)", where=path)
        return
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        where = f"{path}:item {i}"
        if isinstance(item, dict):
            yield where, item
        else:
            yield where, MalformedDataError("not_an_object", f"expected a JSON object, got {type(item).__name__}",
                                            where=where)


def text_rows(path: str, data: bytes, unit: str) -> Iterator[tuple[str, object]]:
    """Rows of a text file: each line, each blank-line-separated paragraph, or the whole document.

    Blank lines separate rows and are not rows themselves. A unit holding a non-UTF-8 byte is one
    malformed row located at its first bad line, so `skip` loses that unit and nothing else.
    """
    if unit == "document":
        try:
            yield f"{path}:1", data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            where = f"{path}:{line}"
            yield where, MalformedDataError("not_utf8", f"byte 0x{data[e.start]:02x} is not valid UTF-8", where=where)
        return
    lines: list[tuple[int, object]] = []  # (line number, its text or its decoding error)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append((number, _decode_line(raw.rstrip(b"\r"), number == 1)))
        except MalformedDataError as e:
            lines.append((number, e.at(f"{path}:{number}")))
    for unit_lines in _group_lines(lines, by_paragraph=(unit == "paragraph")):
        bad = next((v for _, v in unit_lines if isinstance(v, MalformedDataError)), None)
        if bad is not None:
            yield bad.where, bad
        else:
            yield f"{path}:{unit_lines[0][0]}", "\n".join(v for _, v in unit_lines)


def _group_lines(lines: list[tuple[int, object]], by_paragraph: bool) -> Iterator[list[tuple[int, object]]]:
    """Split numbered lines into rows at blank lines (paragraphs) or one row per non-blank line."""
    current: list[tuple[int, object]] = []
    for item in lines:
        blank = isinstance(item[1], str) and not item[1].strip()
        if blank or not by_paragraph:
            if current:
                yield current
            current = [] if blank else [item]
        else:
            current.append(item)
    if current:
        yield current
