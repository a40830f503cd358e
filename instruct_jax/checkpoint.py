"""Checkpoints: orbax save / restore / resume, a verified manifest, params export, preemption.

A long run on preemptible TPU VMs must lose nothing it trained and continue exactly where it
stopped. Orbax does the heavy lifting (sharded, multi-host, asynchronous writes; restoring onto
whatever shardings the caller asks for). This module adds what orbax leaves open:

* A manifest. Orbax commits a checkpoint by writing into a tmp directory and renaming it, so a
  save that is killed half-way never looks committed. Nothing protects the files afterwards: a
  truncated copy, a flipped byte or a lost shard is still a committed checkpoint to orbax. After
  the commit each process writes `MANIFEST.json.process_<i>` (size and sha256 of the files it
  wrote: orbax's `ocdbt.process_<i>/` folder and metadata; process 0 also the shared files), and
  process 0, once every part is there, `MANIFEST.json` naming them. At restore each process checks
  its own part; a checkpoint without a manifest, or any of whose files don't match, is skipped.
  No host reads another host's bytes.
* Our own retention. Only checkpoints with a manifest count towards "keep the last K", so a
  good checkpoint is never deleted to make room for one that is still being written.
* A `PreemptionGuard` that turns SIGTERM into a flag the trainer polls once per step.

Layout on disk (docs/CHECKPOINTS.md has the full story):

    <directory>/
      200/                          one directory per saved step (orbax's naming: the bare step)
        state/                      the train-state pytree (OCDBT, each host writes its shards)
        meta/metadata               JSON: data-iterator position, KL controller, ...
        _CHECKPOINT_METADATA, commit_success.txt    orbax bookkeeping
        MANIFEST.json.process_<i>   ours: {"files": {relpath: {size, sha256}}} of what process i wrote
        MANIFEST.json               ours, written last: {"parts": [the part files]}
      corrupt/300-20250101T120000/  a checkpoint rejected at restore, moved aside, with REASON.txt

Multi-host: every process calls every method (orbax needs all of them for save and restore); each
writes and checks its own manifest part, every process learns every verdict, only process 0 marks a step
complete and moves directories. All processes must see the same filesystem (GCS or NFS).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import signal
import threading
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from instruct_jax import files
from instruct_jax.model.lora import drop_adapters, fresh_adapters, has_adapters, with_fresh_adapters

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
QUARANTINE_DIR = "corrupt"  # not an integer, so orbax never mistakes it for a step
_HASH_CHUNK_BYTES = 8 << 20


class CorruptCheckpointError(RuntimeError):
    """A checkpoint (or params export) whose files don't match its manifest."""


# ----------------------------------------------------------------------------- multi-host helpers
def _is_primary() -> bool:
    return jax.process_index() == 0


def _sync(name: str) -> None:
    """Barrier across processes (a no-op in a single-process run). Call from the main thread."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _all_agree(ok: bool) -> bool:
    """True only if `ok` holds on every process; every process must call this at the same point."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


def _absolute(path: Any) -> epath.Path:
    """Orbax wants absolute paths; bucket URLs (gs://...) already are."""
    return files.path(path)


# ----------------------------------------------------------------------------- manifest
def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)  # hashlib releases the GIL here: training threads keep running
    return digest.hexdigest()


def _files_under(root: epath.Path) -> dict[str, epath.Path]:
    """Every regular file below `root` by its relative posix path, except the manifest itself."""
    # epath has no recursive glob (too many GCS requests): files.walk_files walks, for buckets too.
    return {rel: root / rel for rel, _ in files.walk_files(root).items() if not rel.startswith(MANIFEST_NAME)}


_PROCESS_DIR = re.compile(r"(?:^|/)(?:ocdbt\.process_|array_metadatas/process_)(\d+)(?:/|$)")
PART_TIMEOUT_S = 600.0  # process 0 waits this long for the other processes' manifest parts


