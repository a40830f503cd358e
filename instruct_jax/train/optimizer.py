"""AdamW with warmup + decay, global-norm clipping and a weight-decay mask, from OptimConfig."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from instruct_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup 0 -> peak over warmup_steps, then cosine / linear / constant to the end."""
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, floor, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def weight_decay_mask(params, no_decay: tuple[str, ...]):
    """True for params that decay: every path not containing one of `no_decay` (norm scales, biases, ...)."""
    def decays(path, _):
        name = jax.tree_util.keystr(path).lower()
        return not any(s in name for s in no_decay)
    return jax.tree_util.tree_map_with_path(decays, params)


def applied_updates(opt_state) -> jax.Array:
    """How many updates the optimizer has applied: the schedule's own count (a guarded step that skips its
    update advances the train step but not this), so `schedule(applied_updates(opt_state))` is the learning
    rate the next applied update uses."""
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState)]
    if not counts:
        raise ValueError("the optimizer state has no learning-rate schedule count (optax.ScaleByScheduleState)")
    return counts[0]


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=lambda p: weight_decay_mask(p, tuple(cfg.no_decay)), mu_dtype=jnp.dtype(cfg.mu_dtype)))
    return optax.chain(*parts)


def freeze_base(tx: optax.GradientTransformation, model_cfg) -> optax.GradientTransformation:
    """With LoRA (model.lora_rank > 0): `tx` on the adapters and any scalar head (model/lora.py `is_trainable`), its
    state allocated for those alone, and zero updates for the frozen base; otherwise `tx` itself."""
    if not model_cfg.lora_rank:
        return tx
    from instruct_jax.model.lora import is_trainable

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "train" if is_trainable(p, tuple(model_cfg.lora_train)) else "frozen", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
