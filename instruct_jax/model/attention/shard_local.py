"""Run an attention kernel on each device's shard, with mesh axes found from the logical rules.

Kernels that XLA cannot partition by itself (Pallas Splash, the cuDNN custom call) and the
ring (which talks to its neighbours) run under `jax.shard_map`. Model code names no mesh
axis: the specs here come from the logical activation names ("batch", "length",
"act_heads", ...) through the rules made active by `nn.logical_axis_rules`, in the mesh
made active by `jax.set_mesh`. Outside a mesh the kernel is simply called.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

Q_AXES = ("batch", "length", "act_heads", "act_head_dim")
KV_AXES = ("batch", "length", "act_kv_heads", "act_head_dim")


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def sequence_mesh_axes() -> tuple[tuple[str, ...], int]:
    """(mesh axes that the logical axis "length" maps to, their total size) in the active context.

    ((), 1) outside a mesh, without logical rules, or when "length" is replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = _mesh_axes(nn.logical_to_mesh_axes(("batch", "length"))[1])
    return axes, math.prod(mesh.shape[a] for a in axes)


def _fitting_spec(logical: tuple[str, ...], shape: tuple[int, ...], mesh, shard_length: bool) -> P:
    """The rules' PartitionSpec for an array, replicating any dim the mesh cannot split evenly."""
    spec = list(nn.logical_to_mesh_axes(logical))
    if not shard_length:
        spec[1] = None
    out = []
    for dim, entry in zip(shape, spec):
        size = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
        out.append(entry if dim % size == 0 else None)
    return P(*out)


def per_shard(kernel: Callable, q, k, v, *rows, shard_length: bool = False):
    """kernel(q, k, v, *rows) on each device's [batch, (length,) heads] shard; rows are [B, T] arrays.

    q: [B, T, N, H]; k, v: [B, S, K, H]. Query heads split over the mesh axes the rules give
    "act_heads". Key/value heads split alike when they can; when they cannot (multi-query attention,
    or fewer kv heads than the tensor axis) but every device's block of query heads still falls in
    whole kv groups (tensor size a multiple of K, or K a multiple of it), the kv heads come replicated
    and each device slices the ones its query heads read: heads / tensor query heads per device, never
    every head everywhere. With shard_length the length axis stays split too (ring attention) and the
    kernel must handle the exchange itself.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, *rows)
    q_spec = _fitting_spec(Q_AXES, q.shape, mesh, shard_length)
    kv_spec = _fitting_spec(KV_AXES, k.shape, mesh, shard_length)
    row_spec = P(*q_spec[:2])
    fn = kernel
    if q_spec[2] != kv_spec[2]:
        head_axes = _mesh_axes(q_spec[2])
        split = math.prod(mesh.shape[a] for a in head_axes)
        kv_heads = k.shape[2]
        if head_axes and split % kv_heads and kv_heads % split:  # a device's query block straddles kv groups
            q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
            row_spec = P(*q_spec[:2])
        else:
            kv_spec = P(*kv_spec[:2], None, None)
            fn = functools.partial(_with_own_kv_heads, kernel, head_axes, split, kv_heads)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(rows),
                         out_specs=q_spec, check_vma=False)(q, k, v, *rows)


def _with_own_kv_heads(kernel, head_axes, split, kv_heads, q, k, v, *rows):
    """kernel on this device's query heads and the kv heads they read (k, v come with all kv heads)."""
    index = jax.lax.axis_index(head_axes)
    width = max(kv_heads // split, 1)
    start = index * kv_heads // split
    k = jax.lax.dynamic_slice_in_dim(k, start, width, axis=2)
    v = jax.lax.dynamic_slice_in_dim(v, start, width, axis=2)
    return kernel(q, k, v, *rows)
