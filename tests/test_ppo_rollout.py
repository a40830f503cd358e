"""Experience and update on a tiny model (one device): log-prob consistency, zero KL at the reference,
masking after each response's end, ratio = 1 on the first minibatch, value positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.inference.logprobs import value_index
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.rl.rollout import sample_from_tokens
from instruct_jax.rl.ppo.trainer import reference_params
from ppo_toy import EOS, PAD, REWARDED, random_prompts, run_toy, toy_config, toy_setup
from instruct_jax.inference.sampling import SampleOutput

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

B, T, N = 8, 8, 12


@pytest.fixture(scope="module")
def toy():
    cfg = toy_config(mesh=MeshConfig(fsdp=-1), batch=B, epochs=2, minibatches=2, kl_coef=0.1)
    return toy_setup(cfg, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def toy_tau07():
    """The same toy at ppo.temperature 0.7: the sampler and every recomputed log-prob divide the logits by it."""
    cfg = toy_config(mesh=MeshConfig(fsdp=-1), batch=B, epochs=2, minibatches=2, kl_coef=0.1, temperature=0.7)
    return toy_setup(cfg, devices=jax.devices()[:1])


def teacher_forced(seed=1, garbage_after_end=False):
    """Fixed responses with stops at various places (and one row without any), as a SampleOutput."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (B, N))
    tokens[:, 0] = np.where(rng.random(B) < 0.3, REWARDED, tokens[:, 0])
    stops = [2, 5, 0, 11, -1, 7, 3, 9]  # -1: never stops
    for i, s in enumerate(stops):
        if s >= 0:
            tokens[i, s] = EOS
    out = sample_from_tokens(jnp.asarray(tokens, jnp.int32), (EOS,), PAD)
    if garbage_after_end:  # what a buggy sampler might leave after the stop: must change nothing
        after = np.arange(N)[None] >= np.asarray(out.lengths)[:, None]
        out = SampleOutput(tokens=jnp.where(after, jnp.asarray(tokens) * 0 + REWARDED, out.tokens),
                           logprobs=jnp.where(after, -3.0, out.logprobs), lengths=out.lengths, done=out.done)
    return out


@pytest.mark.parametrize("toy_at", ["toy", "toy_tau07"])  # tau = 1 and tau = 0.7
def test_sampler_logprobs_equal_recomputed_and_kl_is_zero_at_the_reference(toy_at, request):
    setup, state, ref = request.getfixturevalue(toy_at)
    assert setup.sampling.temperature == setup.cfg.ppo.temperature == {"toy": 1.0, "toy_tau07": 0.7}[toy_at]
    prompt = random_prompts(B)
    sample = setup.steps.sample(state.policy.params, prompt, jax.random.PRNGKey(3))
    exp, stats = setup.steps.experience(state.policy.params, ref, state.value.params, {}, prompt, sample,
                                        np.float32(0.1))
    assert stats["logprob_mismatch"] < 1e-5  # KV-cache decoding vs one full forward pass, same tau
    # Both against numpy: log_softmax(logits / tau) of a plain forward pass, at the positions predicting each token.
    tau, mask = setup.cfg.ppo.temperature, np.asarray(exp.mask) > 0
    logits = np.asarray(setup.policy_model.apply({"params": state.policy.params}, exp.inputs).logits, np.float64)
    logits = logits[:, T - 1:-1] / tau  # [B, N, V]
    logits -= logits.max(-1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.take_along_axis(log_softmax, np.asarray(sample.tokens)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(exp.logprobs)[mask], want[mask], atol=2e-5)
    np.testing.assert_allclose(np.asarray(sample.logprobs)[mask], want[mask], atol=2e-5)
    assert stats["kl"] == 0.0 and stats["negative_kl_sequences"] == 0
    np.testing.assert_array_equal(exp.ref_logprobs, exp.logprobs)
    # with KL 0 the only reward is each row's score, at its end
    t_end = np.asarray(exp.lengths) - 1
    want = np.zeros((B, N), np.float32)
    want[np.arange(B), t_end] = np.asarray(exp.scores)
    np.testing.assert_array_equal(exp.rewards, want)
    count = np.sum((np.asarray(sample.tokens) == REWARDED) * np.asarray(exp.mask), axis=1)
    np.testing.assert_array_equal(exp.scores, count)  # missing_eos = "none" in the toy config


def test_values_are_read_at_the_positions_that_predict_each_token(toy):
    setup, state, ref = toy
    prompt, sample = random_prompts(B), teacher_forced()
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, {}, prompt, sample, np.float32(0.1))
    # value of response token i = the value model's head at index T - 1 + i (the position predicting it)
    for i in (0, 4):
        direct = setup.value_model.apply({"params": state.value.params}, exp.inputs, jnp.full((B,), T - 1 + i))
        np.testing.assert_allclose(np.asarray(exp.values)[:, i], np.asarray(direct) * np.asarray(exp.mask)[:, i],
                                   atol=1e-6)
    assert np.all(np.asarray(exp.values)[np.asarray(exp.mask) == 0] == 0)  # V after the end is 0
    np.testing.assert_array_equal(value_index(T, 3), [[T - 1, T, T + 1]])