def writer_of(rel: str) -> int:
    """The process that wrote a checkpoint file: orbax's OCDBT layout gives each process its own
    `ocdbt.process_<i>/` folder and `array_metadatas/process_<i>` file; the rest is process 0's."""
    m = _PROCESS_DIR.search(rel)
    return int(m.group(1)) if m else 0


def _part_name(process: int) -> str:
    return f"{MANIFEST_NAME}.process_{process}"


def write_manifest_part(checkpoint_dir: Any, process: Optional[int] = None) -> None:
    """This process's share of the manifest: size and sha256 of the files it wrote (`writer_of`), as
    MANIFEST.json.process_<i>. No process reads another's bytes (96 GB on one host for an 8B state before)."""
    process = jax.process_index() if process is None else process
    root = _absolute(checkpoint_dir)
    deadline = time.monotonic() + PART_TIMEOUT_S
    while not root.exists():  # another process may still be renaming orbax's tmp folder into place
        if time.monotonic() > deadline:
            raise RuntimeError(f"{root} did not appear within {PART_TIMEOUT_S:.0f} s")
        time.sleep(0.2)
    files = {rel: {"size": p.stat().length, "sha256": _sha256(p)} for rel, p in _files_under(root).items()
             if writer_of(rel) == process}
    _write_atomically(root / _part_name(process), {"format": 2, "process": process, "files": files})


def write_manifest(checkpoint_dir: Any, num_processes: Optional[int] = None,
                   timeout_s: float = PART_TIMEOUT_S) -> None:
    """Process 0, after its own part: wait for every process's part, then write MANIFEST.json naming them.

    Its presence marks the checkpoint complete; written to a tmp name and renamed, so a reader sees either
    no manifest or a whole one. With one process, the part is written here too."""
    num_processes = jax.process_count() if num_processes is None else num_processes
    root = _absolute(checkpoint_dir)
    if num_processes == 1:
        write_manifest_part(root, 0)
    deadline = time.monotonic() + timeout_s
    parts = [_part_name(i) for i in range(num_processes)]
    while not all((root / name).exists() for name in parts):
        if time.monotonic() > deadline:
            missing = [name for name in parts if not (root / name).exists()]
            raise RuntimeError(f"{root}: manifest parts {missing} did not appear within {timeout_s:.0f} s")
        time.sleep(0.2)
    _write_atomically(root / MANIFEST_NAME, {"format": 2, "parts": parts})


def _write_atomically(path: epath.Path, content: dict) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.rename(path)


def _check_files(root: epath.Path, expected: dict) -> Optional[str]:
    """Sizes first (truncation is found cheaply), then checksums."""
    for rel, (size, _) in expected.items():
        path = root / rel
        if not path.is_file():
            return f"file {rel} is missing"
        actual = path.stat().length
        if actual != size:
            return f"file {rel} has {actual} bytes, the manifest says {size} (truncated or overwritten)"
    for rel, (_, sha) in expected.items():
        if _sha256(root / rel) != sha:
            return f"file {rel} does not match its sha256 (bytes changed on disk)"
    return None


def _entries(files: dict) -> dict:
    return {rel: (int(e["size"]), str(e["sha256"])) for rel, e in files.items()}


