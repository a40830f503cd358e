"""Meshes, logical sharding rules, and the sharded SFT step against one device."""

import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instruct_jax.config import Config, OptimConfig, TrainConfig
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig, hybrid_device_grid, resolve_mesh_shape
from instruct_jax.parallel.sharding import logical_to_spec
from instruct_jax.train.lm.build import build_lm


def tiny_cfg(micro=1, batch=8, **mesh) -> Config:
    return Config(
        model=ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                          mlp_dim=64, max_seq_len=32),
        mesh=MeshConfig(**{"fsdp": 1, **mesh}),
        # eps well above float noise: Adam's g / (sqrt(v) + eps) turns a gradient of ~1e-7 (q/k
        # weights at init) into a sign-like full-size step, so reduction-order noise between
        # meshes would otherwise decide the direction of those updates.
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-3),
        train=TrainConfig(steps=10, global_batch_size=batch, microbatches=micro, seq_len=16))


def random_batch(batch=8, seq=16, vocab=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    idx = np.arange(seq)[None]
    valid = idx < lengths[:, None]
    return {
        "tokens": np.where(valid, tokens, 0).astype(np.int32),
        "targets": np.where(valid, np.roll(tokens, -1, axis=1), 0).astype(np.int32),
        "loss_mask": (valid & (idx >= 3) & (idx < lengths[:, None] - 1)).astype(np.float32),
        "positions": np.where(valid, idx, 0).astype(np.int32),
        "segment_ids": valid.astype(np.int32),
    }


def run_steps(cfg, devices, batches):
    setup = build_lm(cfg, devices)
    state = setup.init_state()
    losses = []
    for b in batches:
        state, metrics = setup.train_step(state, b)
        losses.append(float(metrics["loss"]))
    return setup, state, losses


@pytest.fixture(scope="module")
def single_device_run():
    batches = [random_batch(seed=s) for s in range(2)]
    _, state, losses = run_steps(tiny_cfg(data=1), jax.devices()[:1], batches)
    return batches, jax.device_get(state.params), losses


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=4), dict(fsdp=2, tensor=4)])
def test_sharded_sft_step_equals_single_device(single_device_run, mesh):
    batches, want_params, want_losses = single_device_run
    setup, state, losses = run_steps(tiny_cfg(**mesh), jax.devices(), batches)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), want_params)
    # Parameters (and Adam moments) are sharded as the rules say.
    rules = setup.rules
    assert state.params["layers"]["attn"]["q"].sharding.spec == logical_to_spec(("layers", "embed", "heads", "head_dim"), rules)
    assert state.params["layers"]["mlp"]["down"].sharding.spec == logical_to_spec(("layers", "mlp", "embed"), rules)
    assert state.params["embedding"].sharding.spec == logical_to_spec(("vocab", "embed"), rules)
    mu = state.opt_state[1][0].mu
    assert mu["layers"]["mlp"]["gate"].sharding.spec == state.params["layers"]["mlp"]["gate"].sharding.spec
    assert state.params["layers"]["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")
    # Each device holds only its shard: [L, D / fsdp, F / tensor].
    shard = state.params["layers"]["mlp"]["gate"].addressable_shards[0].data.shape
    assert shard == (2, 32 // mesh.get("fsdp", 1), 64 // mesh.get("tensor", 1))


def test_gradient_accumulation_equals_big_batch():
    """4 microbatches of b = one step on 4b: same loss and same updated params."""
    big = random_batch(batch=32, seed=3)
    _, s1, l1 = run_steps(tiny_cfg(batch=32, micro=1, data=2, fsdp=4), jax.devices(), [big])
    _, s4, l4 = run_steps(tiny_cfg(batch=32, micro=4, data=2, fsdp=4), jax.devices(), [big])
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 jax.device_get(s4.params), jax.device_get(s1.params))


