"""The jitted language-model train and eval steps (SFT and plain next-token pretraining).

SFT and pretraining differ only in the data: SFT's loss mask covers assistant tokens,
pretraining's covers every real token. Each step is one jitted function with explicit
in/out shardings and the state donated; gradient accumulation is a lax.scan over
microbatches inside it, so the optimizer sees one token-weighted gradient per step.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from instruct_jax.data.loader import IMAGE_KEYS
from instruct_jax.data.packing import LM_KEYS
from instruct_jax.model.lora import freeze_base_grads
from instruct_jax.model.transformer import ModelInput, output_kernel
from instruct_jax.parallel.context import in_mesh_context
from instruct_jax.parallel.sharding import batch_sharding, logical_to_spec, replicated
from instruct_jax.train.guards import GuardConfig, guard_decision, guard_metrics, guarded_apply
from instruct_jax.train.losses import fused_masked_loss_sum, masked_loss_sum
from instruct_jax.train.optimizer import applied_updates
from instruct_jax.train.state import TrainState

Batch = dict  # tokens, targets, loss_mask, positions, segment_ids: each [B, T] (+ images, image_mask: data/packing.py)


def lm_batch_shardings(mesh, rules, cfg) -> dict:
    """Shardings of an LM batch: token arrays over (batch, length); with model.vision, the image slots
    (`images` [B, M, H, W, C], `image_mask` [B, M]) over batch only, and with vision.prefix_lm the `prefix`
    flags like the tokens."""
    rows = batch_sharding(mesh, rules)
    out = {key: rows for key in LM_KEYS}
    if cfg.vision.enabled:
        out.update({key: batch_sharding(mesh, rules, ndim=1) for key in IMAGE_KEYS})
        if cfg.vision.prefix_lm:
            out["prefix"] = rows
    return out


def split_microbatches(batch: Batch, num_micro: int, rules) -> Batch:
    """[B, T] -> [M, B/M, T], microbatch m = rows m, m+M, m+2M, ...

    Taking every M-th row (instead of contiguous blocks) keeps each microbatch spread
    over all batch shards with no data movement: with rows sharded contiguously over
    devices, each device already holds its share of every microbatch.
    """
    spec = logical_to_spec((None, "batch", "length"), rules)
    rows_only = logical_to_spec((None, "batch"), rules)

    def split(key, x):
        b = x.shape[0]
        x = x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, rows_only if key in IMAGE_KEYS else spec)

    return {key: split(key, x) for key, x in batch.items()}


def lm_loss_sum(model: nn.Module, params, batch: Batch):
    """(sum of masked next-token losses, number of target tokens) of an LM batch. With model.loss_chunk the
    logits are computed a chunk of positions at a time, never [B, T, V] (losses.py); the training step,
    the evaluation and PPO-ptx all go through here."""
    if model.cfg.loss_chunk:
        out = model.apply({"params": params}, ModelInput.from_batch(batch), compute_logits=False)
        return fused_masked_loss_sum(out.hidden, output_kernel(model.cfg, params), batch["targets"],
                                     batch["loss_mask"], model.cfg.loss_chunk)
    out = model.apply({"params": params}, ModelInput.from_batch(batch))
    return masked_loss_sum(out.logits, batch["targets"], batch["loss_mask"])


def lm_loss_and_grads(model: nn.Module, params, batch: Batch, num_micro: int, rules, grad_shardings):
    """(loss, grads, token count) with loss = sum of masked token losses / number of target tokens."""

    def loss_sum(p, micro):
        return lm_loss_sum(model, p, micro)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def accumulate(carry, micro):
        grads_acc, total, count = carry
        (s, n), g = grad_fn(params, micro)
        g = freeze_base_grads(g, model.cfg.lora_train)  # LoRA: no gradient for the frozen base
        grads_acc = jax.tree.map(jnp.add, grads_acc, g)
        grads_acc = jax.lax.with_sharding_constraint(grads_acc, grad_shardings)
        return (grads_acc, total + s, count + n), None

    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
    micro = split_microbatches(batch, num_micro, rules)
    (grads, total, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
    denom = jnp.maximum(count, 1.0)
    return total / denom, jax.tree.map(lambda g: g / denom, grads), count


def guarded_optimizer_step(tx: optax.GradientTransformation, state: TrainState, grads, loss,
                           guard: GuardConfig) -> tuple[TrainState, dict]:
    """The optimizer update if the guard allows it (train/guards.py), else params and optimizer state
    unchanged; the step advances either way. Returns (state, grad_norm + guard metrics)."""
    grad_norm = optax.tree.norm(grads)
    apply, new_guard = guard_decision(state.guard, loss, grad_norm, guard)

    def update():
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state

    params, opt_state = guarded_apply(apply, update, (state.params, state.opt_state))
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, guard=new_guard)
    return new, {"grad_norm": grad_norm, **guard_metrics(new_guard)}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    mesh, rules, state_shardings: TrainState, num_micro: int = 1,
                    guard: GuardConfig = GuardConfig()) -> Callable:
    """Returns step(state, batch) -> (state, metrics); traced under this mesh and rules only."""

    def step(state: TrainState, batch: Batch):
        loss, grads, count = lm_loss_and_grads(model, state.params, batch, num_micro, rules,
                                               state_shardings.params)
        new, guard_stats = guarded_optimizer_step(tx, state, grads, loss, guard)
        metrics = {"loss": loss, "lr": schedule(applied_updates(state.opt_state)), "target_tokens": count,
                   **guard_stats}
        return new, metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, lm_batch_shardings(mesh, rules, model.cfg)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    return in_mesh_context(jitted, mesh, rules)


def make_eval_step(model: nn.Module, mesh, rules, param_shardings) -> Callable:
    """Returns eval(params, batch) -> {loss_sum, tokens}; callers sum over batches, then divide."""

    def evaluate(params, batch: Batch):
        total, count = lm_loss_sum(model, params, batch)
        return {"loss_sum": total, "tokens": count}

    jitted = jax.jit(evaluate, in_shardings=(param_shardings, lm_batch_shardings(mesh, rules, model.cfg)),
                     out_shardings=replicated(mesh))
    return in_mesh_context(jitted, mesh, rules)

