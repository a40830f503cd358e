"""Masked statistics, whitening and GAE: the numerics between rewards and the PPO loss.

Letters: B rows, N response slots. `mask` [B, N] is 1.0 on a response's tokens (up to and
including its first stop token) and 0.0 after; nothing after a row's end enters a statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask == 1 (0 when the mask is empty)."""
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True) -> jax.Array:
    """Variance of x over mask == 1; with `unbiased`, Bessel-corrected (n / (n - 1)), as lm-human-preferences.

    x [1, 2, 3, 100], mask [1, 1, 1, 0] -> mean 2, biased var 2/3, unbiased 1.
    """
    n = jnp.sum(mask)
    mean = masked_mean(x, mask)
    var = jnp.sum(jnp.square(x - mean) * mask) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / sqrt(var + eps) over the masked entries; shift_mean=False adds the mean back
    (only the scale changes: lm-human-preferences' reward whitening). Entries outside the mask are 0.

    x [1, 2, 3, 100], mask [1, 1, 1, 0] -> [-1, 0, 1, 0] (mean 2, unbiased var 1), or with
    shift_mean=False [1, 2, 3, 0].
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row's response, as a reverse lax.scan over N.

        delta_t = r_t + gamma * V_{t+1} - V_t,   V_N = 0 and V_{t+1} = 0 after the row's end
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + V                            (computed before any whitening of A)

    rewards, values, mask: [B, N]. Masked entries of A and returns are 0, and a row's last token
    bootstraps from 0 (the episode ends at t_end). Returns (advantages [B, N], returns [B, N]).
    """
    rewards = rewards * mask
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)  # [B, N]
    deltas = rewards + gamma * next_values * jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1) \
        - values

    def step(next_adv, xs):  # scans t = N-1 .. 0; carry A_{t+1} [B]
        delta, m = xs
        adv = (delta + gamma * lam * next_adv) * m
        return adv, adv

    _, adv = jax.lax.scan(step, jnp.zeros(rewards.shape[:1], rewards.dtype), (deltas.T, mask.T), reverse=True)
    advantages = adv.T  # [B, N]
    return advantages, (advantages + values) * mask


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    """1 - Var[returns - values] / Var[returns] over valid tokens (1 = perfect, 0 = a constant, < 0 worse)."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / jnp.maximum(var_returns, 1e-8)
