"""PPO's pure numerics against naive Python loops, numpy and hand math (no model, seconds)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instruct_jax.config import OptimConfig
from instruct_jax.inference.logprobs import logprobs_and_entropy
from instruct_jax.model.transformer import ModelInput
from instruct_jax.rl.advantages import explained_variance, gae, masked_mean, masked_var, masked_whiten
from instruct_jax.rl.ppo.losses import policy_loss, value_loss
from instruct_jax.rl.ppo.optimizer import make_ppo_optimizer, scale_by_adam_tf_eps
from instruct_jax.rl.rewards import (KLController, adaptive_kl_update, apply_missing_eos, end_index, first_stop,
                                     kl_estimate, response_mask, scoring_input, token_count_reward, token_rewards)
from instruct_jax.rl.rollout import sample_from_tokens


def random_masked(seed=0, b=6, n=9):
    rng = np.random.default_rng(seed)
    lengths = np.array([1, n, 3, 5, n - 1, 2][:b])
    mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
    return rng, lengths, mask


# ----------------------------------------------------------------------------- GAE
def naive_gae(rewards, values, lengths, gamma, lam):
    b, n = rewards.shape
    adv = np.zeros((b, n))
    for i in range(b):
        last = 0.0
        for t in reversed(range(lengths[i])):
            next_value = values[i, t + 1] if t + 1 < lengths[i] else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    returns = adv + np.where(np.arange(n)[None] < lengths[:, None], values, 0.0)
    return adv, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_scan_equals_naive_loop_on_random_masked_data(gamma, lam):
    rng, lengths, mask = random_masked()
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)  # garbage after each row's end: must not matter
    adv, ret = jax.jit(gae, static_argnums=(3, 4))(rewards, values, mask, gamma, lam)
    want_adv, want_ret = naive_gae(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret * mask, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


# ----------------------------------------------------------------------------- masked statistics
def test_masked_statistics_and_whitening_equal_numpy():
    rng, _, mask = random_masked(1)
    x = rng.normal(3.0, 2.0, size=mask.shape).astype(np.float32)
    x_with_garbage = np.where(mask > 0, x, 1e6).astype(np.float32)  # nothing outside the mask may leak in
    valid = x[mask > 0]
    np.testing.assert_allclose(masked_mean(x_with_garbage, mask), valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x_with_garbage, mask), valid.var(ddof=1), rtol=1e-4)
    np.testing.assert_allclose(masked_var(x_with_garbage, mask, unbiased=False), valid.var(), rtol=1e-4)
    white = np.asarray(masked_whiten(x_with_garbage, mask))
    np.testing.assert_allclose(white[mask > 0], (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8), atol=1e-5)
    assert np.all(white[mask == 0] == 0)
    kept = np.asarray(masked_whiten(x_with_garbage, mask, shift_mean=False))
    scaled = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8) + valid.mean()
    np.testing.assert_allclose(kept[mask > 0], scaled, atol=1e-5)
    # the docstring's example
    np.testing.assert_allclose(masked_whiten(jnp.array([1., 2., 3., 100.]), jnp.array([1., 1., 1., 0.])),
                               [-1, 0, 1, 0], atol=1e-6)


def test_explained_variance_equals_numpy():
    rng, _, mask = random_masked(2)
    returns = rng.normal(size=mask.shape).astype(np.float32)
    values = (returns + 0.3 * rng.normal(size=mask.shape)).astype(np.float32)
    r, v = returns[mask > 0], values[mask > 0]
    want = 1 - np.var(r - v, ddof=1) / np.var(r, ddof=1)
    np.testing.assert_allclose(explained_variance(values, returns, mask), want, rtol=1e-4)


# ----------------------------------------------------------------------------- KL estimators and controllers
def test_k1_k3_equal_hand_math():
    l, l_ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-2.0, -1.0, -0.5])
    np.testing.assert_allclose(kl_estimate(l, l_ref, "k1"), [1.0, -1.0, 0.0], atol=1e-7)
    want_k3 = [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1, 0.0]  # e^(l_ref - l) - 1 - (l_ref - l)
    np.testing.assert_allclose(kl_estimate(l, l_ref, "k3"), want_k3, atol=1e-6)
    assert np.all(np.asarray(kl_estimate(l, l_ref, "k3")) >= 0)
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(l, l_ref, "k2")


def test_adaptive_kl_update_equals_hand_math():
    # the docstring example: e = clip(9 / 6 - 1, -0.2, 0.2) = 0.2
    assert adaptive_kl_update(0.1, 9.0, 64, 6.0, 10000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000), abs=1e-15)
    # inside the clip range: e = 6.6 / 6 - 1 = 0.1
    assert adaptive_kl_update(0.2, 6.6, 512, 6.0, 10000) == pytest.approx(0.2 * (1 + 0.1 * 512 / 10000), abs=1e-15)
    # below target, clipped at -0.2
    assert adaptive_kl_update(0.2, 0.0, 100, 6.0, 1000) == pytest.approx(0.2 * (1 - 0.2 * 0.1), abs=1e-15)
    fixed, adaptive = KLController(0.15), KLController(0.15, adaptive=True, target=6.0, horizon=10000)
    assert fixed.update(100.0, 64) == 0.15
    assert adaptive.update(100.0, 64) == pytest.approx(0.15 * (1 + 0.2 * 64 / 10000))
    restored = KLController(0.0, adaptive=True)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.kl_coef == adaptive.kl_coef  # exact through the checkpoint's JSON meta


# ----------------------------------------------------------------------------- masks and score placement
def test_first_stop_reads_response_tokens_only_and_pads_after_it():
    tokens = jnp.array([[7, 2, 5, 2, 9], [7, 5, 5, 5, 5], [2, 8, 8, 8, 8], [8, 8, 8, 8, 3]])
    lengths, done = first_stop(tokens, (2, 3))
    np.testing.assert_array_equal(lengths, [2, 5, 1, 5])
    np.testing.assert_array_equal(done, [True, False, True, True])
    np.testing.assert_array_equal(end_index(lengths), [1, 4, 0, 4])
    out = sample_from_tokens(tokens, (2, 3), pad_id=0)
    np.testing.assert_array_equal(out.tokens, [[7, 2, 0, 0, 0], [7, 5, 5, 5, 5], [2, 0, 0, 0, 0], [8, 8, 8, 8, 3]])
    np.testing.assert_array_equal(response_mask(lengths, 5),
                                  [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]])


def test_score_lands_exactly_at_the_first_eos_never_on_a_pad():
    # The module docstring's worked example, plus a row with two EOS and a row that never stopped.
    tokens = jnp.array([[7, 9, 2, 0, 0], [2, 5, 2, 0, 0], [7, 9, 4, 4, 4]])
    lengths, done = first_stop(tokens, (2,))
    kl = jnp.array([[0.5, -0.2, 0.1, 9.0, 9.0], [0.3, 9.0, 9.0, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    score = jnp.array([1.0, 2.0, 3.0])
    r = np.asarray(token_rewards(score, kl, 0.1, lengths))
    np.testing.assert_allclose(r[0], [-0.05, 0.02, 0.99, 0, 0], atol=1e-6)
    np.testing.assert_allclose(r[1], [-0.03 + 2.0, 0, 0, 0, 0], atol=1e-6)  # first EOS, inclusive
    np.testing.assert_allclose(r[2], [-0.01, -0.01, -0.01, -0.01, -0.01 + 3.0], atol=1e-6)  # last position
    mask = np.asarray(response_mask(lengths, 5))
    assert np.all(r[mask == 0] == 0)
    # the score sits on the first stop token, which is a real response token, never a pad
    for i, t_end in enumerate(np.asarray(end_index(lengths))):
        assert mask[i, t_end] == 1 and (not done[i] or tokens[i, t_end] == 2)


def test_missing_eos_penalty_replace_subtract_none():
    score, done = jnp.array([0.5, 2.0]), jnp.array([True, False])
    np.testing.assert_allclose(apply_missing_eos(score, done, "replace", -1.0), [0.5, -1.0])
    np.testing.assert_allclose(apply_missing_eos(score, done, "subtract", penalty=1.0), [0.5, 1.0])
    np.testing.assert_allclose(apply_missing_eos(score, done, "none"), [0.5, 2.0])


def test_scoring_input_appends_end_of_turn_to_truncated_rows():
    # The docstring example: T = 2, N = 3, eot 2, pad 0.
    prompt = ModelInput.left_padded(jnp.array([[5, 6], [0, 6]]), jnp.array([2, 1]))
    response = jnp.array([[7, 2, 0], [7, 8, 9]])
    lengths, done = first_stop(response, (2,))
    inputs, index = scoring_input(prompt, response, lengths, done, eot_id=2)
    np.testing.assert_array_equal(inputs.tokens, [[5, 6, 7, 2, 0, 0], [0, 6, 7, 8, 9, 2]])
    np.testing.assert_array_equal(inputs.segment_ids, [[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(inputs.positions, [[0, 1, 2, 3, 0, 0], [0, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(index, [3, 5])
    np.testing.assert_array_equal(np.asarray(inputs.tokens)[[0, 1], np.asarray(index)], [2, 2])


def test_token_count_reward_counts_only_response_tokens():
    response = jnp.array([[7, 7, 2, 7], [1, 7, 3, 3]])
    mask = response_mask(jnp.array([3, 4]), 4)  # row 0's last 7 is after its end
    np.testing.assert_array_equal(token_count_reward(7)({}, None, None, response, mask), [2, 1])


# ----------------------------------------------------------------------------- losses
def test_policy_loss_ratio_one_at_old_policy_and_clipping_by_hand():
    rng, _, mask = random_masked(3)
    logp = jnp.asarray(rng.normal(-2, 1, mask.shape), jnp.float32)
    adv = jnp.asarray(rng.normal(size=mask.shape), jnp.float32)
    loss, stats = policy_loss(logp, logp, adv, mask, 0.2)
    assert abs(float(stats["ratio_mean"]) - 1) < 1e-6 and float(stats["max_ratio"]) == 1.0
    assert float(stats["approx_kl"]) == 0.0 and float(stats["clipfrac"]) == 0.0
    np.testing.assert_allclose(loss, -np.sum(adv * mask) / mask.sum(), rtol=1e-5)
    # one token, by hand: r = e^0.5 = 1.6487 > 1.2; A = +1 -> max(-1.6487, -1.2) = -1.2 (clipped)
    one = jnp.ones((1, 1))
    loss, stats = policy_loss(jnp.array([[0.5]]), jnp.array([[0.0]]), one, one, 0.2)
    np.testing.assert_allclose(loss, -1.2, rtol=1e-6)
    assert float(stats["clipfrac"]) == 1.0 and float(stats["approx_kl"]) == pytest.approx(0.125)
    # A = -1: max(1.6487, 1.2) = 1.6487 (unclipped: a bad action made likelier is never clipped away)
    loss, stats = policy_loss(jnp.array([[0.5]]), jnp.array([[0.0]]), -one, one, 0.2)
    np.testing.assert_allclose(loss, math.exp(0.5), rtol=1e-6)
    assert float(stats["clipfrac"]) == 0.0


def test_value_loss_clipping_by_hand():
    one = jnp.ones((1, 1))
    # V_old 0, V 1, R 1: unclipped 0, clipped (0.2 - 1)^2 = 0.64 -> 0.5 * 0.64
    loss, stats = value_loss(one, 0 * one, one, one, 0.2)
    np.testing.assert_allclose(loss, 0.32, rtol=1e-6)
    assert float(stats["value_clipfrac"]) == 1.0
    loss, _ = value_loss(0.1 * one, 0 * one, one, one, 0.2)  # inside the clip range: 0.5 * 0.81
    np.testing.assert_allclose(loss, 0.405, rtol=1e-6)


def test_logprobs_and_entropy_equal_numpy_softmax():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (2, 3))
    logp, ent = logprobs_and_entropy(jnp.asarray(logits), jnp.asarray(tokens), 0.7)
    z = logits / 0.7
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(logp, np.log(np.take_along_axis(p, tokens[..., None], -1)[..., 0]), atol=1e-5)
    np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1), atol=1e-5)


# ----------------------------------------------------------------------------- TF-style Adam epsilon
def naive_tf_adam(grads, lr, b1, b2, eps):
    """tf.train.AdamOptimizer, literally: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); p -= lr_t m / (sqrt(v) + eps)."""
    m = v = p = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p -= lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * m / (math.sqrt(v) + eps)
        out.append(p)
    return out


def test_tf_adam_eps_equals_tensorflow_formula_and_differs_from_optax_early():
    grads = [1e-4, -3e-5, 2e-4, 5e-5]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-5
    tx = optax.chain(scale_by_adam_tf_eps(b1, b2, eps), optax.scale(-lr))
    params = {"w": jnp.zeros(())}
    state = tx.init(params)
    got = []
    for g in grads:
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, updates)
        got.append(float(params["w"]))
    np.testing.assert_allclose(got, naive_tf_adam(grads, lr, b1, b2, eps), rtol=1e-4)
    # optax puts eps after the bias correction: its first step is several times larger here.
    first_optax = -lr * 1e-4 / (1e-4 + eps)
    assert abs(first_optax) > 3 * abs(got[0])  # 0.00909 vs 0.00240 (3.8x)

    # Through make_ppo_optimizer (clip, decay and schedule around it), the state keeps the params' tree,
    # so train/state.py shards its moments like the params.
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=0, decay="constant", eps=1e-5, b2=0.999, grad_clip=0.0)
    tx = make_ppo_optimizer(cfg, 10, tf_adam_eps=True)
    p = {"a": jnp.ones((3,)), "norm": jnp.ones((2,))}
    state = tx.init(p)
    assert jax.tree.structure(state[0].mu) == jax.tree.structure(p)
    updates, _ = tx.update(jax.tree.map(lambda x: 1e-4 * x, p), state, p)
    np.testing.assert_allclose(updates["a"], 1e-3 * naive_tf_adam([1e-4], 1.0, 0.9, 0.999, 1e-5)[0], rtol=1e-4)
    # without the switch it is exactly train/optimizer.py's optimizer
    plain = make_ppo_optimizer(cfg, 10)
    u_plain, _ = plain.update(jax.tree.map(lambda x: 1e-4 * x, p), plain.init(p), p)
    np.testing.assert_allclose(u_plain["a"], -1e-3 * 1e-4 / (1e-4 + 1e-5), rtol=1e-4)
