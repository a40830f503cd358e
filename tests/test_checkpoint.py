"""Checkpoints: resharding restore, retention, corruption fallback, params export, preemption."""

import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from instruct_jax import checkpoint
from instruct_jax.checkpoint import CheckpointManager, PreemptionGuard


@struct.dataclass
class TrainState:
    """Shaped like the trainer's state: params, optimizer state, step, typed rng key."""
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    rng: jax.Array


def make_state(mesh, matrix_spec, seed=0):
    """A small state on `mesh`; matrices get `matrix_spec`, everything else is replicated."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"embed": jax.random.normal(k1, (16, 8)), "dense": {"kernel": jax.random.normal(k2, (8, 24)),
                                                              "bias": jnp.arange(24.0)}}
    opt_state = optax.adamw(1e-3).init(params)
    state = TrainState(params, opt_state, jnp.int32(seed), jax.random.key(seed + 100))
    return jax.device_put(state, shardings_for(state, mesh, matrix_spec))


def shardings_for(state, mesh, matrix_spec):
    return jax.tree.map(lambda x: NamedSharding(mesh, matrix_spec if x.ndim == 2 else P()), state)


def abstract(state, mesh, matrix_spec):
    """The restore target: shapes and dtypes of `state` with shardings on `mesh`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings_for(state, mesh, matrix_spec))


def host_values(tree):
    """numpy leaves, with typed PRNG keys turned into their raw key data."""
    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(leaf, tree)


def assert_bit_identical(a, b):
    for x, y in zip(jax.tree.leaves(host_values(a)), jax.tree.leaves(host_values(b))):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.fixture
def mesh8():
    return jax.make_mesh((8,), ("fsdp",))


def save_steps(directory, mesh, steps, **kwargs):
    """Save a distinct state at each step; returns {step: state}."""
    kwargs = {"every_steps": 1, "keep": 3, **kwargs}
    states = {}
    with CheckpointManager(directory, **kwargs) as mgr:
        for step in steps:
            states[step] = make_state(mesh, P("fsdp"), seed=step)
            assert mgr.save(step, states[step], {"data_step": step})
    return states


# ----------------------------------------------------------------------------- resharding
def test_restore_onto_another_mesh_is_bit_identical(tmp_path, mesh8):
    state = make_state(mesh8, P("fsdp"), seed=3)
    with CheckpointManager(tmp_path / "ckpt", every_steps=10, keep=2) as mgr:
        assert mgr.save(10, state, {"data_step": 10, "kl": {"coef": 0.1}})

    mesh24 = jax.make_mesh((2, 4), ("data", "tensor"))
    target = abstract(state, mesh24, P("tensor", "data"))
    with CheckpointManager(tmp_path / "ckpt", every_steps=10, keep=2) as mgr:
        step, restored, meta = mgr.restore_latest(target)

    assert step == 10 and meta == {"data_step": 10, "kl": {"coef": 0.1}}
    assert isinstance(restored, TrainState)
    assert_bit_identical(state, restored)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert leaf.sharding == want.sharding
    assert restored.params["embed"].sharding.spec == P("tensor", "data")


def test_restore_latest_on_an_empty_directory_returns_none(tmp_path, mesh8):
    state = make_state(mesh8, P("fsdp"))
    with CheckpointManager(tmp_path / "ckpt", every_steps=5, keep=1) as mgr:
        assert mgr.restore_latest(abstract(state, mesh8, P("fsdp"))) is None
        assert mgr.latest_step() is None and mgr.all_steps() == []


# ----------------------------------------------------------------------------- schedule and retention
def test_should_save_schedule_and_no_double_save(tmp_path, mesh8):
    state = make_state(mesh8, P("fsdp"))
    with CheckpointManager(tmp_path / "ckpt", every_steps=5, keep=2, async_save=False) as mgr:
        assert [s for s in range(12) if mgr.should_save(s)] == [5, 10]
        assert not mgr.save(3, state, {})  # off schedule
        assert mgr.save(5, state, {})
        assert not mgr.save(5, state, {}, force=True)  # the final save landing on a periodic one
        assert mgr.save(7, state, {}, force=True)
        assert mgr.all_steps() == [5, 7] and mgr.latest_step() == 7


def test_keep_last_k_plus_every_m(tmp_path, mesh8):
    save_steps(tmp_path / "ckpt", mesh8, range(1, 8), keep=2, keep_every=3)
    with CheckpointManager(tmp_path / "ckpt", every_steps=1, keep=2, keep_every=3) as mgr:
        assert mgr.all_steps() == [3, 6, 7]
    assert sorted(int(p) for p in os.listdir(tmp_path / "ckpt") if p.isdigit()) == [3, 6, 7]


