"""Prefix-LM attention (bidirectional image + prompt prefix) against naive references.

The rule (attention/masks.py): query q sees key k iff both are in the same non-zero segment
and (pos_k <= pos_q, or both are prefix tokens). Checked here: the mask on a packed worked
example against a Python loop; the reference, blockwise and ring kernels against a float64
numpy softmax loop (blocks smaller than the sequence, so a prefix reaches "future" blocks
that causal block skipping would drop); the transformer with a prefix, and cached prefill +
decode against its full forward; the vendor kernels' fallback to blockwise.
"""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.model.attention import dispatch
from instruct_jax.model.attention.blockwise import blockwise_attention
from instruct_jax.model.attention.dispatch import dot_product_attention, select_implementation
from instruct_jax.model.attention.masks import attention_mask, reference_attention
from instruct_jax.model.attention.ring import ring_attention
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.kv_cache import KVCache
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import MeshConfig, make_mesh
from instruct_jax.parallel.sharding import unbox


# ----------------------------------------------------------------------------- naive references
def naive_mask(pos, seg, prefix, kv_pos=None, kv_seg=None, kv_prefix=None):
    """[B, T, S] bool by the rule, one (row, query, key) at a time."""
    kv_pos = pos if kv_pos is None else kv_pos
    kv_seg = seg if kv_seg is None else kv_seg
    kv_prefix = prefix if kv_prefix is None else kv_prefix
    b, t = np.shape(pos)
    s = np.shape(kv_pos)[1]
    mask = np.zeros((b, t, s), bool)
    for r in range(b):
        for i in range(t):
            for j in range(s):
                same = seg[r][i] == kv_seg[r][j] != 0
                causal = kv_pos[r][j] <= pos[r][i]
                both_prefix = prefix[r][i] == 1 and kv_prefix[r][j] == 1
                mask[r, i, j] = same and (causal or both_prefix)
    return mask


