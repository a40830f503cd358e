"""Blockwise (flash-style) attention: online softmax over key blocks, linear memory in length.

Letters as in attention.py (B batch, T/S query/key length, K kv heads, G query heads per kv
head, H head dim); lower-case t/s are one query/key block.

The score matrix [T, S] is never materialised. Queries are cut into blocks of `block_q`
rows and keys into blocks of `block_kv`; for each query block a scan over key blocks keeps
the running row maximum m, the running normaliser l and the running weighted sum of values
(Milakov & Gimelshein 2018; Dao et al. 2022, "FlashAttention", Alg. 1). A custom VJP saves
only q, k, v, the output and the row log-sum-exp (all O(T)); the backward pass recomputes
each block's probabilities from the log-sum-exp (FlashAttention Alg. 2) in two sweeps, one
over query blocks (dq) and one over key blocks (dk, dv). Autodiff through the forward scan
would instead store every block's probabilities, i.e. O(T*S) again.

Block pairs that the mask hides entirely (above the causal diagonal, or across packed
segments) are skipped (a loop over the visible blocks only), so causal attention costs
about half of the pairs and a packed row of short examples far less. Which pairs are
hidden is computed from the blocks' own mask inputs, never assumed from the diagonal, so
a prefix-LM prefix (masks.py) makes the "future" blocks it reaches visible again.

Lengths need not divide the block sizes: queries and keys are padded with segment id 0,
which the mask hides. A query with no visible key at all (a padding token) gets output 0
here, where the einsum reference averages every value uniformly; such rows never reach a loss.

The kernels (`flash_forward`, `flash_backward`) take per-block masks from positions,
segment ids and optional prefix flags and return/consume the log-sum-exp, so ring attention (ring.py) reuses them for
each (local queries, visiting key chunk) pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from instruct_jax.model.attention.masks import MASK_VALUE, attention_mask

# Log-sum-exp of a row that sees no key: finite (so merging partial results never makes
# NaN) and so low that such a partial result gets weight exp(MASK_VALUE - lse) = 0.
EMPTY_LSE = MASK_VALUE


def _pad_length(x, multiple: int):
    """Zero-pad axis 1 of x up to a multiple of `multiple` (zero segment ids hide the padding)."""
    if x is None:  # an absent prefix stays absent
        return None
    extra = -x.shape[1] % multiple
    if not extra:
        return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _to_blocks(x, size: int):
    """[B, L, ...] -> [L/size, B, size, ...]: the leading axis is scanned over (None stays None)."""
    if x is None:
        return None
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, length // size, size, *x.shape[2:]), 1, 0)


def _from_blocks(x):
    """[L/size, B, size, ...] -> [B, L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _scores(qb, kb, scale):
    """qb [B, t, K, G, H], kb [B, s, K, H] -> float32 [B, K, G, t, s]."""
    return jnp.einsum("BtKGH,BsKH->BKGts", qb, kb, preferred_element_type=jnp.float32) * scale


def _fit(size: int, length: int) -> int:
    """Block size actually used: never larger than the sequence (a 1-token decode step is one block)."""
    return max(1, min(size, length))


def _block_mask(q_meta, kv_meta):
    """[B, t, s] bool of one block pair from its (positions, segment ids, prefix or None) blocks."""
    return attention_mask(q_meta[0], kv_meta[0], q_meta[1], kv_meta[1], q_meta[2], kv_meta[2])


def _any_visible(mask_of, blocks):
    """[n] bool: mask_of(block) ([B, t, s] bool) has a visible pair, for each stacked block."""
    return jax.lax.map(lambda block: mask_of(block).any(), blocks)


def _fold_visible(update, init, blocks, visible):
    """Fold update(carry, block) over the blocks whose `visible` flag is set, skipping the rest.

    A while loop over the visible blocks' indices, not a `lax.cond` per block: JAX's partial
    evaluation of a cond inside a scan (the model's scan over layers) under `grad` would store
    every skipped-or-not block's intermediates as residuals, which is O(T * S) again.
    """
    order = jnp.argsort(~visible, stable=True)  # visible block indices first, in order
    body = lambda i, carry: update(carry, jax.tree.map(lambda x: x[order[i]], blocks))  # noqa: E731
    return jax.lax.fori_loop(0, jnp.sum(visible, dtype=jnp.int32), body, init)


# ----------------------------------------------------------------------------- forward
def flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, block_q: int, block_kv: int,
                  q_prefix=None, kv_prefix=None):
    """Attention output and row log-sum-exp without the [T, S] score matrix.

    q: [B, T, K, G, H]; k, v: [B, S, K, H]; positions / segment ids [B, T] and [B, S];
    q_prefix / kv_prefix: prefix-LM flags [B, T] / [B, S], or None (causal; masks.py).
    Returns out float32 [B, T, K, G, H] (0 for rows that see nothing) and lse float32
    [B, K, G, T] (EMPTY_LSE for such rows).
    """
    t_len, s_len, h = q.shape[1], k.shape[1], q.shape[-1]
    bq, bk = _fit(block_q, t_len), _fit(block_kv, s_len)
    scale = h ** -0.5
    qs = [_to_blocks(_pad_length(x, bq), bq) for x in (q, q_pos, q_seg, q_prefix)]
    ks = [_to_blocks(_pad_length(x, bk), bk) for x in (k, v, kv_pos, kv_seg, kv_prefix)]

    def one_query_block(q_block):
        qb, qp, qsg, qpre = q_block  # [B, t, K, G, H], [B, t], [B, t], [B, t] or None
        b, t, kh, g, _ = qb.shape

        def update(carry, kv_block):
            kb, vb, kp, ksg, kpre = kv_block
            mask = _block_mask((qp, qsg, qpre), (kp, ksg, kpre))[:, None, None]  # [B, 1, 1, t, s]
            m, l, acc = carry  # [B, K, G, t], [B, K, G, t], [B, K, G, t, H]
            s = jnp.where(mask, _scores(qb, kb, scale), MASK_VALUE)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, t, s]
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGts,BsKH->BKGtH", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((b, kh, g, t), MASK_VALUE, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
                jnp.zeros((b, kh, g, t, h), jnp.float32))
        visible = _any_visible(lambda kv_meta: _block_mask((qp, qsg, qpre), kv_meta), tuple(ks[2:]))
        m, l, acc = _fold_visible(update, init, ks, visible)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), EMPTY_LSE)
        return jnp.einsum("BKGtH->BtKGH", out), jnp.moveaxis(lse, -1, 0)  # lse [t, B, K, G]

    out, lse = jax.lax.map(one_query_block, qs)  # [nq, B, t, K, G, H], [nq, t, B, K, G]
    out = _from_blocks(out)[:, :t_len]
    lse = jnp.moveaxis(lse.reshape(-1, *lse.shape[2:]), 0, -1)[..., :t_len]  # [B, K, G, T]
    return out, lse


