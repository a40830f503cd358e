"""Vendor attention kernels: TPU Splash attention and GPU cuDNN flash attention.

Letters as in attention.py. Both kernels mask by array index (causal = key index <= query
index), not by positions; that equals the positions-and-segments mask of attention.py
whenever positions increase by one along each segment, which packing, right padding and
left padding all satisfy.

* Splash (jax.experimental.pallas.ops.tpu.splash_attention) takes segment ids, so it covers
  packed rows as well. Its kernel module is imported only when called (TPU runs only).
* cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) has no segment ids in its
  public API: only a causal flag and per-row valid lengths. It is therefore used for
  batches whose rows are each one right-padded sequence; any other batch (packed rows,
  left padding) takes the blockwise kernel instead. The check runs on the data, inside
  the jitted step (`lax.cond`), so a packed batch can never be attended wrongly.

Neither kernel can take a per-example prefix-LM prefix (masks.py): Splash's mask is built
into the kernel at compile time, cuDNN's is a causal flag. Calls with a prefix therefore
run the blockwise kernel instead (dispatch.select_implementation, which logs it once).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from instruct_jax.model.attention.blockwise import blockwise_attention

SPLASH_BLOCK = 128  # Splash tiles (and so the padded lengths) are multiples of the TPU lane width


# ----------------------------------------------------------------------------- TPU Splash
@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    causal = masks.MultiHeadMask([masks.CausalMask((q_len, kv_len))] * num_heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, q_seg, kv_seg, block: int = 512, interpret: bool = False):
    """Causal + segment-id attention with the Splash kernel, grouped-query heads native.

    q: [B, T, N, H]; k, v: [B, T, K, H]; segment ids [B, T]. Lengths are padded up to a
    multiple of the tile with segment id -1, which no real token shares. `interpret` runs
    the Pallas kernel in the interpreter (tests on CPU).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, t, n, h = q.shape
    tile = min(block, -(-t // SPLASH_BLOCK) * SPLASH_BLOCK)
    padded = -(-t // tile) * tile
    pad = lambda x, value=0: jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2),  # noqa: E731
                                     constant_values=value)
    kernel = _splash_kernel(n, padded, padded, tile, interpret)
    q = pad(q * jnp.asarray(h ** -0.5, q.dtype))
    k, v, q_seg, kv_seg = pad(k), pad(v), pad(q_seg, -1), pad(kv_seg, -1)
    heads_first = lambda x: jnp.einsum("BTNH->BNTH", x)  # noqa: E731
    out = jax.vmap(lambda qb, kb, vb, qs, ks: kernel(qb, kb, vb, segment_ids=SegmentIds(q=qs, kv=ks)))(
        heads_first(q), heads_first(k), heads_first(v), q_seg, kv_seg)  # [B, N, T, H]
    return jnp.einsum("BNTH->BTNH", out)[:, :t]


# ----------------------------------------------------------------------------- GPU cuDNN
def right_padded_lengths(positions, segment_ids):
    """(lengths [B], ok): ok iff every row is one sequence at positions 0..len-1 followed by padding.

    Worked example: segment_ids [[1, 1, 1, 0], [1, 1, 2, 2]], positions [[0, 1, 2, 0], [0, 1, 0, 1]]
    -> lengths [3, 4], ok False (row 1 is packed: cuDNN cannot see its segment boundary).
    """
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    lengths = jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)  # [B]
    valid = idx < lengths[:, None]
    ok = jnp.all(jnp.where(valid, (segment_ids == 1) & (positions == idx), segment_ids == 0))
    return lengths, ok


def cudnn_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q: int = 512, block_kv: int = 512):
    """cuDNN flash attention for right-padded rows; blockwise attention for any other batch.

    q: [B, T, N, H]; k, v: [B, T, K, H] in bfloat16 / float16; positions, segment ids [B, T].
    """
    lengths, ok = right_padded_lengths(q_pos, q_seg)
    kv_lengths, kv_ok = right_padded_lengths(kv_pos, kv_seg)

    def fused(q, k, v):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                           key_value_seq_lengths=kv_lengths, implementation="cudnn")
        # Rows past a sequence's length are padding: pin them to 0 (as blockwise does) so that no
        # kernel-specific value there can reach later layers' padding keys as NaN.
        return jnp.where(q_seg[:, :, None, None] != 0, out, 0).astype(q.dtype)

    def fallback(q, k, v):
        return blockwise_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv)

    return jax.lax.cond(ok & kv_ok, fused, fallback, q, k, v)
