"""Token-level language-model losses, always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """Negative log-likelihood of each target: logits [B, T, V], targets [B, T] -> [B, T] float32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def masked_loss_sum(logits, targets, loss_mask):
    """(sum of masked token losses, number of target tokens).

    Normalising by the token count of the whole (accumulated) batch, never averaging
    per-example means, weights every assistant token equally however examples are packed.
    """
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * mask), jnp.sum(mask)


# ----------------------------------------------------------------------------- fused, chunked cross-entropy
def fused_masked_loss_sum(hidden, kernel, targets, loss_mask, chunk_len: int = 64):
    """masked_loss_sum from the final hidden states, holding logits for only `chunk_len` positions at once.

    hidden [B, T, D] (compute dtype), kernel [V, D] the output projection in the compute dtype (the tied
    embedding, or lm_head transposed), targets [B, T] int, loss_mask [B, T]. Returns (sum of masked
    token losses, number of target tokens), equal to masked_loss_sum(hidden @ kernel.T, ...) in value
    and gradient (up to float summation order).

    With a 49,152-token vocabulary a [B, T, V] float32 logits tensor is the step's largest activation
    (200 MB for 4 x 256 tokens; 4 GB for 8 x 1,024 tokens of a 128k vocabulary), and softmax, its
    gradient and the two gradient matmuls each stream it through memory. Here a lax.scan over the
    length axis takes [B, chunk_len] positions at a time (rows stay whole, so a batch-sharded hidden
    stays sharded) and computes, while the chunk's logits are hot, the loss and its gradients with
    respect to the chunk's hidden states and to the kernel (a "fused linear cross-entropy"). The
    backward pass only scales those saved gradients by the incoming cotangent: no recomputation, and
    the same three matmuls as the unfused loss.
    """
    b, t, _ = hidden.shape
    chunk = max(1, min(chunk_len, t))
    pad = -t % chunk

    def chunks(x):  # [B, T, ...] -> [T' / C, B, C, ...], padded positions weigh 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, (t + pad) // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)

    mask = loss_mask.astype(jnp.float32)
    total = _linear_ce_sum(chunks(hidden), kernel, chunks(jnp.asarray(targets, jnp.int32)), chunks(mask))
    return total, jnp.sum(mask)


def _linear_ce_chunks(h, w, y, m):
    """h [K, B, C, D], w [V, D], y and m [K, B, C] -> (sum of m * nll, (nll, d sum / d h, d sum / d w)).

    The gradients accumulate in float32 and come back in h's and w's dtypes, as autodiff of the
    unfused loss gives them.
    """
    def one_chunk(dw, xs):
        h_c, y_c, m_c = xs  # [B, C, D], [B, C], [B, C]
        logits = jnp.einsum("BCD,VD->BCV", h_c, w, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        nll = lse - jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0]
        # d(sum m * nll) / d logits = m * (softmax - onehot(y))
        onehot = jnp.arange(w.shape[0], dtype=jnp.int32) == y_c[..., None]  # [B, C, V] bool, fused away
        g = (jnp.exp(logits - lse[..., None]) - onehot) * m_c[..., None]  # [B, C, V] float32
        dh = jnp.einsum("BCV,VD->BCD", g.astype(w.dtype), w, preferred_element_type=jnp.float32)
        dw = dw + jnp.einsum("BCV,BCD->VD", g.astype(h.dtype), h_c, preferred_element_type=jnp.float32)
        return dw, (nll, dh.astype(h.dtype))

    dw, (nll, dh) = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (h, y, m))
    return jnp.sum(nll * m), (nll, dh, dw.astype(w.dtype))


@jax.custom_vjp
def _linear_ce_sum(h, w, y, m):
    """sum of m * (logsumexp(h w^T) - (h w^T)[y]) over every position; gradients come from the forward."""
    return _linear_ce_chunks(h, w, y, m)[0]


def _linear_ce_fwd(h, w, y, m):
    return _linear_ce_chunks(h, w, y, m)


def _linear_ce_bwd(residuals, g):
    nll, dh, dw = residuals
    return (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype), None, nll * g


_linear_ce_sum.defvjp(_linear_ce_fwd, _linear_ce_bwd)