# ----------------------------------------------------------------------------- backward
def flash_backward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, lse, dout, delta, block_q: int, block_kv: int,
                   q_prefix=None, kv_prefix=None):
    """Gradients (dq, dk, dv) of attention given the row log-sum-exp of the *whole* softmax.

    lse: [B, K, G, T] and delta = rowsum(dout * out): [B, K, G, T], both of the full
    attention (for ring attention: over every key chunk, not just this one), so that
    p = exp(s - lse) is this chunk's slice of the global probabilities and
    ds = p * (dp - delta) its slice of the score gradient. dout: [B, T, K, G, H]; prefix
    flags as in flash_forward.
    Returns float32 dq [B, T, K, G, H], dk, dv [B, S, K, H].
    """
    t_len, s_len, h = q.shape[1], k.shape[1], q.shape[-1]
    bq, bk = _fit(block_q, t_len), _fit(block_kv, s_len)
    scale = h ** -0.5
    lse_t = _pad_length(jnp.moveaxis(lse, -1, 1), bq)  # [B, T, K, G]
    delta_t = _pad_length(jnp.moveaxis(delta, -1, 1), bq)
    qs = [_to_blocks(_pad_length(x, bq), bq) for x in (q, q_pos, q_seg, dout)]
    qs += [_to_blocks(lse_t, bq), _to_blocks(delta_t, bq), _to_blocks(_pad_length(q_prefix, bq), bq)]
    ks = [_to_blocks(_pad_length(x, bk), bk) for x in (k, v, kv_pos, kv_seg, kv_prefix)]

    q_meta = lambda q_block: (q_block[1], q_block[2], q_block[6])  # noqa: E731  (positions, segments, prefix)
    kv_meta = lambda kv_block: tuple(kv_block[2:])  # noqa: E731

    def pair(q_block, kv_block):
        """(mask, p, ds) of one block pair; p and ds float32 [B, K, G, t, s]."""
        qb, _, _, dob, lse_b, delta_b, _ = q_block
        kb, vb = kv_block[:2]
        mask = _block_mask(q_meta(q_block), kv_meta(kv_block))[:, None, None]
        lse_b, delta_b = jnp.einsum("BtKG->BKGt", lse_b), jnp.einsum("BtKG->BKGt", delta_b)
        p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - lse_b[..., None]), 0.0)
        dp = jnp.einsum("BtKGH,BsKH->BKGts", dob, vb, preferred_element_type=jnp.float32)
        return mask, p, p * (dp - delta_b[..., None])

    def dq_of_query_block(q_block):
        def add(dq, kv_block):
            _, _, ds = pair(q_block, kv_block)
            return dq + jnp.einsum("BKGts,BsKH->BtKGH", ds, kv_block[0].astype(jnp.float32)) * scale

        visible = _any_visible(lambda meta: _block_mask(q_meta(q_block), meta), kv_meta(ks))
        return _fold_visible(add, jnp.zeros(q_block[0].shape, jnp.float32), ks, visible)

    def dkv_of_key_block(kv_block):
        def add(carry, q_block):
            dk, dv = carry
            _, p, ds = pair(q_block, kv_block)
            dv = dv + jnp.einsum("BKGts,BtKGH->BsKH", p, q_block[3].astype(jnp.float32))
            dk = dk + jnp.einsum("BKGts,BtKGH->BsKH", ds, q_block[0].astype(jnp.float32)) * scale
            return dk, dv

        visible = _any_visible(lambda meta: _block_mask(meta, kv_meta(kv_block)), q_meta(qs))
        zeros = jnp.zeros(kv_block[0].shape, jnp.float32)
        return _fold_visible(add, (zeros, zeros), qs, visible)

    dq = _from_blocks(jax.lax.map(dq_of_query_block, qs))[:, :t_len]
    dk, dv = jax.lax.map(dkv_of_key_block, ks)
    return dq, _from_blocks(dk)[:, :s_len], _from_blocks(dv)[:, :s_len]


