"""Assemble mesh, model, optimizer, sharded state and jitted steps from a Config.

Shared by the SFT / pretraining trainer, tests and benchmarks, so every entry point builds
the same objects the same way: Mesh -> Model -> Shard -> Update.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax

from instruct_jax.config import Config, validate
from instruct_jax.model.transformer import Transformer, init_params_boxed
from instruct_jax.parallel.mesh import make_mesh
from instruct_jax.train.guards import GuardConfig
from instruct_jax.train.optimizer import freeze_base, learning_rate_schedule, make_optimizer
from instruct_jax.train.state import PhaseSetup, TrainState, state_shardings_for
from instruct_jax.train.step import make_eval_step, make_train_step


class LMSetup(PhaseSetup):
    """The SFT / pretraining phase's setup: `model` is the Transformer, `eval_step` returns loss sums."""


def abstract_lm_state(cfg: Config, mesh) -> tuple[TrainState, TrainState]:
    """(abstract TrainState with shardings, sharding tree) without allocating or compiling.

    `mesh` may be a jax.sharding.AbstractMesh of the experiment's real size (a 64-chip slice
    checked from a laptop).
    """
    init_boxed = functools.partial(init_params_boxed, Transformer(cfg.model))
    tx = freeze_base(make_optimizer(cfg.optim, cfg.train.steps), cfg.model)
    return state_shardings_for(init_boxed, tx, mesh, cfg.mesh.logical_rules())


def build_lm(cfg: Config, devices: Sequence | None = None) -> LMSetup:
    devices = list(devices if devices is not None else jax.devices())
    validate(cfg, num_devices=len(devices))
    # ---- Mesh
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.logical_rules()
    # ---- Model
    model = Transformer(cfg.model)
    init_boxed = functools.partial(init_params_boxed, model)
    # ---- Shard
    tx = freeze_base(make_optimizer(cfg.optim, cfg.train.steps), cfg.model)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    abstract_state, shardings = state_shardings_for(init_boxed, tx, mesh, rules)
    # ---- Update
    train_step = make_train_step(model, tx, schedule, mesh, rules, shardings, cfg.train.microbatches,
                                 GuardConfig.from_train(cfg.train))
    eval_step = make_eval_step(model, mesh, rules, shardings.params)
    return LMSetup(cfg, mesh, rules, model, tx, schedule, init_boxed, abstract_state, shardings, train_step, eval_step)
