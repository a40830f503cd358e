"""PPO-ptx (policy only, exact NLL), the policy EMA, config validation and the PPOState checkpoint."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.checkpoint import CheckpointManager
from instruct_jax.errors import ConfigError
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.rl.ppo.losses import ptx_loss
from instruct_jax.rl.rollout import sample_from_tokens
from ppo_toy import EOS, PAD, random_prompts, toy_config, toy_setup
from instruct_jax.rl.ppo.trainer import validate_ppo

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

B, N, P, TP = 8, 12, 4, 10  # rollout rows, response slots, ptx rows per step, ptx length


def ptx_batch():
    rng = np.random.default_rng(2)
    seq = rng.integers(3, 64, (P, TP + 1)).astype(np.int32)
    mask = (np.arange(TP)[None] < np.array([[10], [6], [8], [3]])).astype(np.float32)
    return {"tokens": jnp.asarray(seq[:, :-1]), "targets": jnp.asarray(seq[:, 1:]), "loss_mask": jnp.asarray(mask),
            "positions": jnp.asarray(np.broadcast_to(np.arange(TP), (P, TP)).astype(np.int32)),
            "segment_ids": jnp.asarray(np.ones((P, TP), np.int32))}


def rollout():
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 64, (B, N))
    tokens[::3, 4] = EOS
    return sample_from_tokens(jnp.asarray(tokens, jnp.int32), (EOS,), PAD)


def run_once(**ppo):
    cfg = toy_config(mesh=MeshConfig(fsdp=-1), batch=B, epochs=1, minibatches=1, **ppo)
    setup, state, ref = toy_setup(cfg, devices=jax.devices()[:1])
    p0 = jax.device_get(state.policy.params)
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, {}, random_prompts(B), rollout(),
                                    np.float32(0.05))
    args = (state, exp, jax.random.PRNGKey(1)) + ((ptx_batch(),) if cfg.ppo.ptx_coef > 0 else ())
    new, stats = setup.steps.update(*args)
    return setup, p0, jax.device_get(new), jax.device_get(stats)


def naive_nll(setup, params, batch) -> float:
    """Per-token mean next-token NLL from the full logits, in float64 numpy (the reference)."""
    logits = np.asarray(setup.policy_model.apply({"params": params}, ModelInput.from_batch(batch)).logits, np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(batch["targets"])[..., None], -1)[..., 0]
    mask = np.asarray(batch["loss_mask"], np.float64)
    return float((nll * mask).sum() / max(mask.sum(), 1.0))


def test_ptx_with_a_chunked_loss_is_the_same_nll():
    """model.loss_chunk: the ptx term never holds [B, T, V] logits and is the same per-token NLL."""
    from ppo_toy import TOY_MODEL

    cfg = toy_config(mesh=MeshConfig(fsdp=-1), batch=B, epochs=1, minibatches=1, ptx_coef=2.0, ptx_batch_size=P)
    cfg.model = dataclasses.replace(TOY_MODEL, loss_chunk=4)
    setup, state, ref = toy_setup(cfg, devices=jax.devices()[:1])
    p0 = jax.device_get(state.policy.params)
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, {}, random_prompts(B), rollout(),
                                    np.float32(0.05))
    _, stats = setup.steps.update(state, exp, jax.random.PRNGKey(1), ptx_batch())
    np.testing.assert_allclose(jax.device_get(stats)["ptx_loss"][0], naive_nll(setup, p0, ptx_batch()), rtol=1e-5)
    assert ptx_loss(np.float32(6.0), np.float32(0.0)) == 6.0  # an empty batch divides by 1, not 0


def test_ptx_updates_the_policy_only_with_the_exact_nll_and_ema_follows_the_policy():
    setup, p0, with_ptx, stats = run_once(ptx_coef=2.0, ptx_batch_size=P, ema_decay=0.9)
    _, _, without, stats0 = run_once()
    # the ptx term is the per-token mean NLL of the fresh batch under the policy before this step
    batch = ptx_batch()
    np.testing.assert_allclose(stats["ptx_loss"][0], naive_nll(setup, p0, batch), rtol=1e-5)
    np.testing.assert_allclose(stats["loss"][0], stats0["loss"][0] + 2.0 * stats["ptx_loss"][0], rtol=1e-5)
    # it moves the policy, never the value model
    jax.tree.map(np.testing.assert_array_equal, with_ptx.value.params, without.value.params)
    diff = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), with_ptx.policy.params,
                                        without.policy.params))
    assert max(diff) > 1e-4
    # EMA after one optimizer step: 0.9 * p0 + 0.1 * p1
    jax.tree.map(lambda e, a, b: np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-6, atol=1e-7),
                 with_ptx.ema, p0, with_ptx.policy.params)
    assert without.ema == {}


def test_ppo_state_round_trips_through_the_checkpoint(tmp_path):
    for ema_decay in (0.0, 0.99):
        cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1), batch=16, ema_decay=ema_decay)
        setup, state, _ = toy_setup(cfg)
        with CheckpointManager(tmp_path / f"ema{ema_decay}", every_steps=1, keep=2, async_save=False) as ckpt:
            ckpt.save(3, state, {"iteration": 3, "kl_controller": {"kl_coef": 0.1234567890123}}, force=True)
            step, restored, meta = ckpt.restore_latest(setup.abstract_state)
        assert step == 3 and meta["kl_controller"]["kl_coef"] == 0.1234567890123
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     jax.device_get(restored), jax.device_get(state))
        leaf = restored.policy.params["embedding"]
        assert leaf.sharding == setup.shardings.policy.params["embedding"]


@pytest.mark.parametrize("override,field", [
    (dict(kl_estimator="k2"), "ppo.kl_estimator"),
    (dict(missing_eos="drop"), "ppo.missing_eos"),
    (dict(minibatches=3), "ppo.minibatches"),
    (dict(response_len=60), "ppo.response_len"),
    (dict(ema_decay=1.0), "ppo.ema_decay"),
    (dict(reward="model"), "ppo.reward_model"),
    (dict(temperature=0.0), "ppo.temperature"),
    (dict(minibatches=4), "ppo.minibatches"),  # 16 / 4 = 4 rows cannot split over 8 batch shards
])
def test_bad_ppo_settings_name_their_field(override, field):
    cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1))
    cfg.ppo = dataclasses.replace(cfg.ppo, **override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_ppo(cfg, num_devices=8)


@pytest.mark.parametrize("sampling", [dict(top_k=5), dict(top_p=0.9), dict(temperature=0.0)])
def test_ppo_rejects_samplers_that_are_not_exactly_softmax(sampling):
    from instruct_jax.inference.sampling import SamplingConfig
    from instruct_jax.rl.ppo.step import make_ppo_steps

    cfg = toy_config()
    with pytest.raises(ValueError, match="exactly softmax"):
        make_ppo_steps(None, None, None, cfg.ppo, SamplingConfig(stop_tokens=(EOS,), pad_id=PAD, **sampling), EOS,
                       None, None, None, None, None, None)
