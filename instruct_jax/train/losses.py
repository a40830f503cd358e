"""Token-level language-model losses, always in float32."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


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


def _mesh_axes_of(logical: tuple) -> tuple:
    """The mesh axes each logical name maps to in the active rules (one tuple per name), or None outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not nn.get_logical_axis_rules():
        return None
    entries = nn.logical_to_mesh_axes(logical)
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries)


def _linear_ce_chunks(h, w, y, m):
    """h [K, B, C, D], w [V, D], y and m [K, B, C] -> (sum of m * nll, (nll, d sum / d h, d sum / d w)).

    The gradients accumulate in float32 and come back in h's and w's dtypes, as autodiff of the
    unfused loss gives them.

    On a mesh the chunk loop runs per device (shard_map): each device takes its rows (and, with a
    sharded length axis, its chunks) and the output kernel's vocabulary shard, gathered over the
    batch axes once per call, before the loop. Inside the loop the only collectives are per-token
    vectors over the vocabulary shards (the logsumexp's max and sum, the target logit) and the
    [B, C, D] hidden-state gradient; the kernel's gradient accumulates per device and is summed
    over the rows once, after the loop. XLA's own partitioning of the same scan gathered the [V, D]
    kernel and all-reduced its float32 gradient on every chunk (issue 27, docs/PLANS.md).
    """
    names = _mesh_axes_of(("length", "batch", "act_vocab"))
    if names is None:
        return _local_chunks(h, w, y, m, vocab_axes=(), row_axes=())
    mesh = jax.sharding.get_abstract_mesh()
    length_axes, batch_axes, vocab_axes = (tuple(a for a in axes if mesh.shape[a] > 1) for axes in names)

    def size(axes):
        return math.prod(mesh.shape[a] for a in axes)

    length_axes = length_axes if h.shape[0] % size(length_axes) == 0 else ()  # chunks split over sequence
    batch_axes = tuple(a for a in batch_axes if a not in length_axes) if h.shape[1] % size(batch_axes) == 0 else ()
    vocab_axes = tuple(a for a in vocab_axes if a not in length_axes + batch_axes)
    vocab_axes = vocab_axes if w.shape[0] % size(vocab_axes) == 0 else ()

    def entry(axes):
        return None if not axes else axes[0] if len(axes) == 1 else axes

    rows = P(entry(length_axes), entry(batch_axes))
    row_axes = length_axes + batch_axes
    # The kernel's gradient leaves reduce-scattered over the row axes on its model dim when that splits
    # evenly (half an all-reduce's bytes, and the FSDP layout the params take), else all-reduced.
    scatter = bool(row_axes) and w.shape[1] % size(row_axes) == 0
    fn = functools.partial(_local_chunks, vocab_axes=vocab_axes, row_axes=row_axes, scatter=scatter)
    dw_spec = P(entry(vocab_axes), entry(row_axes) if scatter else None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(P(*rows, None, None), P(entry(vocab_axes), None), rows, rows),
                         out_specs=(P(), (rows, P(*rows, None, None), dw_spec)), check_vma=False)(h, w, y, m)


def _local_chunks(h, w, y, m, vocab_axes: tuple, row_axes: tuple, scatter: bool = False):
    """_linear_ce_chunks on one device's rows and vocabulary shard (vocab_axes: the mesh axes the kernel's
    rows are split over; row_axes: those the hidden states' rows and chunks are split over; scatter: return the
    kernel's gradient reduce-scattered over row_axes along its model dim instead of all-reduced)."""
    v_local = w.shape[0]
    offset = jax.lax.axis_index(vocab_axes) * v_local if vocab_axes else 0

    def over_vocab(x, reduce=jax.lax.psum):
        return reduce(x, vocab_axes) if vocab_axes else x

    def one_chunk(dw, xs):
        h_c, y_c, m_c = xs  # [B, C, D], [B, C], [B, C]
        logits = jnp.einsum("BCD,VD->BCV", h_c, w, preferred_element_type=jnp.float32)  # [B, C, V local]
        # logsumexp over the whole vocabulary (jax.nn.logsumexp's formula, across the shards)
        top = jax.lax.stop_gradient(over_vocab(jnp.max(logits, axis=-1), jax.lax.pmax))
        lse = jnp.log(over_vocab(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))) + top  # [B, C]
        local_y = y_c - offset  # the target's column in this shard; outside [0, V local) on other shards
        hit = (local_y >= 0) & (local_y < v_local)
        target = jnp.take_along_axis(logits, jnp.clip(local_y, 0, v_local - 1)[..., None], axis=-1)[..., 0]
        nll = lse - over_vocab(jnp.where(hit, target, 0.0))
        # d(sum m * nll) / d logits = m * (softmax - onehot(y))
        onehot = jnp.arange(v_local, dtype=jnp.int32) == local_y[..., None]  # [B, C, V] bool, fused away
        g = (jnp.exp(logits - lse[..., None]) - onehot) * m_c[..., None]  # [B, C, V local] float32
        dh = over_vocab(jnp.einsum("BCV,VD->BCD", g.astype(w.dtype), w, preferred_element_type=jnp.float32))
        dw = dw + jnp.einsum("BCV,BCD->VD", g.astype(h.dtype), h_c, preferred_element_type=jnp.float32)
        return dw, (nll, dh.astype(h.dtype))

    dw, (nll, dh) = jax.lax.scan(one_chunk, jnp.zeros(w.shape, jnp.float32), (h, y, m))
    total = jnp.sum(nll * m)
    if row_axes:  # once per call: the loss and the kernel's gradient summed over every device's rows
        total = jax.lax.psum(total, row_axes)
        dw = (jax.lax.psum_scatter(dw, row_axes, scatter_dimension=1, tiled=True) if scatter
              else jax.lax.psum(dw, row_axes))
    return total, (nll, dh, dw.astype(w.dtype))


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
