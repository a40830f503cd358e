"""PPO's losses as small pure functions, each returning its diagnostics (cleanrl style).

Letters: B rows, T prompt length, N response slots, V vocab. `mask` [B, N] float32 marks a
response's tokens (up to and including its first stop token); every mean below is a per-token
mean over the mask, so nothing after a row's end contributes to a loss or a statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct_jax.ppo.advantages import masked_mean
from instruct_jax.train.losses import masked_loss_sum


def response_slice(x: jax.Array, prompt_len: int, n: int) -> jax.Array:
    """Per-position outputs [B, T + N, ...] of a prompt + response pass -> the N positions that predict
    the response tokens: index T - 1 + i predicts response token i (sampling.prompt_and_response)."""
    return jax.lax.slice_in_dim(x, prompt_len - 1, prompt_len - 1 + n, axis=1)


def logprobs_and_entropy(logits: jax.Array, tokens: jax.Array, temperature: float
                         ) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits / tau)[token] and the entropy of softmax(logits / tau): logits [B, N, V],
    tokens [B, N] -> ([B, N], [B, N]) float32. The same tau as the sampler, so a fresh pass reproduces
    the sampler's log-probs (up to float noise: `logprob_mismatch`)."""
    z = logits.astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(z, axis=-1)  # [B, N]
    logp = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0] - logz
    probs = jnp.exp(z - logz[..., None])
    entropy = logz - jnp.sum(probs * z, axis=-1)
    return logp, entropy


def policy_loss(logprobs: jax.Array, old_logprobs: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_ratio: float) -> tuple[jax.Array, dict]:
    """Clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)), r = pi / pi_old.

    Stats: approx_kl = 0.5 * mean((log r)^2) (lm-human-preferences), clipfrac = share of tokens where
    the clipped branch is the active one, max_ratio over valid tokens. On the first minibatch of the
    first epoch pi == pi_old, so r = 1, approx_kl = 0 and clipfrac = 0.
    """
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
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


def ptx_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Per-token mean next-token NLL of a pretraining / SFT batch [B, T, V] (PPO-ptx's extra term)."""
    total, count = masked_loss_sum(logits, targets, loss_mask)
    return total / jnp.maximum(count, 1.0)
