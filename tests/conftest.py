"""Every test runs on 8 emulated CPU devices; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
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
