"""The performance paths compute exactly what the plain paths compute.

* fused, chunked cross-entropy (train/losses.py) == cross-entropy of the full logits, value and gradient;
* PPO's log-probs and entropies from logits at the response positions only == from the full logits;
* decoding with the sampler's layout (weights split per layer and cast once, the cache per layer)
  gives bit-identical logits and cache.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.inference.logprobs import logprobs_and_entropy, policy_outputs, response_slice
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.kv_cache import KVCache
from instruct_jax.model.transformer import (ModelInput, Transformer, compute_dtype_weights, output_kernel,
                                          split_layers)
from instruct_jax.model.transformer import init_params_boxed
from instruct_jax.parallel.sharding import unbox
from instruct_jax.train.losses import fused_masked_loss_sum, masked_loss_sum

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                  max_seq_len=64)


def _params(cfg):
    return unbox(init_params_boxed(Transformer(cfg), jax.random.PRNGKey(0)))


@pytest.mark.parametrize("chunk", [4, 7])  # 7 does not divide T = 10: the padded tail must weigh 0
def test_fused_loss_equals_full_logits_loss_in_value_and_gradient(chunk):
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    h = jax.random.normal(k[0], (3, 10, 16))
    w = jax.random.normal(k[1], (50, 16)) * 0.5
    y = jax.random.randint(k[2], (3, 10), 0, 50)
    mask = (jax.random.uniform(k[3], (3, 10)) > 0.3).astype(jnp.float32)

    def full(h, w):
        return masked_loss_sum(jnp.einsum("BTD,VD->BTV", h, w), y, mask)

    def fused(h, w):
        return fused_masked_loss_sum(h, w, y, mask, chunk)

    (s_full, n_full), (s_fused, n_fused) = full(h, w), jax.jit(fused)(h, w)
    np.testing.assert_allclose(s_fused, s_full, rtol=1e-5)
    assert float(n_fused) == float(n_full) == float(mask.sum())
    # a non-unit cotangent (the step divides by the token count) must scale both gradients
    g_full = jax.grad(lambda h, w: 0.3 * full(h, w)[0], (0, 1))(h, w)
    g_fused = jax.jit(jax.grad(lambda h, w: 0.3 * fused(h, w)[0], (0, 1)))(h, w)
    for a, b in zip(g_fused, g_full):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_through_the_model_matches_full_logits_gradients(tie):
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": tie, "num_layers": 1})
    model, params = Transformer(cfg), _params(cfg)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    mask = jnp.asarray(rng.random((2, 12)) > 0.2, jnp.float32)
    inputs = ModelInput.unpacked(tokens)

    def full(p):
        return masked_loss_sum(model.apply({"params": p}, inputs).logits, targets, mask)[0]

    def fused(p):
        hidden = model.apply({"params": p}, inputs, compute_logits=False).hidden
        return fused_masked_loss_sum(hidden, output_kernel(cfg, p), targets, mask, 5)[0]

    np.testing.assert_allclose(jax.jit(fused)(params), jax.jit(full)(params), rtol=1e-5)
    grads = [jax.tree.leaves(jax.jit(jax.grad(f))(params)) for f in (fused, full)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_policy_outputs_at_response_positions_equal_the_full_logits_slice():
    model, params = Transformer(CFG), _params(CFG)
    b, t, n = 3, 6, 5
    rng = np.random.default_rng(2)
    lengths = jnp.asarray([6, 3, 4])
    prompt = ModelInput.left_padded(jnp.asarray(rng.integers(1, CFG.vocab_size, (b, t)), jnp.int32), lengths)
    response = jnp.asarray(rng.integers(1, CFG.vocab_size, (b, n)), jnp.int32)
    inputs = ModelInput(jnp.concatenate([prompt.tokens, response], 1),
                        jnp.concatenate([prompt.positions, lengths[:, None] + jnp.arange(n)[None]], 1),
                        jnp.concatenate([prompt.segment_ids, jnp.ones((b, n), jnp.int32)], 1))
    logp, ent = jax.jit(lambda p: policy_outputs(model, p, inputs, response, t, 0.7))(params)
    full = jax.jit(lambda p: model.apply({"params": p}, inputs).logits)(params)  # [B, T + N, V]
    want_logp, want_ent = logprobs_and_entropy(response_slice(full, t, n), response, 0.7)
    np.testing.assert_allclose(logp, want_logp, atol=1e-5)
    np.testing.assert_allclose(ent, want_ent, atol=1e-5)


def test_split_cast_weights_and_per_layer_cache_decode_bit_identically():
    """The sampler's layout (weights split per layer and cast to bfloat16 once, cache per layer) gives
    exactly the logits and cache of the stacked layout with float32 weights cast at use."""
    cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    model, params = Transformer(cfg), _params(cfg)
    prompt = ModelInput.left_padded(jnp.asarray(np.random.default_rng(3).integers(1, 97, (2, 5)), jnp.int32),
                                    jnp.asarray([5, 3]))
    fast_params = compute_dtype_weights(cfg, split_layers(params))
    assert fast_params["layers"][0]["attn"]["q"].dtype == jnp.bfloat16
    assert fast_params["layers"][0]["attn_norm"]["scale"].dtype == jnp.float32  # norms keep float32 scales

    @jax.jit
    def both(params, fast_params):
        outs = []
        for p, cache in ((params, KVCache.init(cfg, 2, 8)), (fast_params, KVCache.init(cfg, 2, 8, per_layer=True))):
            first = model.apply({"params": p}, prompt, cache=cache, write_index=0)
            step = ModelInput(jnp.asarray([[7], [9]]), jnp.asarray([[5], [3]]), jnp.ones((2, 1), jnp.int32))
            second = model.apply({"params": p}, step, cache=first.cache, write_index=5)
            outs.append((first.logits, second.logits, jnp.stack(second.cache.k)))
        return outs

    slow, fast = both(params, fast_params)
    for a, b in zip(slow, fast):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
