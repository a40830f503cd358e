"""Every path the code reads or writes, local or in the cloud (`gs://bucket/...`), through etils.epath.

epath is the file-system layer orbax already uses for checkpoints: local paths go to `os`, `gs://` (and
`s3://`) to fsspec (gcsfs), so a workdir, a tokenizer, `train.init_from`, data files and exports may each
live in a bucket. Three things object stores lack get a stated substitute here:

* appending: `append_text` rewrites the whole object (metrics.jsonl and samples.jsonl are small);
* atomic rename: `write_text` on a bucket is one object upload, which GCS makes visible whole or not at all;
* a local file for libraries that only open local paths (sentencepiece, tokenizers, safetensors' mmap):
  `local_copy` downloads a remote file or folder once into a per-process cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_remote(path: PathLike) -> bool:
    """True for a cloud URL (gs://, s3://, ...), False for a local path."""
    return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """epath.Path of `p`: local paths made absolute, URLs kept as they are."""
    text = os.fspath(p)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for local paths and URLs alike."""
    return os.path.join(os.fspath(base), *parts)


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def isfile(p: PathLike) -> bool:
    q = path(p)
    return q.exists() and not q.is_dir()


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
    return sorted(child.name for child in path(p).iterdir())


def walk_files(root: PathLike) -> dict[str, str]:
    """Every file below `root`, recursively: {relative posix path: full path or URL}, sorted.

    epath's walk over a bucket yields folders without the scheme ("bucket/run/..."), so relative paths are
    taken on the scheme-less text of both sides and the URLs rebuilt from `root`."""
    base = path(root)
    prefix = _schemeless(base)
    found = {}
    for folder, _, names in base.walk():
        for name in names:
            rel = f"{_schemeless(folder)}/{name}"[len(prefix):].lstrip("/")
            found[rel] = join(os.fspath(base), rel)
    return dict(sorted(found.items()))


def _schemeless(p: PathLike) -> str:
    text = os.fspath(p).rstrip("/")
    return text.split("://", 1)[1] if "://" in text else text


def read_text(p: PathLike) -> str:
    return path(p).read_text(encoding="utf-8")


def read_bytes(p: PathLike) -> bytes:
    return path(p).read_bytes()


def read_range(p: PathLike, start: int, size: int) -> bytes:
    """`size` bytes of a file from byte `start`: a seek and one read locally, one ranged request in a bucket.

    In a bucket it asks fsspec's `cat_file` for the range (one GET, no file object): reads through file objects
    opened on several threads at once stalled inside gcsfs's read-ahead against the GCS emulator."""
    if is_remote(p):
        import fsspec

        fs, inner = fsspec.core.url_to_fs(os.fspath(p))
        return fs.cat_file(inner, start=start, end=start + size)
    with open(p, "rb") as f:
        f.seek(start)
        return f.read(size)


def write_bytes(p: PathLike, data: bytes) -> None:
    """Write a whole binary file, atomically like `write_text`."""
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(q):
        q.write_bytes(data)
        return
    tmp = f"{q}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, q)


def write_text(p: PathLike, text: str) -> None:
    """Write a whole file: locally through a temporary file and an atomic rename (a crash leaves the old or the
    new file whole); in a bucket as one upload (objects appear whole)."""
    q = path(p)
    q.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(q):
        q.write_text(text, encoding="utf-8")
        return
    tmp = f"{q}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, q)


def append_text(p: PathLike, text: str) -> None:
    """Append to a text file; in a bucket (no appends) the object is rewritten with the text added."""
    q = path(p)
    if not is_remote(q):
        with open(q, "a", encoding="utf-8") as f:
            f.write(text)
        return
    write_text(q, (q.read_text(encoding="utf-8") if q.exists() else "") + text)


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copy a file or a folder (recursively) between any two places."""
    s, d = path(src), path(dst)
    if not s.is_dir():
        d.parent.mkdir(parents=True, exist_ok=True)
        d.write_bytes(s.read_bytes())
        return
    d.mkdir(parents=True, exist_ok=True)
    for child in s.iterdir():
        copy_tree(child, d / child.name)


_CACHE = os.path.join(tempfile.gettempdir(), f"instruct_jax_files_{os.getuid()}")


def local_copy(p: PathLike) -> str:
    """A local path with the content of `p`: `p` itself when local, else a download (file or folder) cached
    per URL for this machine, for libraries that open only local files."""
    if not is_remote(p):
        return os.fspath(p)
    text = os.fspath(p).rstrip("/")
    target = os.path.join(_CACHE, hashlib.sha256(text.encode()).hexdigest()[:16], text.rsplit("/", 1)[-1])
    if not os.path.exists(target):
        partial = target + f".partial{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        copy_tree(text, partial)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(partial, target)
    return target
