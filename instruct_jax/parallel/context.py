"""Run (and so trace) jitted functions inside a mesh and its logical-axis rules.

Flax resolves `nn.with_logical_constraint` against the rules active at trace time and drops
the constraint silently when none are; the rules context is not part of jit's cache key,
so every (mesh, rules) pair gets its own jitted function wrapped by `in_mesh_context`.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import flax.linen as nn
import jax


@contextlib.contextmanager
def mesh_and_rules(mesh, rules):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def in_mesh_context(fn: Callable, mesh, rules) -> Callable:
    """fn(*args) called inside the mesh and rules; `.lower(*args)` too (for AOT compiles and memory plans)."""

    def wrapped(*args):
        with mesh_and_rules(mesh, rules):
            return fn(*args)

    def lower(*args):
        with mesh_and_rules(mesh, rules):
            return fn.lower(*args)

    wrapped.lower = lower
    return wrapped


def logical_constraint(x, names):
    """`nn.with_logical_constraint`, except that a logical name the active rules do not know is an error
    (flax would replicate that dimension silently, as it does for parameters' names: parallel/sharding.py).
    Outside a rules context (plain eager or unsharded calls) it is flax's no-op."""
    rules = nn.get_logical_axis_rules()
    if rules:
        known = {name for name, _ in rules}
        unknown = [n for n in names if n is not None and n not in known]
        if unknown:
            from instruct_jax.errors import ConfigError

            raise ConfigError("mesh.rules", f"logical axis {unknown[0]!r} (of an activation constrained to "
                              f"{tuple(names)}) has no rule; known: {sorted(known)}")
    return nn.with_logical_constraint(x, names)

