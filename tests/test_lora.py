"""LoRA (model/lora.py): the merged weights give the adapted forward, the base alone gives the plain model, adapters
shard by their projection's axes, only adapters train (optimizer state for them alone), an SFT step on 8 devices
equals 1 device, exports are merged and load back with fresh adapters, PPO's reference is the policy's own base,
and the 8B PPO experiment's per-chip bytes fall by at least the reference's share."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instruct_jax.checkpoint import export_params, load_params
from instruct_jax.config import Config, OptimConfig, TrainConfig, validate
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.lora import base_only, drop_adapters, has_adapters, is_adapter, merge_adapters
from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.sharding import logical_to_spec, unbox
from instruct_jax.train.lm.build import build_lm

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

ALL = ("q", "k", "v", "o", "gate", "up", "down")
TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8, mlp_dim=64,
                   max_seq_len=32)


def lora_model(targets=ALL, rank=4) -> ModelConfig:
    return dataclasses.replace(TINY, lora_rank=rank, lora_alpha=8.0, lora_targets=targets)


def inputs(batch=2, length=12, seed=2) -> ModelInput:
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 1, 64)
    return ModelInput(tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)), jnp.ones((batch, length), jnp.int32))


def randomised_adapters(params, seed=1):
    """Every B made non-zero, so the adapters change the output."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    key = jax.random.PRNGKey(seed)
    out = [0.2 * jax.random.normal(jax.random.fold_in(key, i), x.shape) if str(p[-1].key).endswith("_lora_b") else x
           for i, (p, x) in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def naive_adapted_logits(cfg: ModelConfig, params, x: ModelInput):
    """The adapted model by hand: every W replaced by W + (alpha / r) A B with an explicit loop over layers and
    np.einsum, then the plain model's forward (an independent merge)."""
    scale = cfg.lora_alpha / cfg.lora_rank
    plain = jax.tree.map(np.asarray, drop_adapters(params))
    for group, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
        sub = params["layers"][group]
        for name in names:
            if name + "_lora_a" not in sub:
                continue
            a, b = np.asarray(sub[name + "_lora_a"]), np.asarray(sub[name + "_lora_b"])
            w = plain["layers"][group][name].copy()
            for layer in range(cfg.num_layers):
                flat_a = a[layer].reshape(-1, cfg.lora_rank)  # [prod(I), r]
                flat_b = b[layer].reshape(cfg.lora_rank, -1)  # [r, prod(O)]
                w[layer] += scale * (flat_a @ flat_b).reshape(w[layer].shape)
            plain["layers"][group][name] = w
    model = Transformer(dataclasses.replace(cfg, lora_rank=0))
    return np.asarray(model.apply({"params": plain}, x).logits)


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_merge_equals_the_adapted_forward_and_the_base_is_the_plain_model(targets):
    cfg = lora_model(targets)
    model = Transformer(cfg)
    params = randomised_adapters(unbox(init_params_boxed(model, jax.random.PRNGKey(0))))
    adapted = np.asarray(model.apply({"params": params}, inputs()).logits)
    plain = Transformer(dataclasses.replace(cfg, lora_rank=0))
    base = np.asarray(plain.apply({"params": drop_adapters(params)}, inputs()).logits)
    assert np.abs(adapted - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(adapted, naive_adapted_logits(cfg, params, inputs()), atol=2e-5)
    merged = merge_adapters(params, cfg)
    assert not has_adapters(merged)
    np.testing.assert_allclose(np.asarray(plain.apply({"params": merged}, inputs()).logits), adapted, atol=2e-5)
    # the base alone (B = 0) is exactly the plain model: PPO's and DPO's reference
    np.testing.assert_array_equal(np.asarray(model.apply({"params": base_only(params)}, inputs()).logits), base)
    # adapters on exactly the chosen projections, rank r
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0] if is_adapter(p)}
    assert names == {f"{t}_lora_{s}" for t in targets for s in "ab"}
    assert params["layers"]["attn"]["q_lora_a"].shape == (2, 32, 4)
    assert params["layers"]["attn"]["q_lora_b"].shape == (2, 4, 8, 8)


def tiny_cfg(**mesh) -> Config:
    return Config(model=lora_model(), mesh=MeshConfig(**{"fsdp": 1, **mesh}),
                  optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-3),
                  train=TrainConfig(steps=10, global_batch_size=8, seq_len=16))


