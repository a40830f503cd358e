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