def test_nothing_after_the_end_contributes_to_experience_losses_or_update(toy):
    setup, state, ref = toy
    prompt = random_prompts(B)
    clean, dirty = teacher_forced(), teacher_forced(garbage_after_end=True)
    assert not np.array_equal(clean.tokens, dirty.tokens)
    exp_c, stats_c = setup.steps.experience(state.policy.params, ref, state.value.params, {}, prompt, clean,
                                            np.float32(0.1))
    exp_d, stats_d = setup.steps.experience(state.policy.params, ref, state.value.params, {}, prompt, dirty,
                                            np.float32(0.1))
    for k in stats_c:
        np.testing.assert_allclose(stats_d[k], stats_c[k], rtol=1e-6, atol=1e-7, err_msg=k)
    for field in ("mask", "logprobs", "ref_logprobs", "values", "scores", "rewards", "advantages", "returns"):
        a, b = np.asarray(getattr(exp_c, field)), np.asarray(getattr(exp_d, field))
        if a.ndim == 2:
            a, b = a * np.asarray(exp_c.mask), b * np.asarray(exp_c.mask)
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=field)

    # Now corrupt everything after each row's end inside the experience itself: the update must not see it.
    after = np.asarray(exp_c.mask) == 0
    noisy = exp_c.replace(
        response=jnp.where(after, REWARDED, exp_c.response),
        logprobs=jnp.where(after, 5.0, exp_c.logprobs), values=jnp.where(after, 100.0, exp_c.values),
        advantages=jnp.where(after, 1e3, exp_c.advantages), returns=jnp.where(after, -1e3, exp_c.returns))
    copy = lambda s: jax.tree.map(jnp.copy, s)  # the update donates its state
    new_c, upd_c = setup.steps.update(copy(state), exp_c, jax.random.PRNGKey(5))
    new_n, upd_n = setup.steps.update(copy(state), noisy, jax.random.PRNGKey(5))
    for k in upd_c:
        np.testing.assert_allclose(upd_n[k], upd_c[k], rtol=1e-5, atol=1e-7, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 (new_c.policy.params, new_c.value.params), (new_n.policy.params, new_n.value.params))


def test_first_minibatch_of_first_epoch_has_ratio_one_and_zero_approx_kl(toy):
    setup, state, ref = toy
    prompt = random_prompts(B)
    sample = setup.steps.sample(state.policy.params, prompt, jax.random.PRNGKey(4))
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, {}, prompt, sample, np.float32(0.1))
    new, stats = setup.steps.update(jax.tree.map(jnp.copy, state), exp, jax.random.PRNGKey(6))
    stats = jax.device_get(stats)
    assert stats["approx_kl"].shape == (4,)  # epochs 2 x minibatches 2
    assert abs(stats["ratio_mean"][0] - 1.0) < 1e-6 and abs(stats["max_ratio"][0] - 1.0) < 1e-6
    assert stats["approx_kl"][0] < 1e-12 and stats["clipfrac"][0] == 0.0
    assert stats["approx_kl"][-1] > 0  # later minibatches see the updated policy
    assert int(new.policy.step) == 4 and int(new.value.step) == 4
    # advantages were whitened once over all valid tokens of the rollout
    mask = np.asarray(exp.mask)
    adv = np.asarray(exp.advantages)[mask > 0]
    assert abs(adv.mean()) < 1e-5 and abs(adv.std(ddof=1) - 1) < 1e-3


def test_reference_params_are_bitwise_unchanged_by_ppo_updates(toy):
    """Two PPO iterations (sample, experience, donated update) against the reference run_ppo builds: every
    reference leaf is still alive and bitwise what it was, and equal to the policy's start; the policy moved."""
    setup, state, _ = toy
    ref = reference_params(setup)
    ref_before = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(ref))
    policy_before = jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(state.policy.params))
    jax.tree.map(np.testing.assert_array_equal, ref_before, policy_before)  # the reference is the policy's start
    start = jax.tree.map(jnp.copy, state)  # the update donates its state; the fixture's must survive
    final, history = run_toy(setup, start, ref, iterations=2)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(start.policy.params))  # donation did happen
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(ref))  # ... but never of the reference
    for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(ref_before)[0], jax.tree.leaves(ref)):
        assert np.array_equal(before, np.asarray(after)), jax.tree_util.keystr(path)
        assert np.asarray(after).dtype == before.dtype
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), policy_before,
                                         final.policy.params))
    assert all(moved), "every policy leaf should have changed after 2 x 4 optimizer steps"
