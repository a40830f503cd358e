"""Logical axis names -> mesh shardings, for any pytree.

The model annotates every weight and activation with logical names ("embed", "mlp",
"batch", ...). One rules table (config.DEFAULT_RULES plus experiment overrides) maps each
name to a mesh axis, a tuple of mesh axes, or None (replicated). Unlike flax's own
lookup, a name missing from the table is an error here, never a silent replication.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from instruct_jax.errors import ConfigError
from instruct_jax.parallel.mesh import MESH_AXES

Rules = Sequence[tuple[str, Any]]


def _axes(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_rules(rules: Rules) -> None:
    """Each logical name once; each target a known mesh axis (or tuple of them, or None)."""
    seen = set()
    for name, target in rules:
        if name in seen:
            raise ConfigError("mesh.rules", f"logical axis {name!r} appears twice")
        seen.add(name)
        for axis in _axes(target):
            if axis not in MESH_AXES:
                raise ConfigError("mesh.rules", f"logical axis {name!r} maps to unknown mesh axis {axis!r}; "
                                  f"mesh axes are {list(MESH_AXES)}")


def logical_to_spec(logical: Sequence[str | None] | P, rules: Rules) -> P:
    """PartitionSpec of mesh axes for one array's logical names (None stays None)."""
    table = dict(rules)
    out, used = [], set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ConfigError("mesh.rules", f"logical axis {name!r} has no rule; known: {sorted(table)}")
        axes = tuple(a for a in _axes(table[name]) if a not in used)  # a mesh axis shards one dim only
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def logical_to_shardings(logical_specs: Any, mesh, rules: Rules) -> Any:
    """Map a pytree of logical PartitionSpecs (e.g. nn.get_partition_spec(...)) to NamedShardings."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(spec, rules)), logical_specs,
                        is_leaf=lambda x: isinstance(x, P))


def logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree of nn.Partitioned boxes (unboxed leaves -> P())."""
    return nn.get_partition_spec(boxed_tree)


def unbox(tree: Any) -> Any:
    """Strip flax partitioning metadata: parameters are kept as plain pytrees of arrays."""
    return nn.meta.unbox(tree)


def check_divisible(abstract: Any, shardings: Any) -> None:
    """Raise a ConfigError naming the array and mesh axes when a dim does not divide evenly."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
    flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat, flat_sh):
        mesh_shape = dict(sharding.mesh.shape)
        for dim, axes in zip(leaf.shape, sharding.spec):
            size = math.prod(mesh_shape[a] for a in _axes(axes))
            if dim % size:
                name = jax.tree_util.keystr(path)
                raise ConfigError("mesh", f"{name} has shape {leaf.shape}; dimension {dim} cannot be split "
                                  f"over mesh axes {axes} of size {size}. Change the mesh sizes or mesh.rules.")


def batch_sharding(mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array (ndim 1: a [batch] vector, e.g. per-row scores)."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length")[:ndim] + (None,) * max(ndim - 2, 0), rules))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def param_shardings_for(init_boxed: Callable[[jax.Array], Any], mesh, rules):
    """(abstract params with shardings, their shardings) from a boxed-params init function."""
    # Shapes and logical names only: no mesh context needed, so `mesh` may be an AbstractMesh.
    with nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(0))
    shardings = logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
    abstract = unbox(boxed)
    check_divisible(abstract, shardings)
    return with_shardings(abstract, shardings), shardings
