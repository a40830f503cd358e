"""KV-cache decoding and the sampler against full forward passes, naive loops and softmax statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instruct_jax.inference.sampling import (SamplingConfig, filtered_logits, make_sampler, prompt_and_response,
                                             sample_token)
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.kv_cache import KVCache
from instruct_jax.model.transformer import ModelInput, Transformer, init_params_boxed
from instruct_jax.parallel.mesh import MeshConfig, make_mesh
from instruct_jax.parallel.sharding import param_shardings_for, unbox

# CPU cannot donate buffers; jit warns about each donated cache.
pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

# GQA (4 query heads over 2 kv heads); vocab and heads divide a tensor=2 mesh.
TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_seq_len=64)
PAD = 63  # distinct from every stop token used below
PROMPT_LEN, LENGTHS = 6, [6, 3, 1, 4, 2, 5, 6, 3]  # 8 rows, left-padded to 6


def init(cfg, seed=0):
    model = Transformer(cfg)
    params = unbox(model.init(jax.random.PRNGKey(seed), ModelInput.unpacked(jnp.zeros((1, 8), jnp.int32)))["params"])
    return model, params


@pytest.fixture(scope="module")
def tiny():
    return init(TINY)


def left_padded_prompts(lengths=LENGTHS, t=PROMPT_LEN, seed=0) -> ModelInput:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 60, size=(len(lengths), t))
    tokens = np.where(np.arange(t)[None] >= t - np.array(lengths)[:, None], tokens, PAD)
    return ModelInput.left_padded(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths))


_FORWARD, _SAMPLERS = {}, {}


def sampler_for(model, cfg: SamplingConfig):
    """One-device sampler, jitted once per (model, config): tests share compiles (CPU time is scarce)."""
    key = (id(model), cfg)
    if key not in _SAMPLERS:
        _SAMPLERS[key] = (model, make_sampler(model, cfg))
    return _SAMPLERS[key][1]


def forward_logits(model, params, inputs: ModelInput):
    """Full forward pass logits [B, T, V], jitted once per model."""
    if id(model) not in _FORWARD:
        _FORWARD[id(model)] = (model, jax.jit(lambda p, x: model.apply({"params": p}, x).logits))
    return _FORWARD[id(model)][1](params, inputs)


# ----------------------------------------------------------------------------- cache == full forward
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_cached_decoding_equals_full_forward(tiny, kv_heads):
    """Prefill + 4 decode steps over left-padded prompts of lengths 6..1 = one forward over it all
    (grouped-query attention with 2 kv heads, and plain multi-head)."""
    model, params = tiny if kv_heads == TINY.num_kv_heads else init(dataclasses.replace(TINY, num_kv_heads=kv_heads))
    prompt = left_padded_prompts()
    b, t, steps = prompt.tokens.shape[0], PROMPT_LEN, 4
    follow = jax.random.randint(jax.random.PRNGKey(1), (b, steps), 1, 60)
    n = jnp.asarray(LENGTHS)

    sampler = sampler_for(model, SamplingConfig())
    logits, cache = sampler.prefill(params, prompt, sampler.init_cache(b, t + steps))
    got = [logits]
    for j in range(steps):
        logits, cache = sampler.decode_step(params, follow[:, j], n + j, cache, t + j, jnp.ones(b, jnp.int32))
        got.append(logits)

    full = ModelInput(jnp.concatenate([prompt.tokens, follow], 1),
                      jnp.concatenate([prompt.positions, n[:, None] + jnp.arange(steps)], 1),
                      jnp.concatenate([prompt.segment_ids, jnp.ones((b, steps), jnp.int32)], 1))
    want = forward_logits(model, params, full)[:, t - 1:]  # [B, 1 + steps, V]
    np.testing.assert_allclose(np.stack(got, 1), want, atol=2e-5)
    # The cache now describes prompt + continuation: pads are segment 0, positions continue.
    np.testing.assert_array_equal(cache.segment_ids, full.segment_ids)
    np.testing.assert_array_equal(np.where(full.segment_ids > 0, cache.positions, 0), full.positions)


def test_per_row_write_index_fills_each_row_from_its_own_length(tiny):
    """Server-style slots: right-padded prompts; row b's next token overwrites its first pad slot."""
    model, params = tiny
    lengths = jnp.array([5, 2, 3, 1])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 7), 1, 60)
    sampler = sampler_for(model, SamplingConfig())
    prompt = ModelInput.unpacked(jnp.where(jnp.arange(7) < lengths[:, None], tokens, PAD), lengths)
    logits, cache = sampler.prefill(params, prompt, sampler.init_cache(4, 7))
    got = [logits]
    for j in range(2):  # feed the true next tokens at slot = position = length + j
        logits, cache = sampler.decode_step(params, tokens[jnp.arange(4), lengths + j], lengths + j, cache,
                                            lengths + j, jnp.ones(4, jnp.int32))
        got.append(logits)
    want = forward_logits(model, params, ModelInput.unpacked(tokens, lengths + 2))  # [B, 7, V]
    want = jnp.stack([want[jnp.arange(4), lengths - 1 + j] for j in range(3)], 1)
    np.testing.assert_allclose(np.stack(got, 1), want, atol=2e-5)