def naive_attention(q, k, v, mask):
    """Softmax attention in float64, one (row, head, query) at a time; kv head of head n is n // (N / K).
    Rows that see no key are left 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros(q.shape)
    for r in range(b):
        for head in range(n):
            kk, vv = k[r, :, head // group], v[r, :, head // group]
            for i in range(t):
                seen = mask[r, i]
                if seen.any():
                    scores = kk[seen] @ q[r, i, head] / np.sqrt(h)
                    p = np.exp(scores - scores.max())
                    out[r, i, head] = (p / p.sum()) @ vv[seen]
    return out


# ----------------------------------------------------------------------------- worked rows
def packed_rows(t: int = 24):
    """(positions, segment_ids, prefix) [2, t] int32.

    Row 0: example A (9 tokens, prefix 6), example B (11 tokens, prefix 3), 4 pads.
    Row 1: 3 left pads, then one example of t - 3 tokens with a prefix of 14 (it reaches
    several key blocks ahead of its first queries).
    """
    pos, seg, pre = (np.zeros((2, t), np.int32) for _ in range(3))
    for start, length, prefix_len, segment in ((0, 9, 6, 1), (9, 11, 3, 2)):
        pos[0, start:start + length] = np.arange(length)
        seg[0, start:start + length] = segment
        pre[0, start:start + prefix_len] = 1
    pos[1, 3:] = np.arange(t - 3)
    seg[1, 3:] = 1
    pre[1, 3:17] = 1
    return pos, seg, pre


def test_mask_worked_example_matches_loop():
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    pre = np.array([[1, 1, 0, 0, 1, 1, 1, 0]])  # A: prefix of 2, answer of 2; B: all prefix; one pad
    got = np.asarray(attention_mask(pos, pos, seg, seg, pre, pre))
    np.testing.assert_array_equal(got, naive_mask(pos, seg, pre))
    sees = lambda t: np.flatnonzero(got[0, t]).tolist()  # noqa: E731
    assert sees(0) == [0, 1]  # A's first prefix token sees the whole prefix of A
    assert sees(2) == [0, 1, 2]  # A's answer stays causal
    assert sees(3) == [0, 1, 2, 3]
    assert sees(4) == [4, 5, 6]  # B sees only B
    assert sees(7) == []  # padding sees nothing

    pos, seg, pre = packed_rows()
    np.testing.assert_array_equal(np.asarray(attention_mask(pos, pos, seg, seg, pre, pre)), naive_mask(pos, seg, pre))
    # A zero prefix is the causal mask.
    zeros = np.zeros_like(pre)
    np.testing.assert_array_equal(np.asarray(attention_mask(pos, pos, seg, seg, zeros, zeros)),
                                  np.asarray(attention_mask(pos, pos, seg, seg)))
    with pytest.raises(ValueError, match="both"):
        attention_mask(pos, pos, seg, seg, pre, None)


# ----------------------------------------------------------------------------- kernels
def qkv(b, t, s, heads, kv_heads, h=8, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, heads, h)).astype(np.float32)
    k, v = (rng.normal(size=(b, s, kv_heads, h)).astype(np.float32) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_reference_and_blockwise_match_naive(heads, kv_heads):
    pos, seg, pre = packed_rows(24)
    q, k, v = qkv(2, 24, 24, heads, kv_heads)
    mask = naive_mask(pos, seg, pre)
    want = naive_attention(q, k, v, mask)
    visible = mask.any(-1)[:, :, None, None]
    ref = jax.jit(lambda q, k, v: reference_attention(q, k, v, attention_mask(pos, pos, seg, seg, pre, pre)))
    np.testing.assert_allclose(np.asarray(ref(q, k, v)) * visible, want, atol=2e-6)
    # 24 tokens: 6 query blocks of 4, 3 key blocks of 8 (and blocks that do not divide the length).
    for bq, bk in ((4, 8), (5, 7)):
        blk = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, pos, pos, seg, seg, bq, bk, pre, pre))
        np.testing.assert_allclose(np.asarray(blk(q, k, v)) * visible, want, atol=2e-6, err_msg=f"{bq}x{bk}")


def test_blockwise_over_cache_slots_matches_naive():
    """Queries of one call against more key slots than queries (a prefill into a longer cache): the call's
    tokens sit at slots 2..13, with empty (segment 0) slots around them."""
    t, s = 12, 20
    q, k, v = qkv(1, t, s, 4, 2, seed=1)
    pos = np.arange(t, dtype=np.int32)[None]
    seg = np.ones((1, t), np.int32)
    pre = (pos < 7).astype(np.int32)
    kv_pos, kv_seg, kv_pre = (np.zeros((1, s), np.int32) for _ in range(3))
    kv_pos[:, 2:2 + t], kv_seg[:, 2:2 + t], kv_pre[:, 2:2 + t] = pos, seg, pre
    mask = naive_mask(pos, seg, pre, kv_pos, kv_seg, kv_pre)
    got = blockwise_attention(q, k, v, pos, kv_pos, seg, kv_seg, 4, 4, pre, kv_pre)
    np.testing.assert_allclose(np.asarray(got), naive_attention(q, k, v, mask), atol=2e-6)


def test_blockwise_gradients_match_reference_with_prefix():
    """The custom VJP (its own block skipping) against autodiff through the reference kernel."""
    pos, seg, pre = packed_rows(24)
    q, k, v = qkv(2, 24, 24, 4, 2, seed=2)
    visible = naive_mask(pos, seg, pre).any(-1)[:, :, None, None]
    cotangent = np.random.default_rng(3).normal(size=q.shape).astype(np.float32) * visible

    def grads(attend):
        return jax.jit(lambda q, k, v: jax.vjp(attend, q, k, v)[1](cotangent))(q, k, v)

    want = grads(lambda q, k, v: reference_attention(q, k, v, attention_mask(pos, pos, seg, seg, pre, pre)))
    got = grads(lambda q, k, v: blockwise_attention(q, k, v, pos, pos, seg, seg, 4, 8, pre, pre))
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_ring_takes_the_prefix_on_8_devices():
    mesh = MeshConfig(fsdp=1, sequence=8)
    pos, seg, pre = packed_rows(32)  # 4 tokens per device: zigzag halves of 2
    q, k, v = qkv(2, 32, 32, 4, 2, seed=4)
    mask = naive_mask(pos, seg, pre)
    with mesh_and_rules(make_mesh(mesh, jax.devices()), mesh.logical_rules()):
        got = jax.jit(lambda q, k, v: ring_attention(q, k, v, pos, pos, seg, seg, 2, 2,
                                                     q_prefix=pre, kv_prefix=pre))(q, k, v)
    np.testing.assert_allclose(np.asarray(got) * mask.any(-1)[:, :, None, None], naive_attention(q, k, v, mask),
                               atol=2e-6)


# ----------------------------------------------------------------------------- dispatch
def test_vendor_kernels_fall_back_to_blockwise_with_a_prefix(caplog):
    pick = lambda requested, **kw: select_implementation(  # noqa: E731
        requested, **{"q_len": 8192, "self_attention": True, "backend": "tpu", "sequence_shards": 1,
                      "dtype": jnp.bfloat16, **kw})
    dispatch._say_prefix_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        assert pick("splash") == "splash" and pick("auto") == "splash"  # no prefix: unchanged
        assert pick("splash", prefix=True) == "blockwise"
        assert pick("splash", prefix=True) == "blockwise"
        assert pick("auto", prefix=True) == "blockwise"
        assert pick("cudnn", backend="gpu", prefix=True) == "blockwise"
        assert pick("auto", backend="gpu", prefix=True) == "blockwise"
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4, said  # once per (kernel, request), not once per call
    assert all("prefix" in line and "blockwise" in line for line in said)
    assert "'splash'" in said[0] and "splash kernel" in said[0]
    # Kernels that take the prefix keep it.
    assert pick("ring", sequence_shards=8, prefix=True) == "ring"
    assert pick("reference", prefix=True) == "reference"
    assert pick("auto", q_len=512, prefix=True) == "reference"
    assert pick("auto", self_attention=False, q_len=1, prefix=True) == "reference"


def test_splash_request_runs_blockwise_with_a_prefix(monkeypatch):
    """On a (pretend) TPU, model.attention='splash' with a prefix runs the blockwise kernel: the right answer
    on CPU, where the Splash kernel itself could not run."""
    monkeypatch.setattr(dispatch, "target_backend", lambda: "tpu")
    pos, seg, pre = packed_rows(24)
    q, k, v = qkv(2, 24, 24, 4, 2, seed=5)
    mask = naive_mask(pos, seg, pre)
    got = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, pos, pos, seg, seg, implementation="splash",
                                                        block_q=8, block_kv=8, q_prefix=pre, kv_prefix=pre))(q, k, v)
    np.testing.assert_allclose(np.asarray(got) * mask.any(-1)[:, :, None, None], naive_attention(q, k, v, mask),
                               atol=2e-6)


# ----------------------------------------------------------------------------- the model
TINY = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                   max_seq_len=64)


@pytest.fixture(scope="module")
def tiny():
    model = Transformer(TINY)
    params = unbox(model.init(jax.random.PRNGKey(0), ModelInput.unpacked(jnp.zeros((1, 8), jnp.int32)))["params"])
    return model, params


def packed_input(t: int = 24, seed: int = 0) -> ModelInput:
    pos, seg, pre = packed_rows(t)
    tokens = np.random.default_rng(seed).integers(1, TINY.vocab_size, size=(2, t)).astype(np.int32)
    return ModelInput(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg), prefix=jnp.asarray(pre))


def test_transformer_prefix_changes_answers_and_zero_prefix_is_causal(tiny):
    model, params = tiny
    inputs = packed_input()
    forward = jax.jit(lambda inputs: model.apply({"params": params}, inputs).logits)
    causal = forward(inputs.replace(prefix=None))
    with_prefix = forward(inputs)
    pre, seg = np.asarray(inputs.prefix), np.asarray(inputs.segment_ids)
    answer = (pre == 0) & (seg != 0)
    # Answer tokens read the prefix tokens' hidden states, which now saw the whole prefix.
    assert np.abs(np.asarray(with_prefix - causal)).max(-1)[answer].min() > 1e-4
    # A zero prefix is the causal model, bit for bit.
    zero = forward(inputs.replace(prefix=jnp.zeros_like(inputs.prefix)))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(causal))


def test_transformer_prefix_blockwise_matches_reference(tiny):
    _, params = tiny
    inputs = packed_input(seed=1)
    logits = {impl: Transformer(dataclasses.replace(TINY, attention=impl, attention_block_q=4, attention_block_kv=8))
              .apply({"params": params}, inputs).logits for impl in ("reference", "blockwise")}
    real = np.asarray(inputs.segment_ids) != 0
    np.testing.assert_allclose(np.asarray(logits["blockwise"])[real], np.asarray(logits["reference"])[real],
                               atol=1e-5)


def test_cached_prefill_with_prefix_then_decode_equals_full_forward(tiny):
    """Rows of 7 and 5 prompt tokens (left-padded to 7), a prefix of the first 4 real tokens, then 3 decode
    steps with no prefix: every real position's logits equal one full forward with the same prefix."""
    model, params = tiny
    b, prompt_len, steps = 2, 7, 3
    total = prompt_len + steps
    tokens = jnp.asarray(np.random.default_rng(6).integers(1, TINY.vocab_size, size=(b, total)), jnp.int32)
    full = ModelInput.left_padded(tokens, jnp.array([total, total - 2]))
    real_index = np.cumsum(np.asarray(full.segment_ids), axis=1) - 1  # index among each row's real tokens
    prefix = jnp.asarray((np.asarray(full.segment_ids) == 1) & (real_index < 4), jnp.int32)
    want = model.apply({"params": params}, full.replace(prefix=prefix)).logits

    def head(x):
        return x[:, :prompt_len]

    prompt = ModelInput(head(full.tokens), head(full.positions), head(full.segment_ids), prefix=head(prefix))
    out = model.apply({"params": params}, prompt, cache=KVCache.init(TINY, b, total), write_index=0)
    got = [out.logits]
    cache = out.cache
    for j in range(prompt_len, total):
        step = ModelInput(full.tokens[:, j:j + 1], full.positions[:, j:j + 1], full.segment_ids[:, j:j + 1])
        out = model.apply({"params": params}, step, cache=cache, write_index=j)
        got.append(out.logits)
        cache = out.cache
    got = np.concatenate([np.asarray(x) for x in got], axis=1)
    real = np.asarray(full.segment_ids) != 0
    np.testing.assert_allclose(got[real], np.asarray(want)[real], atol=1e-5)
    # Without the prefix in the prefill the logits are the causal model's, so the prefix did matter.
    causal = model.apply({"params": params}, full).logits
    assert np.abs(np.asarray(causal) - np.asarray(want))[real].max() > 1e-4
