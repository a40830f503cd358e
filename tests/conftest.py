"""Every test runs on 8 emulated CPU devices; the flag must be set before jax is imported."""

import os

from instruct_jax.parallel.distributed import emulate_cpu_devices  # imports no jax

emulate_cpu_devices(os.environ, devices=8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI runs that tests start as subprocesses keep a persistent XLA cache (fast restarts). Each
# pytest-xdist worker gets its own, so two workers never read and write one cache at the same time
# (JAX writes entries in place, without a lock), and a test run never reads a stale cache of the user's.
os.environ["JAX_CACHE_DIR"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"instruct_jax_test_cache_{os.getuid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"expected the shared data folder at {SHARED_DATA} (see README)")
    return SHARED_DATA


def assert_processes_ok(results):
    """Every process of a launch_local run exited 0; otherwise each one's ending, fatal log lines and
    output tail (all of them: the process that failed first is not always the one that says why)."""
    assert all(r.returncode == 0 for r in results), "\n\n".join(r.summary() for r in results)


# XLA's CPU runtime sometimes deadlocks a program's collectives on emulated devices (an upstream bug:
# one device's thread waits at a collective the other devices reach only after one it is not in; see
# docs/MULTIHOST.md) and aborts the process after 60 s with this message. Tests that run training
# jobs in subprocesses rerun once on exactly this failure (pytest-rerunfailures reports each rerun as
# R in the summary); any other failure fails at once.
XLA_CPU_DEADLOCK = r"Termination timeout for `[^`]* RendezvousKey"
rerun_on_xla_cpu_deadlock = pytest.mark.flaky(reruns=1, only_rerun=[XLA_CPU_DEADLOCK])
