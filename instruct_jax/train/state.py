"""Train state as a plain pytree, created already sharded over the mesh.

Recipe (big_vision / maxtext): eval_shape the boxed init to learn shapes and logical
axes -> map logical axes to NamedShardings with the rules -> jit(init, out_shardings=...)
so every device materialises only its own shard. The returned state holds plain arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

import flax.struct
import jax
import jax.numpy as jnp
import optax

from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.sharding import param_shardings_for, replicated, unbox, with_shardings
from instruct_jax.train.guards import GuardState


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # plain pytree of float32 arrays
    opt_state: Any  # optax state (moments shaped and sharded like params)
    rng: jax.Array  # base PRNG key; step s uses fold_in(rng, s)
    guard: GuardState = None  # numerical-guard counters (train/guards.py); None only in hand-built states


def opt_state_shardings(abstract_opt_state, params_def, param_shardings, mesh):
    """Subtrees shaped like the params (Adam moments) get the params' shardings; the rest replicates."""
    def is_param_tree(node):
        return jax.tree.structure(node) == params_def

    return jax.tree.map(lambda node: param_shardings if is_param_tree(node) else replicated(mesh),
                        abstract_opt_state, is_leaf=is_param_tree)


def state_shardings_for(init_boxed: Callable, tx: optax.GradientTransformation, mesh, rules):
    """Abstract TrainState (ShapeDtypeStructs carrying shardings) and its sharding tree."""
    abstract_params, p_shardings = param_shardings_for(init_boxed, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    o_shardings = opt_state_shardings(abstract_opt, jax.tree.structure(abstract_params), p_shardings, mesh)
    abstract_guard = jax.eval_shape(GuardState.zeros)
    g_shardings = jax.tree.map(lambda _: replicated(mesh), abstract_guard)
    shardings = TrainState(step=replicated(mesh), params=p_shardings, opt_state=o_shardings, rng=replicated(mesh),
                           guard=g_shardings)
    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh)),
        params=abstract_params,
        opt_state=with_shardings(abstract_opt, o_shardings),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh)),
        guard=with_shardings(abstract_guard, g_shardings))
    return abstract, shardings


def create_train_state(init_boxed: Callable, tx: optax.GradientTransformation, mesh, rules, seed: int,
                       params=None):
    """A freshly initialised (or params-given) TrainState, created directly in its shardings."""
    _, shardings = state_shardings_for(init_boxed, tx, mesh, rules)
    base = jax.random.PRNGKey(seed)
    init_rng, state_rng = jax.random.split(base)

    def init(given_params):
        p = unbox(init_boxed(init_rng)) if given_params is None else given_params
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=state_rng,
                          guard=GuardState.zeros())

    with mesh_and_rules(mesh, rules):
        if params is None:
            return jax.jit(lambda: init(None), out_shardings=shardings)()
        return jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings)(params)


@dataclasses.dataclass
class PhaseSetup:
    """What a training phase builds once from its config (Mesh -> Model -> Shard -> Update): the mesh and
    rules, the model, the optimizer, the abstract sharded state (for restore) and the jitted steps."""

    cfg: Any  # the phase's Config
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_boxed: Callable[[jax.Array], Any]
    abstract_state: TrainState  # ShapeDtypeStructs with target shardings (for restore)
    state_shardings: TrainState
    train_step: Callable  # (state, batch) -> (state, metrics)
    eval_step: Callable  # (params, batch) -> evaluation outputs

    def init_state(self, params=None) -> TrainState:
        return create_train_state(self.init_boxed, self.tx, self.mesh, self.rules, self.cfg.seed, params=params)