def check_manifest(checkpoint_dir: Any, process: Optional[int] = None,
                   num_processes: Optional[int] = None) -> Optional[str]:
    """None if this process's share of the manifest checks out: the parts p with p % num_processes == process
    (with the same process count as the save: the files this process wrote). Otherwise a one-line reason.

    Files that are not listed are ignored: the manifest vouches for what was there when it was written. A
    format-1 manifest (one list of every file, older checkpoints) is checked whole by process 0.
    """
    process = jax.process_index() if process is None else process
    num_processes = jax.process_count() if num_processes is None else num_processes
    root = _absolute(checkpoint_dir)
    manifest_path = root / MANIFEST_NAME
    if not root.exists():
        return f"{root} does not exist"
    if not manifest_path.exists():
        return "no manifest: the save never finished (killed or crashed while writing)"
    try:
        manifest = json.loads(manifest_path.read_text())
        if "files" in manifest:  # format 1
            return _check_files(root, _entries(manifest["files"])) if process == 0 else None
        parts = [str(name) for name in manifest["parts"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest ({type(e).__name__}: {e})"
    for i, name in enumerate(parts):
        if i % num_processes != process:
            continue
        try:
            files = _entries(json.loads((root / name).read_text())["files"])
        except FileNotFoundError:
            return f"manifest part {name} is missing"
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable manifest part {name} ({type(e).__name__}: {e})"
        reason = _check_files(root, files)
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------- the manager
class CheckpointManager:
    """Save every N steps, keep the last K (+ every M-th), restore the newest intact checkpoint.

    Each checkpoint holds two orbax items: "state" (any pytree of jax.Arrays: params, optimizer
    state, step, rng, ...) and "meta" (a JSON dict: data-iterator position, PPO's KL
    controller, ...). With `async_save` the arrays are copied to host memory inside `save()`
    (so the trainer may donate them to the next step right away) and written in the background;
    a helper thread then waits for orbax's commit and writes the manifest. The next `save`,
    `wait` or `close` joins that thread, re-raises any error from it, and prunes old steps. So
    between saves the disk can hold keep + 1 checkpoints: an old one is deleted only once the
    new one has its manifest.
    """

    def __init__(self, directory: Any, *, every_steps: int, keep: int, keep_every: int = 0,
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = _absolute(directory)
        self.every_steps = every_steps
        self.keep = keep
        self.keep_every = keep_every
        self._async = async_save
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # we prune, counting only checkpoints that have a manifest
            create=True,
            cleanup_tmp_directories=True,  # tmp dirs left by a run killed mid-save
            enable_async_checkpointing=async_save,
        )
        self._orbax = ocp.CheckpointManager(self.directory, item_names=("state", "meta"), options=options)
        self._pending_step: Optional[int] = None  # saved, manifest not yet confirmed on all hosts
        self._finisher: Optional[threading.Thread] = None
        self._finisher_error: Optional[BaseException] = None

    # ------------------------------------------------------------------ queries
    def should_save(self, step: int) -> bool:
        """The periodic schedule; the trainer adds force=True for the final and preemption saves."""
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def all_steps(self) -> list[int]:
        """Steps whose checkpoint is complete (has a manifest), oldest first. Not re-verified."""
        return [s for s in self._orbax.all_steps() if (self._step_dir(s) / MANIFEST_NAME).exists()]

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)  # orbax's default step naming, which we don't change

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        """Save `state` and `meta` at `step` if the schedule (or `force`) says so.

        Returns whether a save was started. A step that is already saved completely is not
        written twice (the final save often lands on a periodic one).
        """
        if not (force or self.should_save(step)):
            return False
        meta = json.loads(json.dumps(meta))  # fail here, in the caller, if meta isn't JSON-able
        self._finish_pending()
        if step in self._orbax.all_steps():
            if (self._step_dir(step) / MANIFEST_NAME).exists():
                logger.info("checkpoint for step %d already exists; not saving it again", step)
                return False
            self._quarantine({step: "an earlier run started this save and never finished it"})
        self._orbax.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._pending_step = step
        if self._async:
            self._finisher_error = None
            self._finisher = threading.Thread(target=self._finish_in_background, args=(step,),
                                              name=f"checkpoint-manifest-{step}")
            self._finisher.start()
        else:
            self._write_manifest_after_commit(step)
            self._finish_pending()
        return True

    def _write_manifest_after_commit(self, step: int) -> None:
        self._orbax.wait_until_finished()  # orbax's commit (tmp dir renamed) is done after this
        if jax.process_count() > 1:
            write_manifest_part(self._step_dir(step))  # each process hashes only what it wrote
        if _is_primary():
            write_manifest(self._step_dir(step))  # waits for every part, then marks the step complete

    def _finish_in_background(self, step: int) -> None:
        try:
            self._write_manifest_after_commit(step)
        except BaseException as e:  # re-raised in the main thread by _finish_pending
            self._finisher_error = e

    def _finish_pending(self) -> None:
        """Join the background finisher, surface its error, sync hosts, prune old checkpoints."""
        if self._pending_step is None:
            return
        step, self._pending_step = self._pending_step, None
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        if self._finisher_error is not None:
            error, self._finisher_error = self._finisher_error, None
            raise RuntimeError(f"saving the checkpoint for step {step} failed") from error
        _sync(f"instruct_jax_checkpoint_manifest_{step}")  # everyone now sees the manifest
        self._prune()

    def _prune(self) -> None:
        """Keep the last `keep` complete checkpoints and every `keep_every`-th; delete the rest.

        Incomplete checkpoints newer than the newest complete one are left alone: they are the
        evidence `restore_latest` reports and moves aside.
        """
        steps = self._orbax.all_steps()
        complete = self.all_steps()
        kept = set(complete[-self.keep:])
        if self.keep_every > 0:
            kept |= {s for s in complete if s % self.keep_every == 0}
        newest = complete[-1] if complete else None
        for s in steps:
            if s in kept or newest is None or s > newest:
                continue
            logger.info("deleting checkpoint for step %d (keep=%d, keep_every=%d)", s, self.keep, self.keep_every)
            self._orbax.delete(s)

    def wait(self) -> None:
        """Block until the last save is committed, has its manifest, and old ones are pruned."""
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
        self._orbax.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restore
    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """Restore the newest intact checkpoint as `(step, state, meta)`, or None if there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with the structure that was saved,
        each carrying the sharding it should have NOW (a NamedSharding on the current mesh).
        Orbax reads each device's slice of the saved arrays, so a checkpoint written on one mesh
        shape restores onto another.

        Newest first, a checkpoint is skipped, with a warning naming its step and the reason,
        if it has no manifest, fails the manifest check, or fails to restore. Skipped checkpoints
        are moved to `<directory>/corrupt/` (kept, not deleted) so the resumed run can save
        those steps again. If a checkpoint passed the check but failed to restore and nothing
        older restored either, that is most likely a mismatch between `abstract_state` and what
        was saved (a changed model or optimizer), so this raises instead of starting over.
        """
        self._finish_pending()
        self._orbax.reload()  # another process or an earlier run may have written since __init__
        rejected: dict[int, str] = {}
        failed_to_restore: list[int] = []
        for step in sorted(self._orbax.all_steps(), reverse=True):
            reason = check_manifest(self._step_dir(step))  # each process: its own share
            if not _all_agree(reason is None):
                rejected[step] = reason or "rejected by another process's manifest check"
                logger.warning("skipping checkpoint at step %d: %s", step, rejected[step])
                continue
            restored, error = None, None
            try:
                restored = self._orbax.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # tensorstore / orbax raise many types for unreadable data
                error = e
            if not _all_agree(error is None):
                rejected[step] = (f"restore failed: {type(error).__name__}: {error}" if error is not None
                                  else "restore failed on another process")
                failed_to_restore.append(step)
                logger.warning("skipping checkpoint at step %d: %s", step, rejected[step])
                continue
            self._quarantine(rejected)
            logger.info("restored checkpoint at step %d from %s", step, self.directory)
            return step, restored["state"], dict(restored["meta"])
        if failed_to_restore:
            raise RuntimeError(
                f"no checkpoint in {self.directory} could be restored; steps {failed_to_restore} passed "
                f"the manifest check but failed to restore, which usually means the train state's "
                f"structure changed since they were saved. Refusing to start from scratch. "
                f"Reasons: {rejected}")
        if rejected:
            self._quarantine(rejected)
            logger.warning("no intact checkpoint in %s; starting from scratch", self.directory)
        return None

    def _quarantine(self, rejected: dict[int, str]) -> None:
        """Move rejected step directories to <directory>/corrupt/<step>-<time>/ with REASON.txt."""
        if not rejected:
            return
        if _is_primary():
            quarantine = self.directory / QUARANTINE_DIR
            quarantine.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step, reason in rejected.items():
                dest, n = quarantine / f"{step}-{stamp}", 1
                while dest.exists():
                    dest, n = quarantine / f"{step}-{stamp}-{n}", n + 1
                self._step_dir(step).rename(dest)
                (dest / "REASON.txt").write_text(reason + "\n")
                logger.warning("moved checkpoint for step %d aside to %s", step, dest)
        _sync("instruct_jax_checkpoint_quarantine_" + "_".join(map(str, sorted(rejected))))
        self._orbax.reload()


# ----------------------------------------------------------------------------- params export
def export_params(path: Any, params: Any) -> None:
    """Write a params-only checkpoint (for the next phase, evaluation, serving, interop).

    Overwrites `path`. Like full checkpoints it gets a manifest, checked by `load_params`.
    """
    path = _absolute(path)
    checkpointer = ocp.StandardCheckpointer()
    try:
        checkpointer.save(path, params, force=True)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    if jax.process_count() > 1:
        write_manifest_part(path)
    if _is_primary():
        write_manifest(path)
    _sync("instruct_jax_export_params")


def load_params(path: Any, abstract_params: Any, adapter_seed: int = 0) -> Any:
    """Read a params export onto the shardings carried by `abstract_params` (ShapeDtypeStructs).

    Exports hold no LoRA adapters (they are merged on export, model/lora.py); when `abstract_params` has some (a
    LoRA run starting from an export), the base is read and the adapters start fresh: B = 0, so the model is
    exactly the export, and A as model/lora.py initialises it, from PRNGKey(adapter_seed) (callers pass cfg.seed)."""
    path = _absolute(path)
    reason = check_manifest(path)  # each process: the files it wrote
    if not _all_agree(reason is None):
        raise CorruptCheckpointError(f"params export at {path} is unusable: {reason or 'see the other processes'}")
    checkpointer = ocp.StandardCheckpointer()
    try:
        if not has_adapters(abstract_params):
            return checkpointer.restore(path, abstract_params)
        base = checkpointer.restore(path, drop_adapters(abstract_params))
    finally:
        checkpointer.close()
    return with_fresh_adapters(base, fresh_adapters(abstract_params, adapter_seed))


# ----------------------------------------------------------------------------- preemption
class PreemptionGuard:
    """Turn SIGTERM (and optionally SIGINT) into a flag the trainer polls once per step.

    TPU VMs get SIGTERM some seconds before a preemption. Saving inside the signal handler would
    interrupt a step half-way, so the handler only records the request; the trainer finishes the
    step, saves with force=True, prints a message and exits 0. A second Ctrl-C (SIGINT) still
    interrupts immediately. Handlers can only be installed from the main thread; elsewhere the
    guard warns and does nothing. The previous handlers come back on exit.

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop():
                    ckpt.save(step, state, meta, force=True); ckpt.close(); print(...); sys.exit(0)
    """

    def __init__(self, handle_sigint: bool = False):
        self.signals = (signal.SIGTERM, signal.SIGINT) if handle_sigint else (signal.SIGTERM,)
        self.requested = False
        self.signal_name: Optional[str] = None  # which signal asked us to stop
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # second Ctrl-C: the user really means it
        self.requested = True
        self.signal_name = signal.Signals(signum).name  # only flag-setting here: handlers must be tiny

    def should_stop(self) -> bool:
        """Whether any process was asked to stop. A collective in multi-process runs: every
        process must call it at the same steps, or they will disagree on where to save."""
        if jax.process_count() == 1:
            return self.requested
        return not _all_agree(not self.requested)

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            logger.warning("PreemptionGuard entered outside the main thread; signals are not handled")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was installed outside Python; the default is closest.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def resolve_params_dir(path: str) -> str:
    """A params export, or the workdir of an earlier phase (its `params/` export)."""
    candidate = files.join(path, "params")
    return candidate if files.isdir(candidate) else path