def test_loss_is_token_weighted_not_mean_of_means():
    setup = build_lm(tiny_cfg(data=8), jax.devices())
    state = setup.init_state()
    batch = random_batch(seed=4)
    batch["loss_mask"][0, :] = 0
    batch["loss_mask"][0, 1] = 1  # row 0 has one target token, others many
    metrics = setup.eval_step(state.params, batch)
    from instruct_jax.model.transformer import ModelInput
    from instruct_jax.train.losses import token_nll

    logits = setup.model.apply({"params": jax.device_get(state.params)}, ModelInput.from_batch(batch)).logits
    nll = np.asarray(token_nll(logits, batch["targets"]))
    want = (nll * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    np.testing.assert_allclose(metrics["loss_sum"] / metrics["tokens"], want, rtol=1e-5)


def test_mesh_fill_and_errors():
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1), 8) == dict(data=2, fsdp=4, sequence=1, tensor=1)
    with pytest.raises(ConfigError, match="mesh.data/fsdp/sequence/tensor"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="mesh.tensor"):
        resolve_mesh_shape(MeshConfig(fsdp=-1, tensor=-1), 8)
    with pytest.raises(ConfigError, match="mesh.fsdp.*not divisible"):
        resolve_mesh_shape(MeshConfig(data=3, fsdp=-1), 8)


def test_batch_must_divide_over_batch_axes():
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        build_lm(tiny_cfg(batch=12, data=8), jax.devices())
    with pytest.raises(ConfigError, match="train.microbatches"):
        build_lm(tiny_cfg(batch=8, micro=3, data=8), jax.devices())


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ConfigError, match="'mystery' has no rule"):
        logical_to_spec(("batch", "mystery"), MeshConfig().logical_rules())
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        build_lm(Config(mesh=MeshConfig(rules=(("mlp", "model"),))), jax.devices())


def test_unknown_logical_axis_of_an_activation_is_an_error_too():
    """Activation constraints check their names against the active rules (flax alone replicates silently)."""
    import jax.numpy as jnp

    from instruct_jax.parallel.context import logical_constraint, mesh_and_rules
    from instruct_jax.parallel.mesh import make_mesh

    cfg = MeshConfig(data=2, fsdp=-1)
    mesh, rules = make_mesh(cfg), cfg.logical_rules()
    x = jnp.ones((8, 4))
    with mesh_and_rules(mesh, rules):
        y = jax.jit(lambda a: logical_constraint(a * 2, ("batch", "act_embed")))(x)
        assert y.sharding.spec[0] == ("data", "fsdp")
        with pytest.raises(ConfigError, match="logical axis 'embd' .* has no rule") as e:
            jax.jit(lambda a: logical_constraint(a, ("batch", "embd")))(x)
    assert e.value.field == "mesh.rules"
    np.testing.assert_array_equal(logical_constraint(x, ("embd",)), x)  # no rules active: flax's no-op


def test_indivisible_parameter_names_the_array():
    cfg = tiny_cfg(fsdp=1, tensor=8)  # 4 kv heads cannot split 8 ways
    with pytest.raises(ConfigError, match=r"\['k'\].*cannot be split over mesh axes tensor"):
        build_lm(cfg, jax.devices())


def test_multislice_grid_worked_example():
    """2 slices x 4 devices, data across slices and fsdp within: rows are slices."""
    devices = [types.SimpleNamespace(id=i, slice_index=i // 4) for i in range(8)]
    ici = dict(data=1, fsdp=4, sequence=1, tensor=1)
    dcn = dict(data=2, fsdp=1, sequence=1, tensor=1)
    grid = hybrid_device_grid(devices, ici, dcn)
    ids = np.vectorize(lambda d: d.id)(grid).reshape(2, 4)
    assert ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # fsdp across slices instead: each fsdp row mixes the slices at its outer index.
    grid = hybrid_device_grid(devices, dict(data=1, fsdp=4, sequence=1, tensor=1),
                              dict(data=1, fsdp=2, sequence=1, tensor=1))
    assert np.vectorize(lambda d: d.id)(grid).reshape(8).tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert np.vectorize(lambda d: d.slice_index)(grid).reshape(8).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