def random_batch(seed=0, batch=8, seq=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 64, size=(batch, seq)).astype(np.int32)
    idx = np.arange(seq)[None].repeat(batch, 0)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": (idx < seq - 1).astype(np.float32),
            "positions": idx.astype(np.int32), "segment_ids": np.ones_like(tokens)}


def run_steps(cfg, devices, steps=3):
    setup = build_lm(cfg, devices)
    state = setup.init_state()
    # non-zero B from the start, so the base's gradient is non-zero too (and must still not move it)
    state = state.replace(params=jax.device_put(randomised_adapters(jax.device_get(state.params)),
                                                setup.state_shardings.params))
    start = jax.device_get(state.params)
    losses = []
    for _ in range(steps):
        state, metrics = setup.train_step(state, random_batch(seed=0))  # one batch: its loss must fall
        losses.append(float(metrics["loss"]))
    return setup, start, state, losses


@pytest.fixture(scope="module")
def one_device():
    return run_steps(tiny_cfg(), jax.devices()[:1])


def test_only_adapters_train_and_the_optimizer_holds_state_for_them_alone(one_device):
    setup, start, state, losses = one_device
    after = jax.device_get(state.params)
    moved = {jax.tree_util.keystr(p): not np.array_equal(a, b) for (p, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(start)[0], jax.tree_util.tree_flatten_with_path(after)[0])}
    assert all(v == ("_lora_" in k) for k, v in moved.items()), moved
    assert losses[-1] < losses[0]
    opt_leaves = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "shape") and x.ndim > 0]
    adapter_elems = sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(after)[0] if is_adapter(p))
    assert sum(x.size for x in opt_leaves) == 2 * adapter_elems  # Adam's mu and nu, adapters only


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(fsdp=2, tensor=4)])
def test_lora_sft_step_on_8_devices_equals_1_device(one_device, mesh):
    _, _, want, want_losses = one_device
    setup, _, state, losses = run_steps(tiny_cfg(**mesh), jax.devices())
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(want.params))
    rules = setup.rules  # adapters shard by their projection's own axes, the rank replicated
    attn = state.params["layers"]["attn"]
    assert attn["q_lora_a"].sharding.spec == logical_to_spec(("layers", "embed", "lora_rank"), rules)
    assert attn["q_lora_b"].sharding.spec == logical_to_spec(("layers", "lora_rank", "heads", "head_dim"), rules)
    if mesh.get("tensor"):  # [L, r, F]: F over the tensor axis, like the gate's own F
        assert state.params["layers"]["mlp"]["gate_lora_b"].sharding.spec == P(None, None, "tensor")


def test_exports_are_merged_and_load_back_with_fresh_adapters(one_device, tmp_path):
    setup, _, state, _ = one_device
    from instruct_jax.model.lora import merged_for_export

    cfg = setup.cfg
    export_params(str(tmp_path / "params"), merged_for_export(state.params, cfg.model))
    plain_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=0))
    plain = build_lm(plain_cfg, jax.devices()[:1])
    merged = load_params(str(tmp_path / "params"), plain.abstract_state.params)  # a plain model reads it
    adapted = Transformer(cfg.model).apply({"params": state.params}, inputs()).logits
    np.testing.assert_allclose(np.asarray(Transformer(plain_cfg.model).apply({"params": merged}, inputs()).logits),
                               np.asarray(adapted), atol=2e-5)
    # a LoRA run reading the export: the base is the merged model, B = 0, A drawn fresh
    again = load_params(str(tmp_path / "params"), setup.abstract_state.params)
    assert np.all(np.asarray(again["layers"]["attn"]["q_lora_b"]) == 0)
    assert np.asarray(again["layers"]["attn"]["q_lora_a"]).std() > 0
    np.testing.assert_allclose(np.asarray(Transformer(cfg.model).apply({"params": again}, inputs()).logits),
                               np.asarray(adapted), atol=2e-5)


