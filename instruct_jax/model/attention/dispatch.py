"""Attention kernels behind one switch (model.attention); the mask they share is in masks.py."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from instruct_jax.errors import ConfigError
from instruct_jax.model.attention import blockwise, fused, ring, shard_local
from instruct_jax.model.attention.masks import attention_mask, reference_attention

logger = logging.getLogger(__name__)

# `auto` keeps the einsum reference below this many query tokens: its [T, S] scores are
# small there, and one fused einsum beats a scan over blocks.
AUTO_MIN_BLOCKWISE_LEN = 2048


def select_implementation(requested: str, *, q_len: int, self_attention: bool, backend: str,
                          sequence_shards: int, dtype, prefix: bool = False) -> str:
    """The kernel that runs for one attention call (pure: decided from static shapes and context).

    requested: model.attention. self_attention is False when decoding from a KV cache (the
    queries attend over cache slots): only reference (short queries, a 1-token decode step)
    or blockwise (a long prefill) apply there. `auto` on a training-style call picks ring
    when the length axis is sharded over a mesh axis, else reference for short sequences,
    else Splash on TPU, cuDNN on GPU with 16-bit compute (packed batches divert to
    blockwise inside it), else blockwise. An explicit ring without a sharded length axis is
    blockwise; explicit splash / cudnn on the wrong backend is a ConfigError.

    prefix: the call has prefix-LM flags (masks.py). Splash's mask is fixed when its kernel
    is built and cuDNN's is a causal flag, so neither can take a per-example prefix: such a
    call runs blockwise instead, and says so once (log). Reference, blockwise and ring take it.
    """
    if requested in ("splash", "cudnn"):
        want = {"splash": "tpu", "cudnn": "gpu"}[requested]
        if backend != want:
            raise ConfigError("model.attention", f"{requested!r} runs on {want.upper()} only; this backend is "
                              f"{backend!r} (use 'auto' or 'blockwise')")
        if requested == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            raise ConfigError("model.attention", f"'cudnn' needs model.dtype bfloat16 (cuDNN flash attention "
                              f"is 16-bit only), got {jnp.dtype(dtype).name}")
    if not self_attention:
        return "reference" if requested == "reference" or q_len < AUTO_MIN_BLOCKWISE_LEN else "blockwise"
    ring_fits = sequence_shards > 1 and q_len % sequence_shards == 0
    if requested == "ring":
        return "ring" if ring_fits else "blockwise"
    if requested != "auto":
        return _without_fixed_mask(requested, requested) if prefix else requested
    if ring_fits:
        return "ring"
    if q_len < AUTO_MIN_BLOCKWISE_LEN:
        return "reference"
    if backend == "tpu":
        return _without_fixed_mask("splash", requested) if prefix else "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return _without_fixed_mask("cudnn", requested) if prefix else "cudnn"
    return "blockwise"


def _without_fixed_mask(impl: str, requested: str) -> str:
    """impl, or blockwise when impl is a vendor kernel whose mask cannot hold a prefix-LM prefix."""
    if impl not in ("splash", "cudnn"):
        return impl
    _say_prefix_fallback(impl, requested)
    return "blockwise"


@functools.lru_cache(maxsize=None)
def _say_prefix_fallback(impl: str, requested: str) -> None:
    """Log once per (kernel, request) that a prefix-LM call runs blockwise instead (at trace time)."""
    logger.warning("model.attention=%r: the %s kernel's mask is fixed at compile time and cannot take a "
                   "per-example prefix-LM prefix; attention with a prefix runs the blockwise kernel instead",
                   requested, impl)


def target_backend() -> str:
    """The platform the program is traced for: the active mesh's devices (a plan traces for TPU devices that
    libtpu describes, from a CPU process), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def dot_product_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, implementation: str = "reference",
                          block_q: int = 512, block_kv: int = 512, self_attention: bool = True,
                          q_prefix=None, kv_prefix=None):
    """The model's one attention entry point.

    q: [B, T, N, H]; k, v: [B, S, K, H]; positions / segment ids [B, T] for q, [B, S] for kv.
    implementation: model.attention (see select_implementation); block_q / block_kv: the
    blockwise and ring kernels' tile sizes. q_prefix / kv_prefix: prefix-LM flags [B, T] /
    [B, S] (masks.py), or None: causal, and the same program as without them. Splash and
    cuDNN cannot take a prefix: with one they run blockwise (select_implementation).
    Returns [B, T, N, H] in q.dtype.
    """
    _, shards = shard_local.sequence_mesh_axes()
    impl = select_implementation(implementation, q_len=q.shape[1], self_attention=self_attention,
                                 backend=target_backend(), sequence_shards=shards, dtype=q.dtype,
                                 prefix=q_prefix is not None)
    if impl == "reference":
        return reference_attention(q, k, v, attention_mask(q_pos, kv_pos, q_seg, kv_seg, q_prefix, kv_prefix))
    if impl == "blockwise":
        return blockwise.blockwise_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv,
                                             q_prefix, kv_prefix)
    if impl == "ring":
        return ring.ring_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, block_q, block_kv,
                                   q_prefix=q_prefix, kv_prefix=kv_prefix)
    # The vendor kernels are custom calls XLA cannot split: run them on each device's shard.
    if impl == "splash":
        kernel = functools.partial(fused.splash_attention, block=block_q)
        return shard_local.per_shard(kernel, q, k, v, q_seg, kv_seg)
    if impl == "cudnn":
        kernel = functools.partial(fused.cudnn_attention, block_q=block_q, block_kv=block_kv)
        return shard_local.per_shard(kernel, q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    raise ValueError(f"config field 'model.attention': unknown implementation {implementation!r}")
