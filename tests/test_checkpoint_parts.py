"""Checkpoint integrity at scale: each process hashes, at save and at restore, only the files it wrote
(orbax's per-process OCDBT folders), and a corrupted shard of one process is caught by that process and
rejected by all. Two processes x 2 CPU devices on loopback."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO, assert_processes_ok, rerun_on_xla_cpu_deadlock
from instruct_jax.checkpoint import MANIFEST_NAME, writer_of
from instruct_jax.parallel.distributed import launch_local

pytestmark = [rerun_on_xla_cpu_deadlock, pytest.mark.filterwarnings("ignore:Some donated buffers")]
JOB = str(REPO / "tests" / "checkpoint_parts_job.py")


def run(tmp_path, mode):
    results = launch_local([JOB, str(tmp_path), mode], 2, 2, pass_as="env", cwd=str(REPO), timeout_s=300,
                           env={"PYTHONPATH": str(REPO)})
    assert_processes_ok(results)
    return [json.load(open(tmp_path / f"{mode}_process_{i}.json")) for i in range(2)]


def test_each_process_checks_only_what_it_wrote(tmp_path):
    saved = run(tmp_path, "save")
    step_dir = tmp_path / "checkpoints" / "1"
    files = sorted(os.path.relpath(os.path.join(d, n), step_dir) for d, _, names in os.walk(step_dir) for n in names
                   if not n.startswith(MANIFEST_NAME))
    assert {writer_of(f) for f in files} == {0, 1}  # both processes wrote shards
    assert json.load(open(step_dir / MANIFEST_NAME))["parts"] == [f"{MANIFEST_NAME}.process_{i}" for i in range(2)]
    for i in range(2):
        part = json.load(open(step_dir / f"{MANIFEST_NAME}.process_{i}"))["files"]
        assert sorted(part) == [f for f in files if writer_of(f) == i]
        assert sorted(h.split("/", 1)[1] for h in saved[i]["hashed"]) == sorted(part)  # hashed its own only

    restored = run(tmp_path, "restore")
    for i in range(2):
        assert restored[i]["restored_step"] == 1 and restored[i]["restored_ok"]
        assert restored[i]["hashed"] and all(writer_of(h.split("/", 1)[1]) == i for h in restored[i]["hashed"])

    # A flipped byte in one of process 1's shards: process 1 finds it, both reject the checkpoint,
    # and process 0 still reads none of process 1's files.
    victim = next(f for f in files if writer_of(f) == 1 and "/d/" in f)
    with open(step_dir / victim, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    rejected = run(tmp_path, "restore")
    assert [r["restored_step"] for r in rejected] == [None, None]
    assert all(writer_of(h.split("/", 1)[1]) == 0 for h in rejected[0]["hashed"])
    assert (tmp_path / "checkpoints" / "corrupt").is_dir()
