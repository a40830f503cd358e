"""Critic-free online RL (ppo.algorithm = rloo | grpo): group baselines and loss aggregation against loops over
plain Python numbers, the experience's advantages against a hand computation from its own scores and log-probs,
the update with no value model on 8 devices equal to 1 device, learning on the toy reward, and bad settings named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.errors import ConfigError
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.rl.advantages import aggregate, group_advantages
from instruct_jax.rl.ppo.losses import kl_loss, policy_loss
from instruct_jax.rl.ppo.step import value_params_of
from instruct_jax.rl.ppo.trainer import validate_ppo
from instruct_jax.rl.rollout import sample_from_tokens
from ppo_toy import EOS, PAD, REWARDED, random_prompts, run_toy, toy_config, toy_setup

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


# ----------------------------------------------------------------------------- pure numerics
def naive_group(rewards, k, algorithm, std_normalize=True, eps=1e-4):
    out = []
    for g in range(len(rewards) // k):
        group = [float(r) for r in rewards[g * k:(g + 1) * k]]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            if algorithm == "rloo":
                out.append(r - sum(others) / len(others))
            else:
                mean = sum(group) / k
                std = (sum((x - mean) ** 2 for x in group) / (k - 1)) ** 0.5
                out.append((r - mean) / (std + eps) if std_normalize else r - mean)
    return np.array(out)


def test_group_baselines_on_a_worked_example_and_against_a_loop():
    r = jnp.array([1.0, 2.0, 6.0])
    np.testing.assert_allclose(group_advantages(r, 3, "rloo"), [-3.0, -1.5, 4.5], rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 3, "grpo", std_normalize=False), [-2.0, -1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(group_advantages(r, 3, "grpo"), np.array([-2.0, -1.0, 3.0]) / (7 ** 0.5 + 1e-4),
                               rtol=1e-6)
    rewards = np.random.default_rng(0).normal(size=24).astype(np.float32)
    for k in (2, 4, 6):
        for algorithm, norm in (("rloo", True), ("grpo", True), ("grpo", False)):
            np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), k, algorithm, norm),
                                       naive_group(rewards, k, algorithm, norm), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{algorithm} k={k} norm={norm}")
    # a group of equal rewards teaches nothing: every advantage is 0, whatever the form
    flat = jnp.array([0.3, 0.3, 0.3, 0.3, 1.0, 2.0, 3.0, 4.0])
    for algorithm in ("rloo", "grpo"):
        assert np.all(np.asarray(group_advantages(flat, 4, algorithm))[:4] == 0.0)
    with pytest.raises(ValueError, match=">= 2"):
        group_advantages(r, 1, "rloo")


def test_loss_aggregations_against_a_loop():
    x = jnp.array([[1.0, 1.0], [4.0, 0.0]])
    m = jnp.array([[1.0, 1.0], [1.0, 0.0]])
    assert float(aggregate(x, m, "token")) == pytest.approx(2.0)
    assert float(aggregate(x, m, "sequence")) == pytest.approx(2.5)
    assert float(aggregate(x, m, "constant")) == pytest.approx(1.5)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7))
    lengths = [7, 1, 3, 0, 5]
    m = (np.arange(7)[None] < np.array(lengths)[:, None]).astype(np.float64)
    tokens = [x[b, t] for b in range(5) for t in range(lengths[b])]
    per_row = [sum(x[b, :lengths[b]]) / lengths[b] for b in range(5) if lengths[b]] + [0.0]  # the empty row: 0
    want = {"token": sum(tokens) / len(tokens), "sequence": sum(per_row) / 5, "constant": sum(tokens) / 35}
    for mode, value in want.items():
        assert float(aggregate(jnp.asarray(x), jnp.asarray(m), mode)) == pytest.approx(value, rel=1e-6), mode
    # a longer answer with the same per-token loss weighs more under token / constant, not under sequence
    loss, _ = policy_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.array([[1.0] * 4, [-1.0] * 4]),
                          jnp.array([[1.0, 1, 1, 1], [1, 0, 0, 0]]), 0.2, "sequence")
    assert float(loss) == pytest.approx(0.0)
    loss, _ = policy_loss(jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.array([[1.0] * 4, [-1.0] * 4]),
                          jnp.array([[1.0, 1, 1, 1], [1, 0, 0, 0]]), 0.2, "token")
    assert float(loss) == pytest.approx(-3 / 5)


def test_kl_loss_is_the_k3_estimator_and_zero_at_the_reference():
    logp, ref = jnp.array([[-1.0, -0.5]]), jnp.array([[-2.0, -0.5]])
    mask = jnp.array([[1.0, 1.0]])
    assert float(kl_loss(logp, ref, mask)) == pytest.approx((np.exp(-1.0) - 1 + 1) / 2, rel=1e-6)
    assert float(kl_loss(ref, ref, mask)) == 0.0


# ----------------------------------------------------------------------------- experience and update
B, N, K = 16, 12, 4


def fixed_rollout(seed=11):
    """Teacher-forced responses: a few with the rewarded token, stops at various places, one row without."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 64, (B, N))
    tokens[rng.random((B, N)) < 0.15] = REWARDED
    for i in range(B):
        s = int(rng.integers(-1, N))
        if s >= 0:
            tokens[i, s] = EOS
    out = sample_from_tokens(jnp.asarray(tokens, jnp.int32), (EOS,), PAD)
    return out.replace(logprobs=jnp.asarray(rng.normal(-4, 0.5, (B, N)), jnp.float32) * (
        jnp.arange(N)[None] < out.lengths[:, None]))


