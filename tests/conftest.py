"""Every test runs on 8 emulated CPU devices; the flag must be set before jax is imported."""

import os

from instruct_jax.parallel.distributed import emulate_cpu_devices  # imports no jax

emulate_cpu_devices(os.environ, devices=8)
# A multi-process test's gloo collectives give up after 4 minutes instead of XLA's 30 (a deadlock,
# XLA_CPU_DEADLOCK below, then fails the test in time to rerun it).
GLOO_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
if GLOO_TIMEOUT_FLAG not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {GLOO_TIMEOUT_FLAG}=240"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI runs that tests start as subprocesses keep a persistent XLA cache (fast restarts). Each
# pytest-xdist worker gets its own, so two workers never read and write one cache at the same time
# (JAX writes entries in place, without a lock), and a test run never reads a stale cache of the user's.
os.environ["JAX_CACHE_DIR"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"instruct_jax_test_cache_{os.getuid()}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data"  # the data files the repository carries (data/README.md)


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    if not DATA_DIR.is_dir():
        raise FileNotFoundError(f"expected the data folder at {DATA_DIR} (data/README.md)")
    return DATA_DIR


def assert_processes_ok(results):
    """Every process of a launch_local run exited 0; otherwise each one's ending, fatal log lines and
    output tail (all of them: the process that failed first is not always the one that says why)."""
    assert all(r.returncode == 0 for r in results), "\n\n".join(r.summary() for r in results)


# XLA's CPU runtime sometimes deadlocks a program's collectives on emulated devices (an upstream bug:
# one device's thread waits at a collective the other devices reach only after one it is not in; see
# docs/MULTIHOST.md). One process aborts after 60 s with the first message; in a multi-process run a
# gloo collective times out with the second. Tests that run training jobs in subprocesses rerun once
# on exactly these failures (pytest-rerunfailures counts each rerun as R in the summary); any other
# failure fails at once.
XLA_CPU_DEADLOCK = r"Termination timeout for `[^`]* RendezvousKey|Gloo [\w-]+ failed: .*Timed out waiting"
rerun_on_xla_cpu_deadlock = pytest.mark.flaky(reruns=1, only_rerun=[XLA_CPU_DEADLOCK])
