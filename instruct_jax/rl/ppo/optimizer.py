"""PPO's optimizers: train/optimizer.py's AdamW, or the same with TensorFlow's epsilon placement.

lm-human-preferences trained with tf.train.AdamOptimizer, which adds epsilon to sqrt(v) *before*
the bias correction:

    TF:    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t);   update = lr_t * m / (sqrt(v) + eps)
    optax: update = lr * m_hat / (sqrt(v_hat) + eps),  m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t)

TF's form equals optax's with eps replaced by eps / sqrt(1 - b2^t), which is eps / sqrt(1 - b2) at
step 1 (about 31.6 x eps for b2 = 0.999): early updates on small gradients are much smaller than
optax's, which the "N+ implementation details of RLHF" replication found to matter (with eps 1e-5
and gradients around 1e-4, the first steps differ by several times).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from instruct_jax.config import OptimConfig
from instruct_jax.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask


class ScaleByTFAdamState(NamedTuple):
    count: jax.Array  # int32 scalar: updates taken
    mu: optax.Updates  # first moment, shaped like the params
    nu: optax.Updates  # second moment, shaped like the params


def scale_by_adam_tf_eps(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                         mu_dtype=None) -> optax.GradientTransformation:
    """Adam's direction with TensorFlow's epsilon: m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t))."""

    def init(params):
        mu = jax.tree.map(lambda p: jnp.zeros(p.shape, mu_dtype or p.dtype), params)
        nu = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        return ScaleByTFAdamState(count=jnp.zeros((), jnp.int32), mu=mu, nu=nu)

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        count = state.count + 1
        t = count.astype(jnp.float32)
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        eps_hat = eps / jnp.sqrt(c2)
        new = jax.tree.map(lambda m, v: (m.astype(jnp.float32) / c1) / (jnp.sqrt(v / c2) + eps_hat), mu, nu)
        return new, ScaleByTFAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def make_ppo_optimizer(cfg: OptimConfig, total_steps: int, tf_adam_eps: bool = False,
                       learning_rate: float = 0.0) -> optax.GradientTransformation:
    """train/optimizer.py's optimizer (clip -> Adam -> decoupled decay -> schedule) for `total_steps`
    optimizer steps; with tf_adam_eps the Adam direction uses TensorFlow's epsilon. `learning_rate`
    (> 0) replaces cfg.learning_rate (the value model's own peak rate)."""
    if learning_rate > 0:
        cfg = OptimConfig(**{**cfg.__dict__, "learning_rate": learning_rate})
    if not tf_adam_eps:
        return make_optimizer(cfg, total_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts += [scale_by_adam_tf_eps(cfg.b1, cfg.b2, cfg.eps, mu_dtype=jnp.dtype(cfg.mu_dtype)),
              optax.add_decayed_weights(cfg.weight_decay, mask=lambda p: weight_decay_mask(p, tuple(cfg.no_decay))),
              optax.scale_by_learning_rate(learning_rate_schedule(cfg, total_steps))]
    return optax.chain(*parts)
