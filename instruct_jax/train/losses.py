"""Token-level language-model losses, always in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits, targets):
    """Negative log-likelihood of each target: logits [B, T, V], targets [B, T] -> [B, T] float32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def masked_loss_sum(logits, targets, loss_mask):
    """(sum of masked token losses, number of target tokens).

    Normalising by the token count of the whole (accumulated) batch, never averaging
    per-example means, weights every assistant token equally however examples are packed.
    """
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits, targets) * mask), jnp.sum(mask)
