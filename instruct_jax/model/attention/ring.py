"""Ring attention: sequence (context) parallel attention over the mesh axis that shards `length`.

Letters as in attention.py; T_l = T / P is one device's share of the sequence, P the
number of devices along the sequence mesh axis.

Each device keeps its queries and passes its key/value chunk (with the chunk's positions
and segment ids) around the ring with `ppermute`; after P steps every query has seen every
key, and no device ever holds more than two chunks (Liu et al. 2023, "Ring Attention with
Blockwise Transformers"). Each step runs the blockwise kernels of blockwise.py on (local
queries, visiting chunk) and merges the partial result by its log-sum-exp. The backward
pass is a second ring: dq accumulates locally while dk and dv travel *with* their chunk, so
after P steps each chunk's gradient arrives back at its owner. Memory per device is
O(T_l), whatever T is.

Causal load balancing. With contiguous chunks, device 0's queries see only chunk 0 while
device P-1's see everything, and since ring steps are synchronous every step costs the
busiest device's work. So the sequence is first split into 2P halves and device i takes
halves i and 2P-1-i ("zigzag"): every device then has one early and one late half and
does the same work at every step (block pairs hidden by the mask are skipped by the
kernels). The mask comes from positions and segment ids, never from array indices, so
reordering tokens changes nothing else; the output is put back in order at the end.

A prefix-LM prefix (masks.py) travels the same way: the queries keep their prefix flags and
each key chunk carries its own, so every step masks exactly as one device would.

Model code names no mesh axis: the axis is whatever the active logical rules map the
activation axis "length" to, in the mesh set by `jax.set_mesh`. Without such an axis (or
of size 1) this is plain blockwise attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from instruct_jax.model.attention.blockwise import (EMPTY_LSE, blockwise_attention, flash_backward, flash_forward,
                                                    row_delta)
from instruct_jax.model.attention.shard_local import per_shard, sequence_mesh_axes


# ----------------------------------------------------------------------------- zigzag layout
def _move_halves(x, axis, size: int, dest):
    """Move the two halves (along axis 1) of every device's chunk to their new homes.

    dest(device, half) -> (device, half). Four partial ppermutes: one per (source half,
    target half) pair; a device that receives nothing from one of them gets zeros, so the
    two candidates for each target half add up to the half that arrives.
    """
    half = x.shape[1] // 2
    parts = (x[:, :half], x[:, half:])
    new = []
    for target in (0, 1):
        received = 0
        for source in (0, 1):
            perm = [(d, dest(d, source)[0]) for d in range(size) if dest(d, source)[1] == target]
            if perm:
                received = received + jax.lax.ppermute(parts[source], axis, perm)
        new.append(received)
    return jnp.concatenate(new, axis=1)


def _zigzag_dest(size: int, inverse: bool):
    """Contiguous halves (2d, 2d+1) on device d <-> halves (d, 2P-1-d) on device d."""

    def to_zigzag(d, h):
        j = 2 * d + h  # global half index
        return (j, 0) if j < size else (2 * size - 1 - j, 1)

    def to_contiguous(d, h):
        j = d if h == 0 else 2 * size - 1 - d
        return divmod(j, 2)

    return to_contiguous if inverse else to_zigzag


# ----------------------------------------------------------------------------- the ring
def _merge(out, lse, out_s, lse_s):
    """Combine two softmax-normalised partial results by their log-sum-exp.

    out: [B, T, K, G, H] float32, lse: [B, K, G, T]."""
    lse_new = jnp.logaddexp(lse, lse_s)
    weight = lambda l: jnp.exp(jnp.einsum("BKGT->BTKG", l - lse_new))[..., None]  # noqa: E731
    return out * weight(lse) + out_s * weight(lse_s), lse_new


def _ring_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q, block_kv):
    perm = [(i, (i + 1) % size) for i in range(size)]

    def attend(out, lse, chunk):
        kb, vb, kp, ks, kpre = chunk
        out_s, lse_s = flash_forward(q, kb, vb, q_pos, q_seg, kp, ks, block_q, block_kv, q_prefix, kpre)
        return _merge(out, lse, out_s, lse_s)

    def step(carry, _):
        out, lse, chunk = carry
        out, lse = attend(out, lse, chunk)
        return (out, lse, jax.lax.ppermute(chunk, axis, perm)), None

    b, t, kh, g, h = q.shape
    init = (jnp.zeros((b, t, kh, g, h), jnp.float32), jnp.full((b, kh, g, t), EMPTY_LSE, jnp.float32),
            (k, v, kv_pos, kv_seg, kv_prefix))
    (out, lse, last), _ = jax.lax.scan(step, init, None, length=size - 1)
    return attend(out, lse, last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _ring(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q, block_kv):
    out, _ = _ring_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q,
                           block_kv)
    return out.astype(q.dtype)


def _ring_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q, block_kv):
    out, lse = _ring_forward(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q,
                             block_kv)
    out = out.astype(q.dtype)
    return out, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, out, lse)


def _ring_bwd(axis, size, block_q, block_kv, residuals, dout):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, out, lse = residuals
    delta = row_delta(out, dout)
    perm = [(i, (i + 1) % size) for i in range(size)]

    def step(carry, _):
        dq, chunk, dk, dv = carry
        kb, vb, kp, ks, kpre = chunk
        dq_s, dk_s, dv_s = flash_backward(q, kb, vb, q_pos, q_seg, kp, ks, lse, dout, delta, block_q, block_kv,
                                          q_prefix, kpre)
        # dk / dv belong to the visiting chunk: they travel on with it and are home after P steps.
        chunk, dk, dv = jax.lax.ppermute((chunk, dk + dk_s, dv + dv_s), axis, perm)
        return (dq + dq_s, chunk, dk, dv), None

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    init = (zeros(q), (k, v, kv_pos, kv_seg, kv_prefix), zeros(k), zeros(v))
    (dq, _, dk, dv), _ = jax.lax.scan(step, init, None, length=size)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ----------------------------------------------------------------------------- public entry
def ring_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q: int = 512, block_kv: int = 512,
                   load_balance: bool = True, q_prefix=None, kv_prefix=None):
    """Self-attention with the sequence sharded over the mesh axis of logical "length".

    q: [B, T, N, H]; k, v: [B, T, K, H]; positions / segment ids and optional prefix-LM flags
    [B, T]. Same contract as blockwise_attention (to which it falls back when "length" is
    not sharded).
    """
    axes, size = sequence_mesh_axes()
    if size == 1:
        return blockwise_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv, q_prefix, kv_prefix)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"ring attention is self-attention: query length {q.shape[1]} != key length {k.shape[1]}")
    if q.shape[1] % size:
        raise ValueError(f"ring attention: length {q.shape[1]} does not split over {size} devices of mesh axes {axes}")
    axis = axes[0] if len(axes) == 1 else axes
    balance = load_balance and (q.shape[1] // size) % 2 == 0

    def local(q, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix=None, kv_prefix=None):
        b, t, n, h = q.shape  # this device's share
        kv_heads = k.shape[2]
        if balance:
            order = functools.partial(_move_halves, axis=axis, size=size, dest=_zigzag_dest(size, False))
            q, k, v, q_pos, q_seg, kv_pos, kv_seg = map(order, (q, k, v, q_pos, q_seg, kv_pos, kv_seg))
            q_prefix, kv_prefix = (None if x is None else order(x) for x in (q_prefix, kv_prefix))
        q5 = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T_l, K, G, H]
        out = _ring(q5, k, v, q_pos, q_seg, kv_pos, kv_seg, q_prefix, kv_prefix, axis, size, block_q, block_kv)
        out = out.reshape(b, t, n, h)
        if balance:
            out = _move_halves(out, axis, size, _zigzag_dest(size, True))
        return out

    prefix = () if q_prefix is None else (q_prefix, kv_prefix)
    return per_shard(local, q, k, v, q_pos, q_seg, kv_pos, kv_seg, *prefix, shard_length=True)