# ----------------------------------------------------------------------------- corruption
def largest_data_file(item_dir):
    """The biggest array-data file that a restore reads: OCDBT's merged data files in <item>/d/."""
    data_dir = os.path.join(item_dir, "d")
    return max((os.path.join(data_dir, name) for name in os.listdir(data_dir)), key=os.path.getsize)


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def flip_bytes(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("corrupt, reason", [
    (truncate, "truncated"),
    (flip_bytes, "sha256"),
    (os.remove, "missing"),
])
def test_corrupt_newest_falls_back_to_previous(tmp_path, mesh8, caplog, corrupt, reason):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, mesh8, [1, 2])
    corrupt(largest_data_file(directory / "2" / "state"))

    with CheckpointManager(directory, every_steps=1, keep=3) as mgr:
        with caplog.at_level(logging.WARNING, logger="instruct_jax.checkpoint"):
            step, restored, meta = mgr.restore_latest(abstract(states[1], mesh8, P("fsdp")))
        assert (step, meta) == (1, {"data_step": 1})
        assert_bit_identical(states[1], restored)
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        assert "step 2" in warning and reason in warning

        # The bad checkpoint is kept aside, and the resumed run can save step 2 again.
        (aside,) = os.listdir(directory / checkpoint.QUARANTINE_DIR)
        assert aside.startswith("2-") and reason in (directory / "corrupt" / aside / "REASON.txt").read_text()
        assert mgr.save(2, states[2], {"data_step": 2})
        mgr.wait()
        assert mgr.all_steps() == [1, 2]


def test_incomplete_checkpoints_are_ignored(tmp_path, mesh8, caplog):
    directory = tmp_path / "ckpt"
    states = save_steps(directory, mesh8, [1, 2, 3])
    # Step 3 was committed by orbax but the run died before its manifest was written.
    os.remove(directory / "3" / checkpoint.MANIFEST_NAME)
    # A save killed before orbax's commit leaves a tmp directory behind.
    tmp_dir = directory / "4.orbax-checkpoint-tmp-1700000000"
    os.makedirs(tmp_dir / "state")
    (tmp_dir / "state" / "junk").write_bytes(b"half written")

    with CheckpointManager(directory, every_steps=1, keep=3) as mgr:
        assert mgr.all_steps() == [1, 2] and mgr.latest_step() == 2
        with caplog.at_level(logging.WARNING, logger="instruct_jax.checkpoint"):
            step, restored, _ = mgr.restore_latest(abstract(states[2], mesh8, P("fsdp")))
    assert step == 2
    assert_bit_identical(states[2], restored)
    assert any("step 3" in r.getMessage() and "no manifest" in r.getMessage() for r in caplog.records)
    assert not any("step 4" in r.getMessage() for r in caplog.records)


def test_structure_mismatch_raises_instead_of_starting_over(tmp_path, mesh8):
    directory = tmp_path / "ckpt"
    state = save_steps(directory, mesh8, [1])[1]
    wrong = abstract(state, mesh8, P("fsdp")).replace(params={"other": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with CheckpointManager(directory, every_steps=1, keep=3) as mgr:
        with pytest.raises(RuntimeError, match="Refusing to start from scratch"):
            mgr.restore_latest(wrong)
    assert (directory / "1" / checkpoint.MANIFEST_NAME).exists()  # nothing was moved aside


def test_manifest_covers_the_meta_item_too(tmp_path, mesh8):
    directory = tmp_path / "ckpt"
    save_steps(directory, mesh8, [1])
    assert checkpoint.check_manifest(directory / "1") is None
    meta_file = directory / "1" / "meta" / "metadata"
    meta_file.write_text(meta_file.read_text().replace("1", "7"))  # same size, different bytes
    assert "meta/metadata" in checkpoint.check_manifest(directory / "1")


# ----------------------------------------------------------------------------- params export
def test_export_and_load_params(tmp_path, mesh8):
    params = make_state(mesh8, P("fsdp"), seed=5).params
    checkpoint.export_params(tmp_path / "params", params)
    mesh24 = jax.make_mesh((2, 4), ("data", "tensor"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh24, P(None, "tensor") if x.ndim == 2 else P())), params)
    loaded = checkpoint.load_params(tmp_path / "params", target)
    assert_bit_identical(params, loaded)
    assert loaded["embed"].sharding.spec == P(None, "tensor")

    flip_bytes(largest_data_file(tmp_path / "params"))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="sha256"):
        checkpoint.load_params(tmp_path / "params", target)


# ----------------------------------------------------------------------------- preemption
def test_preemption_guard_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.requested and time.time() < deadline:
            time.sleep(0.01)  # Python runs the handler in the main thread between bytecodes
        assert guard.requested and guard.should_stop() and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before
