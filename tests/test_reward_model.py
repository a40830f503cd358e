"""The reward model: head init, scores independent of padding and packing, sharded == single device."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.config import Config, OptimConfig, RewardConfig, TrainConfig, load_experiment
from instruct_jax.data.config import DataConfig
from instruct_jax.inference.scorer import last_token_index, score_fn
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.heads import RewardModel, ScalarHead, head_init_std, init_reward_params_boxed
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.mesh import MeshConfig, make_abstract_mesh
from instruct_jax.parallel.sharding import unbox
from instruct_jax.train.rm.ranking import reward_loss_and_grads
from instruct_jax.train.rm.trainer import abstract_rm_state, build_rm

from conftest import REPO

MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                    max_seq_len=64, dtype="float32")


def test_head_init_matches_lm_human_preferences():
    params = ScalarHead().init(jax.random.PRNGKey(0), jnp.zeros((1, 4095)))["params"]
    kernel, bias = unbox(params["kernel"]), unbox(params["bias"])
    assert float(jnp.std(kernel)) == pytest.approx(head_init_std(4095), rel=0.05)  # 1/sqrt(4096) = 0.0156
    assert float(bias) == 0.0 and bias.shape == ()
    rm = unbox(jax.eval_shape(functools.partial(init_reward_params_boxed, RewardModel(MODEL)), jax.random.PRNGKey(0)))
    assert set(rm) == {"trunk", "head"} and "lm_head" not in rm["trunk"]


def sequences(seed=0, lengths=(5, 9, 3, 12)):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 64, n).astype(np.int32) for n in lengths]


def right_padded(seqs, t):
    tokens = np.zeros((len(seqs), t), np.int32)
    segment_ids = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], segment_ids[i, :len(s)] = s, 1
    return tokens, segment_ids


def left_padded(seqs, t):
    tokens = np.full((len(seqs), t), 3, np.int32)  # a pad id that is a real token id: the mask must not care
    segment_ids = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s):], segment_ids[i, t - len(s):] = s, 1
    return tokens, segment_ids


def positions_from_mask(segment_ids):
    """Position of each token within its segment, counting real tokens only (not array indices)."""
    out = np.zeros_like(segment_ids)
    for b, row in enumerate(segment_ids):
        count = {}
        for t, seg in enumerate(row):
            if seg:
                out[b, t] = count.get(seg, 0)
                count[seg] = out[b, t] + 1
    return out


def test_reward_is_independent_of_padding_amount_side_and_packing():
    model = RewardModel(MODEL)
    params = unbox(init_reward_params_boxed(model, jax.random.PRNGKey(1)))
    score = jax.jit(lambda tokens, segment_ids, positions, eos: model.apply(
        {"params": params}, ModelInput(tokens, positions, segment_ids), eos))
    seqs = sequences()

    def run(tokens, segment_ids, eos=None):
        eos = last_token_index(jnp.asarray(segment_ids)) if eos is None else eos
        return np.asarray(score(tokens, segment_ids, positions_from_mask(segment_ids), jnp.asarray(eos)))

    reference = run(*right_padded(seqs, 16))
    np.testing.assert_allclose(run(*right_padded(seqs, 40)), reference, atol=1e-5)
    np.testing.assert_allclose(run(*left_padded(seqs, 16)), reference, atol=1e-5)
    np.testing.assert_allclose(run(*left_padded(seqs, 40)), reference, atol=1e-5)
    # Packed: [seq0 | seq1 | pad] and [seq2 | seq3 | pad] in two rows of 32, scored at each segment's end.
    tokens = np.zeros((2, 32), np.int32)
    segment_ids = np.zeros((2, 32), np.int32)
    eos = np.zeros((2, 2), np.int32)
    for row, (a, b) in enumerate(((seqs[0], seqs[1]), (seqs[2], seqs[3]))):
        tokens[row, :len(a)], segment_ids[row, :len(a)] = a, 1
        tokens[row, len(a):len(a) + len(b)], segment_ids[row, len(a):len(a) + len(b)] = b, 2
        eos[row] = [len(a) - 1, len(a) + len(b) - 1]
    np.testing.assert_allclose(run(tokens, segment_ids, eos).reshape(-1), reference, atol=1e-5)
    # A different reward for a different sequence: the test would catch a constant model.
    assert np.ptp(reference) > 1e-3


def test_score_fn_applies_normalization():
    model = RewardModel(MODEL)
    params = unbox(init_reward_params_boxed(model, jax.random.PRNGKey(2)))
    tokens, segment_ids = right_padded(sequences(), 16)
    inputs = ModelInput(jnp.asarray(tokens), jnp.asarray(positions_from_mask(segment_ids)), jnp.asarray(segment_ids))
    eos = last_token_index(inputs.segment_ids)
    score = jax.jit(score_fn(MODEL))
    raw = score(params, {"gain": 1.0, "bias": 0.0}, inputs, eos)
    np.testing.assert_allclose(score(params, {"gain": 2.0, "bias": -1.5}, inputs, eos), 2 * raw - 1.5, rtol=1e-6)


def rm_config(mesh: MeshConfig, microbatches: int = 1) -> Config:
    return Config(model=MODEL, mesh=mesh, data=DataConfig(format="ranking"),
                  optim=OptimConfig(learning_rate=1e-3), train=TrainConfig(global_batch_size=8, seq_len=16,
                                                                           microbatches=microbatches),
                  reward=RewardConfig(synthetic=1))


def ranking_batch(b=8, k=3, t=16, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, t + 1, (b, k)).astype(np.int32)
    ranks = np.stack([rng.permutation(k) + 1 for _ in range(b)]).astype(np.int32)
    ranks[0, 1] = ranks[0, 0] = 1  # a tie
    ranks[1, 2], lengths[1, 2] = 0, 0  # an empty slot
    idx = np.arange(t)
    segment_ids = (idx < lengths[..., None]).astype(np.int32)
    return {"tokens": (rng.integers(4, 64, (b, k, t)) * segment_ids).astype(np.int32),
            "positions": (idx * segment_ids).astype(np.int32), "segment_ids": segment_ids,
            "ranks": ranks, "lengths": lengths}


def loss_and_grads(setup, params, batch, microbatches):
    fn = functools.partial(reward_loss_and_grads, setup.model, num_micro=microbatches, rules=setup.rules,
                           grad_shardings=setup.state_shardings.params)
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        loss, grads, stats = jax.jit(lambda p, b: fn(params=p, batch=b))(params, batch)
    return float(loss), jax.device_get(grads)


def test_sharded_equals_single_device_and_microbatches_accumulate_exactly():
    single = build_rm(rm_config(MeshConfig(fsdp=1)), devices=jax.devices()[:1])
    sharded = build_rm(rm_config(MeshConfig(data=2, fsdp=4)))
    params = jax.device_get(single.init_state().params)
    batch = ranking_batch()
    loss_1, grads_1 = loss_and_grads(single, params, batch, 1)
    sharded_params = sharded.init_state(params=params).params
    loss_8, grads_8 = loss_and_grads(sharded, sharded_params, batch, 1)
    loss_8m, grads_8m = loss_and_grads(sharded, sharded_params, batch, 2)
    assert loss_8 == pytest.approx(loss_1, rel=1e-5) and loss_8m == pytest.approx(loss_1, rel=1e-5)
    for other in (grads_8, grads_8m):
        for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(other)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["tiny_rm.py", "hh_rm.py:cpu", "hh_rm.py:gpu"])
def test_reward_experiments_shard_abstractly(spec):
    cfg = load_experiment(str(REPO / "experiments" / spec))
    n = cfg.mesh.num_devices or jax.device_count()
    abstract, _ = abstract_rm_state(cfg, make_abstract_mesh(cfg.mesh, n))
    head = abstract.params["head"]
    assert head["kernel"].shape == (cfg.model.d_model,) and head["bias"].shape == ()
    assert "lm_head" not in abstract.params["trunk"]
