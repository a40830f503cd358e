"""Run an attention kernel on each device's shard, with mesh axes found from the logical rules.

Kernels that XLA cannot partition by itself (Pallas Splash, the cuDNN custom call) and the
ring (which talks to its neighbours) run under `jax.shard_map`. Model code names no mesh
axis: the specs here come from the logical activation names ("batch", "length",
"act_heads", ...) through the rules made active by `nn.logical_axis_rules`, in the mesh
made active by `jax.set_mesh`. Outside a mesh the kernel is simply called.
"""

from __future__ import annotations

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

    q: [B, T, N, H]; k, v: [B, S, K, H]. Query heads and kv heads split alike or not at all,
    so every grouped-query group stays on one device. With shard_length the length axis
    stays split too (ring attention) and the kernel must handle the exchange itself.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, *rows)
    q_spec = _fitting_spec(Q_AXES, q.shape, mesh, shard_length)
    kv_spec = _fitting_spec(KV_AXES, k.shape, mesh, shard_length)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(*q_spec[:2], None, None), P(*kv_spec[:2], None, None)
    row_spec = P(*q_spec[:2])
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec) + (row_spec,) * len(rows),
                         out_specs=q_spec, check_vma=False)(q, k, v, *rows)