def row_delta(out, dout):
    """rowsum(dout * out) in float32, [B, T, K, G, H] x2 -> [B, K, G, T]."""
    return jnp.einsum("BTKGH,BTKGH->BKGT", out.astype(jnp.float32), dout.astype(jnp.float32))


# ----------------------------------------------------------------------------- public entry
@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, block_q, block_kv):
    out, _ = flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, block_q, block_kv, q_prefix, kv_prefix)
    return out.astype(q.dtype)


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, block_q, block_kv):
    out, lse = flash_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, block_q, block_kv, q_prefix, kv_prefix)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, out, lse)


def _flash_bwd(block_q, block_kv, residuals, dout):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, out, lse = residuals
    dq, dk, dv = flash_backward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, lse, dout, row_delta(out, dout),
                                block_q, block_kv, q_prefix, kv_prefix)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q: int = 512, block_kv: int = 512,
                        q_prefix=None, kv_prefix=None):
    """Drop-in for reference_attention with the mask given as positions / segment ids.

    q: [B, T, N, H]; k, v: [B, S, K, H]; positions and segment ids [B, T] / [B, S] int32;
    q_prefix / kv_prefix: prefix-LM flags [B, T] / [B, S] (masks.py), or None for causal.
    Returns [B, T, N, H] in q.dtype; activation memory O((T + S) * N * H), not O(T * S).
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q5 = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    out = _flash(q5, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, block_q, block_kv)
    return out.reshape(b, t, n, h)
