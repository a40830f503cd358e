"""The transformer trunk: shapes, attention against naive references, masks, packing, precision."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.model.attention.masks import attention_mask, reference_attention
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.sharding import unbox

TINY = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_seq_len=64)


def init(cfg, seq_len=8, seed=0):
    model = Transformer(cfg)
    params = unbox(model.init(jax.random.PRNGKey(seed), ModelInput.unpacked(jnp.zeros((1, seq_len), jnp.int32)))["params"])
    return model, params


def test_forward_shapes_and_param_layout():
    model, params = init(TINY)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 0, TINY.vocab_size)
    out = model.apply({"params": params}, ModelInput.unpacked(tokens))
    assert out.logits.shape == (3, 10, 97) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (3, 10, 32)
    layers = params["layers"]
    assert layers["attn"]["q"].shape == (2, 32, 4, 8)  # [L, D, N, H]: blocks stacked by nn.scan
    assert layers["attn"]["k"].shape == (2, 32, 2, 8)
    assert layers["mlp"]["gate"].shape == (2, 32, 64)
    assert "lm_head" in params
    tied = init(dataclasses.replace(TINY, tie_embeddings=True))[1]
    assert "lm_head" not in tied


def naive_attention(q, k, v, mask):
    """Per-(batch, head, query) loops in numpy; kv head of query head n is n // (N/K)."""
    b, t, n, h = q.shape
    kvh = k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for ni in range(n):
            kk, vv = k[bi, :, ni // (n // kvh)], v[bi, :, ni // (n // kvh)]
            for ti in range(t):
                visible = mask[bi, ti]
                if not visible.any():
                    continue
                s = kk[visible] @ q[bi, ti, ni] / np.sqrt(h)
                p = np.exp(s - s.max())
                out[bi, ti, ni] = (p / p.sum()) @ vv[visible]
    return out


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_reference_attention_matches_naive_gqa(kv_heads):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 6, 4, 8)).astype(np.float32)
    k = rng.normal(size=(2, 6, kv_heads, 8)).astype(np.float32)
    v = rng.normal(size=(2, 6, kv_heads, 8)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]], np.int32)
    mask = np.asarray(attention_mask(pos, pos, seg, seg))
    got = np.asarray(reference_attention(q, k, v, mask))
    want = naive_attention(q, k, v, mask)
    valid = seg > 0
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-5)


def test_gqa_with_all_kv_heads_equals_multi_head():
    """num_kv_heads = num_heads is plain multi-head attention; GQA = MHA with k/v repeated per group."""
    rng = np.random.default_rng(1)
    q = rng.normal(size=(1, 5, 4, 8)).astype(np.float32)
    k = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    v = rng.normal(size=(1, 5, 2, 8)).astype(np.float32)
    pos = np.arange(5)[None]
    mask = np.asarray(attention_mask(pos, pos, np.ones_like(pos), np.ones_like(pos)))
    gqa = reference_attention(q, k, v, mask)
    mha = reference_attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), mask)
    np.testing.assert_allclose(gqa, mha, atol=1e-6)
    # And MHA itself equals per-head softmax(q k^T / sqrt(h)) v with a causal mask.
    np.testing.assert_allclose(mha, naive_attention(q, np.repeat(k, 2, 2), np.repeat(v, 2, 2), mask), atol=1e-5)


def test_attention_mask_worked_example():
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    pos = np.array([[0, 1, 2, 0, 1, 0]])
    m = np.asarray(attention_mask(pos, pos, seg, seg))[0]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert not m[5].any()


def test_packed_row_equals_examples_run_alone():
    model, params = init(TINY)
    a = jnp.array([5, 6, 7, 8, 9], jnp.int32)
    b = jnp.array([11, 12, 13], jnp.int32)
    packed = ModelInput(tokens=jnp.concatenate([a, b, jnp.zeros(2, jnp.int32)])[None],
                        positions=jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]]),
                        segment_ids=jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]]))
    logits = model.apply({"params": params}, packed).logits[0]
    alone_a = model.apply({"params": params}, ModelInput.unpacked(a[None])).logits[0]
    alone_b = model.apply({"params": params}, ModelInput.unpacked(b[None])).logits[0]
    np.testing.assert_allclose(logits[:5], alone_a, atol=1e-5)
    np.testing.assert_allclose(logits[5:8], alone_b, atol=1e-5)


def test_left_and_right_padding_give_the_same_logits():
    model, params = init(TINY)
    x = jnp.array([3, 4, 5, 6], jnp.int32)
    right = ModelInput(jnp.array([[3, 4, 5, 6, 0, 0]]), jnp.array([[0, 1, 2, 3, 0, 0]]), jnp.array([[1, 1, 1, 1, 0, 0]]))
    left = ModelInput(jnp.array([[0, 0, 3, 4, 5, 6]]), jnp.array([[0, 0, 0, 1, 2, 3]]), jnp.array([[0, 0, 1, 1, 1, 1]]))
    r = model.apply({"params": params}, right).logits[0, :4]
    l_ = model.apply({"params": params}, left).logits[0, 2:]
    np.testing.assert_allclose(r, l_, atol=1e-5)
    alone = model.apply({"params": params}, ModelInput.unpacked(x[None])).logits[0]
    np.testing.assert_allclose(r, alone, atol=1e-5)


def test_qkv_bias_and_remat_policies_keep_outputs():
    cfg = dataclasses.replace(TINY, qkv_bias=True)
    model, params = init(cfg)
    assert params["layers"]["attn"]["q_bias"].shape == (2, 4, 8)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, 97)

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, ModelInput.unpacked(tokens)).logits ** 2)

    base_loss, base_grads = jax.value_and_grad(loss)(params, model)
    for policy in ("full", "dots", "save_attention_out"):
        remat_model = Transformer(dataclasses.replace(cfg, remat=policy))
        l_, g = jax.value_and_grad(loss)(params, remat_model)
        np.testing.assert_allclose(l_, base_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g, base_grads)


def test_bf16_compute_stays_close_to_f32():
    """Params f32, compute bf16: the loss on the tiny model moves by < 2% (logits/softmax stay f32)."""
    from instruct_jax.train.losses import masked_loss_sum

    model32, params = init(TINY)
    model16 = Transformer(dataclasses.replace(TINY, dtype="bfloat16"))
    tokens = jax.random.randint(jax.random.PRNGKey(3), (4, 16), 0, 97)
    inp = ModelInput.unpacked(tokens)
    targets, mask = jnp.roll(tokens, -1, axis=1), jnp.ones(tokens.shape).at[:, -1].set(0)

    def loss(model):
        out = model.apply({"params": params}, inp)
        s, n = masked_loss_sum(out.logits, targets, mask)
        return s / n, out

    l32, out32 = loss(model32)
    l16, out16 = loss(model16)
    assert out16.logits.dtype == jnp.float32 and out16.hidden.dtype == jnp.bfloat16
    assert abs(float(l16) - float(l32)) / float(l32) < 0.02