def group_prompts(setup, seed=3):
    p = random_prompts(B // K, seed=seed)
    batch = setup.steps.expand(dict(tokens=p.tokens, positions=p.positions, segment_ids=p.segment_ids))
    return type(p)(**batch)


def one_iteration(mesh_cfg, devices, **ppo):
    cfg = toy_config(mesh=mesh_cfg, batch=B, group_size=K, epochs=2, minibatches=2, **ppo)
    setup, state, ref = toy_setup(cfg, devices=devices)
    assert state.value == {} and value_params_of(state) == {}  # no value model at all
    ref = jax.tree.map(lambda x: x * 1.05, ref)  # a reference apart from the policy: KL terms are not 0
    prompt = group_prompts(setup)
    exp, stats = setup.steps.experience(state.policy.params, ref, {}, {}, prompt, fixed_rollout(), np.float32(0.1))
    new, upd = setup.steps.update(state, exp, jax.random.PRNGKey(9))
    return jax.device_get((prompt, exp, stats, new, upd))


@pytest.mark.parametrize("ppo", [dict(algorithm="rloo", kl_coef=0.1),
                                 dict(algorithm="grpo", kl_coef=0.1, kl_in="loss", loss_aggregation="sequence")])
def test_experience_advantages_are_the_group_baselines_of_the_sequence_rewards(ppo):
    prompt, exp, stats, _, upd = one_iteration(MeshConfig(fsdp=-1), jax.devices()[:1], **ppo)
    tokens = np.asarray(prompt.tokens)
    assert all((tokens[g * K:(g + 1) * K] == tokens[g * K]).all() for g in range(B // K))  # k copies of a prompt
    mask, lengths = np.asarray(exp.mask), np.asarray(exp.lengths)
    # the toy reward: the rewarded token's count up to the stop (missing_eos none)
    counts = [(np.asarray(exp.response)[b, :lengths[b]] == REWARDED).sum() for b in range(B)]
    np.testing.assert_allclose(exp.scores, counts)
    kl = [float(np.sum((np.asarray(exp.logprobs) - np.asarray(exp.ref_logprobs))[b, :lengths[b]])) for b in range(B)]
    assert max(abs(x) for x in kl) > 1e-3
    seq = [c - (0.1 * k if ppo.get("kl_in", "reward") == "reward" else 0.0) for c, k in zip(counts, kl)]
    want = naive_group(seq, K, ppo["algorithm"])
    for b in range(B):  # the response's advantage on each of its tokens, 0 after its end
        np.testing.assert_allclose(np.asarray(exp.advantages)[b], want[b] * mask[b], rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(exp.values) == 0) and np.all(np.asarray(exp.returns) == 0)
    assert "value_loss" not in upd and "explained_variance" not in stats
    assert ("kl_loss" in upd) == (ppo.get("kl_in") == "loss")


@pytest.mark.parametrize("ppo", [dict(algorithm="rloo", kl_coef=0.1, entropy_coef=0.01, ema_decay=0.5),
                                 dict(algorithm="grpo", kl_coef=0.1, kl_in="loss", loss_aggregation="constant",
                                      group_std_normalize=False)])
def test_critic_free_update_on_8_devices_equals_1_device(ppo):
    assert jax.device_count() == 8
    one = one_iteration(MeshConfig(fsdp=-1), jax.devices()[:1], **ppo)
    eight = one_iteration(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices(), **ppo)
    (_, exp1, stats1, new1, upd1), (_, exp8, stats8, new8, upd8) = one, eight
    for k in stats1:
        np.testing.assert_allclose(stats8[k], stats1[k], rtol=2e-5, atol=2e-6, err_msg=k)
    for field in ("logprobs", "ref_logprobs", "rewards", "advantages", "scores"):
        np.testing.assert_allclose(getattr(exp8, field), getattr(exp1, field), rtol=2e-5, atol=2e-5, err_msg=field)
    for k in upd1:
        np.testing.assert_allclose(upd8[k], upd1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # the tolerance of tests/test_ppo_mesh.py (a tenth of one Adam step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), (new8.policy, new8.ema),
                 (new1.policy, new1.ema))
    assert new8.value == {} and int(new8.policy.step) == 4


@pytest.mark.parametrize("ppo", [dict(algorithm="rloo"),
                                 dict(algorithm="grpo", kl_in="loss", loss_aggregation="sequence")])
def test_critic_free_raises_the_toy_reward(ppo):
    """32 rows = 8 prompts x 4 samples on the 8-device mesh: the rewarded token's count rises by a large margin."""
    cfg = toy_config(steps=30, batch=32, group_size=4, **ppo)
    setup, state, ref = toy_setup(cfg)
    state, history = run_toy(setup, state, ref, iterations=30)
    scores = np.array([h["score"] for h in history])
    start, end = scores[:3].mean(), scores[-3:].mean()
    print(f"{ppo['algorithm']}: toy score {start:.3f} -> {end:.3f}; kl {history[-1]['kl']:.3f}")
    assert end > start + 2.0 and end > 4 * start  # a random policy emits the token ~12/64 = 0.19 times
    assert all(abs(h["approx_kl_first"]) < 1e-10 for h in history)  # ratio 1 on every first minibatch
    assert max(h["logprob_mismatch"] for h in history) < 1e-4
    assert state.value == {}


@pytest.mark.parametrize("override,field", [
    (dict(algorithm="reinforce"), "ppo.algorithm"),
    (dict(algorithm="rloo", group_size=1), "ppo.group_size"),
    (dict(algorithm="rloo", group_size=3), "ppo.group_size"),  # 3 does not divide 16 rows
    (dict(algorithm="grpo", group_size=4), "ppo.group_size"),  # 4 prompts cannot split over 8 batch shards
    (dict(algorithm="rloo", group_size=2, value_learning_rate=1e-3), "ppo.value_learning_rate"),
    (dict(algorithm="grpo", group_size=2, whiten_rewards=True), "ppo.whiten_rewards"),
    (dict(algorithm="ppo", group_std_normalize=False), "ppo.group_std_normalize"),
    (dict(kl_in="loss", adaptive_kl=True), "ppo.adaptive_kl"),
    (dict(kl_in="advantage"), "ppo.kl_in"),
    (dict(loss_aggregation="mean"), "ppo.loss_aggregation"),
])
def test_bad_algorithm_settings_name_their_field(override, field):
    cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1))
    cfg.ppo = dataclasses.replace(cfg.ppo, **override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_ppo(cfg, num_devices=8)


@pytest.mark.parametrize("override,field", [
    (dict(reward="dpo", reward_model=""), "ppo.reward_model"),
    (dict(reward="count", implicit_reference="/runs/sft"), "ppo.implicit_reference"),
])
def test_bad_implicit_reward_settings_name_their_field(override, field):
    cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1))
    cfg.ppo = dataclasses.replace(cfg.ppo, **override)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_ppo(cfg, num_devices=8)