# ----------------------------------------------------------------------------- greedy
def naive_greedy(model, params, prompt: ModelInput, max_new: int):
    """Greedy by repeated full forward passes over a growing left-padded buffer (a reference)."""
    b, t = prompt.tokens.shape
    n = jnp.sum(prompt.segment_ids, 1)
    tokens = jnp.concatenate([prompt.tokens, jnp.full((b, max_new), PAD, jnp.int32)], 1)
    positions = jnp.concatenate([prompt.positions, n[:, None] + jnp.arange(max_new)], 1)
    out = []
    for i in range(max_new):
        segments = jnp.concatenate([prompt.segment_ids, jnp.broadcast_to(jnp.arange(max_new) < i, (b, max_new))], 1)
        logits = forward_logits(model, params, ModelInput(tokens, positions, segments.astype(jnp.int32)))
        tok = jnp.argmax(logits[:, t - 1 + i], -1)
        tokens = tokens.at[:, t + i].set(tok)
        out.append(tok)
    return np.stack(out, 1)


GREEDY = SamplingConfig(max_new_tokens=6, temperature=0.0, pad_id=PAD)
SAMPLED = SamplingConfig(max_new_tokens=8, temperature=0.7, stop_tokens=(5, 6, 7, 8, 9), pad_id=PAD)


