"""PPO's losses as small pure functions, each returning its diagnostics (cleanrl style).

Letters: B rows, T prompt length, N response slots, V vocab. `mask` [B, N] float32 marks a
response's tokens (up to and including its first stop token); every mean below is a per-token
mean over the mask, so nothing after a row's end contributes to a loss or a statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct_jax.rl.advantages import aggregate, masked_mean
from instruct_jax.rl.rewards import kl_estimate


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_ratio: float, aggregation: str = "token") -> tuple[jax.Array, dict]:
    """Clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = pi / pi_old,
    the mean taken as `aggregation` says (advantages.aggregate: token, sequence or constant).

    Stats: approx_kl = 0.5 * mean((log r)^2) (lm-human-preferences), clipfrac = share of tokens where
    the clipped branch is the active one, max_ratio over valid tokens. On the first minibatch of the
    first epoch pi == pi_old, so r = 1, approx_kl = 0 and clipfrac = 0.
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = aggregate(jnp.maximum(unclipped, clipped), mask, aggregation)
    stats = {
        "approx_kl": 0.5 * masked_mean(jnp.square(log_ratio), mask),
        "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), mask),
        "max_ratio": jnp.max(jnp.where(mask > 0, ratio, 0.0)),
        "ratio_mean": masked_mean(ratio, mask),
    }
    return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               value_clip: float) -> tuple[jax.Array, dict]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2),
    V_clip = V_old + clip(V - V_old, -c, c) (lm-human-preferences `cliprange_value`)."""
    clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
    loss_unclipped = jnp.square(values - returns)
    loss_clipped = jnp.square(clipped_values - returns)
    loss = 0.5 * masked_mean(jnp.maximum(loss_unclipped, loss_clipped), mask)
    return loss, {"value_clipfrac": masked_mean((loss_clipped > loss_unclipped).astype(jnp.float32), mask)}


def ptx_loss(total: jax.Array, count: jax.Array) -> jax.Array:
    """Per-token mean next-token NLL of a pretraining / SFT batch (PPO-ptx's extra term) from its summed loss
    and token count (train/step.py `lm_loss_sum`, chunked when the model's loss_chunk is set)."""
    return total / jnp.maximum(count, 1.0)


def kl_loss(logprobs: jax.Array, ref_logprobs: jax.Array, mask: jax.Array, aggregation: str = "token") -> jax.Array:
    """KL to the reference as a loss term (ppo.kl_in = "loss", GRPO): the k3 estimator per token,
    exp(l_ref - l) - 1 - (l_ref - l) >= 0 on the rollout's tokens, aggregated like the policy loss. Its gradient
    is the reverse-KL gradient only in expectation over on-policy tokens (Schulman 2020)."""
    return aggregate(kl_estimate(logprobs, ref_logprobs, "k3"), mask, aggregation)