def test_implicit_reward_is_dpos_own_log_ratio_of_the_answer():
    """ppo.reward=dpo scores a rollout (left-padded prompt, response, end-of-turn appended when cut) with
    beta * (log pi - log pi_ref) summed over the answer and its end-of-turn: equal to DPO's `sequence_logprobs` on
    the same texts laid out as the DPO phase reads them (right-padded, one row per response, answer mask)."""
    from instruct_jax.model.config import ModelConfig
    from instruct_jax.model.transformer import ModelInput, Transformer
    from instruct_jax.rl.rewards import implicit_reward, scoring_input
    from instruct_jax.train.dpo.losses import sequence_logprobs

    cfg = ModelConfig(vocab_size=48, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                      max_seq_len=32, dtype="float32")
    model = Transformer(cfg)
    policy = model.init(jax.random.PRNGKey(1), ModelInput.left_padded(jnp.ones((1, 4), jnp.int32), [4]))["params"]
    reference = model.init(jax.random.PRNGKey(2), ModelInput.left_padded(jnp.ones((1, 4), jnp.int32), [4]))["params"]
    eot, beta = 2, 0.7
    prompt_rows = [[5, 6, 7], [9, 10, 11, 12, 13], [20, 21]]
    responses = np.array([[30, 31, eot, 0, 0], [33, 34, 35, 36, 37], [eot, 0, 0, 0, 0]], np.int32)
    lengths, done = np.array([3, 5, 1]), np.array([True, False, True])
    t = 6
    tokens = np.zeros((3, t), np.int32)
    for i, row in enumerate(prompt_rows):
        tokens[i, t - len(row):] = row
    prompt = ModelInput.left_padded(jnp.asarray(tokens), jnp.asarray([len(r) for r in prompt_rows]))
    inputs, index = scoring_input(prompt, jnp.asarray(responses), jnp.asarray(lengths), jnp.asarray(done), eot)
    got = implicit_reward(cfg, beta)({"policy": policy, "reference": reference}, inputs, index,
                                     jnp.asarray(responses), jnp.ones_like(jnp.asarray(responses)))
    # DPO's layout: prompt + answer (+ end-of-turn when the rollout was cut), right-padded; the answer's mask
    # marks the positions whose *next* token is an answer token
    length = 12
    batch = {k: np.zeros((3, 1, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    batch["loss_mask"] = np.zeros((3, 1, length), np.float32)
    for i, row in enumerate(prompt_rows):
        answer = list(responses[i, :lengths[i]]) + ([] if done[i] else [eot])
        seq = row + answer
        batch["tokens"][i, 0, :len(seq)] = seq
        batch["targets"][i, 0, :len(seq) - 1] = seq[1:]
        batch["positions"][i, 0, :len(seq)] = np.arange(len(seq))
        batch["segment_ids"][i, 0, :len(seq)] = 1
        batch["loss_mask"][i, 0, len(row) - 1:len(seq) - 1] = 1.0
    batch = jax.tree.map(jnp.asarray, batch)
    want = beta * (sequence_logprobs(model, policy, batch) - sequence_logprobs(model, reference, batch))[:, 0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert np.all(np.abs(np.asarray(want)) > 1e-3)  # the two models differ: not a trivially zero reward


def test_plan_counts_no_value_model_flops_for_the_critic_free_algorithms():
    """`plan`'s FLOPs for rloo / grpo: the policy's update alone, and one scalar-head forward (the reward model's)
    where PPO has two (value and reward)."""
    from instruct_jax.metrics import model_flops_per_token
    from instruct_jax.plan import ppo_flops, train_flops
    from instruct_jax.rl.ppo.trainer import prompt_len

    cfg = toy_config(mesh=MeshConfig(data=2, fsdp=-1))
    ppo = ppo_flops(cfg, 8)
    for algorithm in ("rloo", "grpo"):
        c = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, algorithm=algorithm, group_size=2))
        flops = ppo_flops(c, 8)
        seq, b = prompt_len(c) + c.ppo.response_len + 1, c.train.global_batch_size
        policy_only = train_flops(c.model, seq, c.ppo.epochs * b * seq, 8)
        assert flops["update"] == pytest.approx(tuple(policy_only)) and flops["update"][0] < ppo["update"][0]
        scalar_forward = model_flops_per_token(c.model, seq, output_size=1) / 3 * b * seq / 8
        assert ppo["experience"][0] - flops["experience"][0] == pytest.approx(scalar_forward)
        assert flops["sample"] == ppo["sample"]