def test_greedy_equals_top_k_1_and_naive_full_forward_loop(tiny):
    model, params = tiny
    prompt = left_padded_prompts()
    greedy = sampler_for(model, GREEDY)
    top1 = sampler_for(model, dataclasses.replace(GREEDY, temperature=1.0, top_k=1))
    g = greedy.sample(params, prompt, jax.random.PRNGKey(0))
    k1 = top1.sample(params, prompt, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(g.tokens, k1.tokens)
    np.testing.assert_array_equal(g.tokens, naive_greedy(model, params, prompt, 6))
    np.testing.assert_array_equal(g.logprobs, 0.0)  # greedy: a point mass
    np.testing.assert_allclose(k1.logprobs, 0.0, atol=1e-6)  # top-1: the one kept token has probability 1
    assert not g.done.any() and (g.lengths == 6).all()


# ----------------------------------------------------------------------------- log-probs and stops
def test_logprobs_equal_log_softmax_of_full_forward(tiny):
    """PPO's contract: sampler log-probs = log_softmax(logits / tau) at the positions that predict each token."""
    model, params = tiny
    tau = SAMPLED.temperature
    assert SAMPLED.is_exact
    prompt = left_padded_prompts()
    out = sampler_for(model, SAMPLED).sample(params, prompt, jax.random.PRNGKey(3))
    assert out.done.any() and (out.lengths > 1).any()  # some rows stopped, not all at once
    logits = forward_logits(model, params, prompt_and_response(prompt, out))[:, PROMPT_LEN - 1:-1]  # [B, N, V]
    want = jnp.take_along_axis(jax.nn.log_softmax(logits / tau, -1), out.tokens[..., None], -1)[..., 0]
    real = np.arange(8)[None] < np.asarray(out.lengths)[:, None]
    np.testing.assert_allclose(np.where(real, out.logprobs, 0.0), np.where(real, want, 0.0), atol=2e-5)
    np.testing.assert_array_equal(np.where(real, 0.0, out.logprobs), 0.0)


def test_stop_tokens_end_each_row_and_pad_after(tiny):
    """Sample once without stops, pick stop tokens from what came out, rerun with the same seed:
    the rng of step n is fold_in(rng, n), so rows agree up to their stop token."""
    model, params = tiny
    prompt, rng, n = left_padded_prompts(), jax.random.PRNGKey(11), 8
    base = SamplingConfig(max_new_tokens=n, temperature=1.0, pad_id=PAD)
    free = np.asarray(sampler_for(model, base).sample(params, prompt, rng).tokens)  # [B, N]
    # Stop on row 0's third token and row 1's first one; rows that never emit either run to N.
    stop = tuple(sorted({int(free[0, 2]), int(free[1, 0])} - {PAD}))
    hit = np.isin(free, stop)
    assert hit.any(axis=1).any() and not hit.any(axis=1).all()  # some rows stop, some run to N

    out = sampler_for(model, dataclasses.replace(base, stop_tokens=stop)).sample(params, prompt, rng)
    first = np.where(hit.any(1), hit.argmax(1) + 1, n)  # tokens up to and including the stop
    np.testing.assert_array_equal(out.lengths, first)
    np.testing.assert_array_equal(out.done, hit.any(1))
    keep = np.arange(n)[None] < first[:, None]
    np.testing.assert_array_equal(out.tokens, np.where(keep, free, PAD))
    np.testing.assert_array_equal(np.where(keep, 0.0, out.logprobs), 0.0)


# ----------------------------------------------------------------------------- distributions
def test_temperature_samples_follow_softmax_of_scaled_logits(tiny):
    """8192 one-step samples: chi-square of token counts against softmax(logits / tau)."""
    model, params = tiny
    # A 60x sharper output head turns the near-uniform logits at init into a peaked distribution.
    params = {**params, "lm_head": params["lm_head"] * 60.0}
    tau, rows, prompt = 1.7, 8192, [3, 1, 4, 1]
    out = make_sampler(model, SamplingConfig(max_new_tokens=1, temperature=tau)).sample(
        params, ModelInput.left_padded(jnp.tile(jnp.array([prompt]), (rows, 1)), jnp.full(rows, 4)),
        jax.random.PRNGKey(5))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=TINY.vocab_size)
    # Reference logits from a full forward pass of the same prompt (left-padded to the shape other tests compiled).
    padded = ModelInput.left_padded(jnp.tile(jnp.array([[PAD, PAD] + prompt]), (8, 1)), jnp.full(8, 4))
    logits = np.asarray(forward_logits(model, params, padded)[0, -1], np.float64)

    def chi_square(t):
        p = np.exp(logits / t - np.max(logits / t))
        expected = rows * p / p.sum()
        rare = expected < 5  # pool rare tokens into one bin, as the chi-square approximation needs
        obs = np.append(counts[~rare], counts[rare].sum())
        exp = np.append(expected[~rare], expected[rare].sum())
        return np.sum((obs - exp) ** 2 / exp), len(obs) - 1

    stat, dof = chi_square(tau)
    # Chi-square 0.999 quantile by the Wilson-Hilferty approximation (z = 3.09): about 45.4 for 20 dof.
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3
    assert stat < critical, (stat, dof, critical)
    assert chi_square(1.0)[0] > 10 * chi_square(tau)[0]  # the test can tell tau apart from tau = 1
    want = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / tau)[out.tokens[:, 0]]
    np.testing.assert_allclose(out.logprobs[:, 0], want, atol=1e-4)


