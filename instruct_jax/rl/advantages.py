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


# ----------------------------------------------------------------------------- critic-free (RLOO, GRPO)
GROUP_ALGORITHMS = ("rloo", "grpo")  # ppo.algorithm values with no value model: a group baseline instead
LOSS_AGGREGATIONS = ("token", "sequence", "constant")


def group_advantages(rewards: jax.Array, group_size: int, algorithm: str, std_normalize: bool = True,
                     eps: float = 1e-4) -> jax.Array:
    """Sequence advantages [R] from sequence rewards [R], rows in groups of k = group_size consecutive samples of
    one prompt (R = G * k):

        rloo  A_i = R_i - mean_{j != i} R_j            (Ahmadian et al. 2024; = k / (k - 1) * (R_i - mean R))
        grpo  A_i = (R_i - mean R) / (std R + eps)     (Shao et al. 2024; std with Bessel's correction)
              A_i =  R_i - mean R                      (std_normalize False: Dr. GRPO, Liu et al. 2025)

    A group whose rewards are all equal gets A = 0 in every form. Example (k = 3): R = [1, 2, 6] ->
    rloo [-3, -1.5, 4.5]; grpo, unnormalised [-2, -1, 3], normalised [-0.7559, -0.378, 1.1339].
    """
    if group_size < 2:
        raise ValueError(f"a group baseline needs >= 2 samples per prompt, got {group_size}")
    g = rewards.reshape(-1, group_size)
    total = jnp.sum(g, axis=1, keepdims=True)
    if algorithm == "rloo":
        adv = g - (total - g) / (group_size - 1)
    elif algorithm == "grpo":
        adv = g - total / group_size
        if std_normalize:
            adv = adv / (jnp.std(g, axis=1, keepdims=True, ddof=1) + eps)
    else:
        raise ValueError(f"algorithm must be one of {GROUP_ALGORITHMS}, got {algorithm!r}")
    return adv.reshape(rewards.shape)


def aggregate(x: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """A per-token loss [B, N] to a scalar (ppo.loss_aggregation):

        token     sum(x * m) / sum(m)                      every token of the minibatch weighs the same
        sequence  mean_b [ sum_t(x * m)_b / sum_t m_b ]    every response weighs the same (GRPO's paper)
        constant  sum(x * m) / (B * N)                     a fixed denominator (Dr. GRPO: no length bias)

    x [[1, 1], [4, 0]], m [[1, 1], [1, 0]] -> token 2, sequence 2.5, constant 1.5.
    """
    if mode == "token":
        return masked_mean(x, mask)
    if mode == "sequence":
        per_row = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        return jnp.mean(per_row)
    if mode == "constant":
        return jnp.sum(x * mask) / (mask.shape[0] * mask.shape[1])
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {mode!r}")