def test_ppo_with_lora_uses_the_policys_base_as_its_reference():
    from ppo_toy import toy_config, toy_setup

    cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1))
    cfg.model = dataclasses.replace(cfg.model, lora_rank=4, lora_targets=ALL)
    setup, state, _ = toy_setup(cfg)
    from instruct_jax.rl.ppo.trainer import reference_params

    assert reference_params(setup) == {}  # no second copy of the weights
    params = jax.device_get(state.policy.params)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.policy.opt_state))[0]
    assert sum(x.size for _, x in leaves if hasattr(x, "ndim") and x.ndim > 0) == 2 * sum(
        x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0] if is_adapter(p))
    # the update moves the adapters only; the KL is measured against the unadapted base
    from ppo_toy import run_toy

    state = state.replace(policy=state.policy.replace(params=jax.device_put(
        randomised_adapters(params), setup.shardings.policy.params)))
    state, history = run_toy(setup, state, {}, iterations=2)
    assert history[0]["kl"] != 0.0  # B != 0: the policy differs from its base
    after = jax.device_get(state.policy.params)
    np.testing.assert_array_equal(after["layers"]["attn"]["q"], params["layers"]["attn"]["q"])
    assert not np.array_equal(after["layers"]["attn"]["q_lora_b"], params["layers"]["attn"]["q_lora_b"])


def test_8b_ppo_per_chip_bytes_fall_by_at_least_the_reference_share():
    """The 8B PPO experiment's trees on its own 64-chip mesh (an AbstractMesh: nothing allocated or compiled):
    params + optimizer state per chip, without and with LoRA (rank 16 on every projection)."""
    from instruct_jax.config import load_experiment
    from instruct_jax.plan import per_device_bytes
    from instruct_jax.parallel.mesh import make_abstract_mesh
    from instruct_jax.rl.ppo.trainer import ppo_trees

    cfg = load_experiment("experiments/llama3_8b_ppo_v5p128.py")

    def per_chip(c):
        t = ppo_trees(c, make_abstract_mesh(c.mesh, c.mesh.num_devices, c.mesh.num_slices))
        s = t.abstract_state
        reference = 0 if c.model.lora_rank else per_device_bytes(s.policy.params)
        return {"params": per_device_bytes(s.policy.params) + per_device_bytes(s.value.params) + reference,
                "optimizer": per_device_bytes(s.policy.opt_state) + per_device_bytes(s.value.opt_state),
                "reference": reference}

    full = per_chip(cfg)
    lora = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora_rank=16, lora_targets=ALL))
    validate(lora)
    small = per_chip(lora)
    total_full, total_lora = full["params"] + full["optimizer"], small["params"] + small["optimizer"]
    print(f"8B PPO per chip: full {total_full / 2**30:.2f} GiB, LoRA {total_lora / 2**30:.2f} GiB, "
          f"reference {full['reference'] / 2**30:.2f} GiB")
    assert total_full - total_lora >= full["reference"]
    # Adam state for the adapters alone; adapters whose only sharded axis is mlp (tensor = 1 on this mesh) are
    # replicated over fsdp, so it is a third of full fine-tuning here, not a hundredth (docs/ALGORITHMS.md)
    assert small["optimizer"] < full["optimizer"] / 2


@pytest.mark.parametrize("override,field", [(dict(lora_rank=5), "model.lora_rank"),
                                            (dict(lora_rank=2, lora_targets=("q", "x")), "model.lora_targets"),
                                            (dict(lora_rank=2, lora_alpha=0.0), "model.lora_alpha")])
def test_bad_lora_settings_name_their_field(override, field):
    cfg = Config(model=dataclasses.replace(TINY, **override))  # d_model 32: rank <= 4
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate(cfg)


def test_dpo_with_lora_uses_the_policys_base_as_its_reference():
    """DPO with adapters only: the reference is the policy's base (passed as {}), so at the start (B = 0) every
    implicit reward is exactly 0 and the loss is log 2; after steps the base is untouched and the margin moved."""
    from test_dpo import ranking_batch, tiny_cfg as dpo_cfg

    from instruct_jax.train.dpo.trainer import build_dpo

    cfg = dpo_cfg()
    cfg.model = dataclasses.replace(cfg.model, lora_rank=4, lora_targets=ALL)
    setup = build_dpo(cfg, jax.devices()[:1])
    state = setup.init_state()
    start = jax.device_get(state.params)
    rows = []
    for seed in range(3):
        state, metrics = setup.train_step(state, {}, ranking_batch(seed=seed))
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    assert rows[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-6) and abs(rows[0]["margin"]) < 1e-6
    assert abs(rows[-1]["margin"]) > 1e-3
    after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["layers"]["attn"]["q"], start["layers"]["attn"]["q"])
    np.testing.assert_array_equal(after["embedding"], start["embedding"])
    rewards = np.asarray(setup.eval_step(state.params, {}, ranking_batch(seed=0)))
    assert np.abs(rewards).max() > 0