def test_top_k_and_top_p_keep_the_right_sets():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda cfg: np.isfinite(np.asarray(filtered_logits(logits, cfg)))[0].tolist()  # noqa: E731
    assert kept(SamplingConfig(top_k=2)) == [True, True, False, False]
    assert kept(SamplingConfig(top_p=0.5)) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(SamplingConfig(top_p=0.6)) == [True, True, False, False]
    assert kept(SamplingConfig(top_p=0.96)) == [True, True, True, True]
    # Samples stay in the set, and log-probs are those of the renormalised truncated distribution.
    cfg = SamplingConfig(top_p=0.6)
    tok, lp = sample_token(jnp.tile(logits, (1000, 1)), jax.random.PRNGKey(0), cfg)
    assert set(np.asarray(tok).tolist()) == {0, 1}
    np.testing.assert_allclose(lp, np.log(np.where(tok == 0, 0.5, 0.3) / 0.8), atol=1e-6)


def test_config_validation_and_ppo_guard():
    SamplingConfig(temperature=1.0).require_exact()
    for bad in (SamplingConfig(top_k=5), SamplingConfig(top_p=0.9), SamplingConfig(temperature=0.0)):
        with pytest.raises(ValueError, match="PPO rollouts need samples from exactly"):
            bad.require_exact()
    with pytest.raises(ValueError, match="pad_id 2 is also a stop token"):
        SamplingConfig(stop_tokens=(1, 2), pad_id=2)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


# ----------------------------------------------------------------------------- meshes
MESH_SAMPLING = [GREEDY, SAMPLED]  # greedy, and temperature sampling with stop tokens


@pytest.fixture(scope="module")
def single_device_samples(tiny):
    model, params = tiny
    return [jax.device_get(sampler_for(model, c).sample(params, left_padded_prompts(), jax.random.PRNGKey(4)))
            for c in MESH_SAMPLING]


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(data=2, fsdp=4), MeshConfig(fsdp=4, tensor=2)])
def test_sharded_sampler_equals_single_device(tiny, single_device_samples, mesh_cfg):
    """Greedy and sampled (same seed) tokens on an 8-device mesh equal one device's, exactly."""
    model, params = tiny
    mesh = make_mesh(mesh_cfg, jax.devices())
    rules = mesh_cfg.logical_rules()
    _, p_shardings = param_shardings_for(lambda r: init_params_boxed(model, r), mesh, rules)
    sharded_params = jax.device_put(params, p_shardings)
    for c, want in zip(MESH_SAMPLING, single_device_samples):
        sampler = make_sampler(model, c, mesh, rules, p_shardings)
        got = sampler.sample(sharded_params, left_padded_prompts(), jax.random.PRNGKey(4))
        np.testing.assert_array_equal(got.tokens, want.tokens)
        np.testing.assert_array_equal(got.lengths, want.lengths)
        np.testing.assert_array_equal(got.done, want.done)
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
        assert got.tokens.sharding.spec == P(("data", "fsdp"), None)
    # The cache lives in the mesh: rows over the batch axes, kv heads over "tensor".
    cache = sampler.init_cache(8, 12)
    assert isinstance(cache, KVCache) and cache.k.shape == (2, 8, 12, 2, 8)  # [L, B, S, K, H]
    assert cache.k.addressable_shards[0].data.shape == (2, 8 // (mesh_cfg.data * mesh_cfg.fsdp), 12,
                                                        2 // mesh_cfg.tensor, 8)
