"""Log-probabilities of a sampled response under a policy: the one definition PPO's rollouts and
updates, evaluation and the policy runner share.

Letters: B rows, T prompt length, N response slots, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct_jax.model.transformer import ModelInput, Transformer


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


def value_index(prompt_len: int, n: int) -> jax.Array:
    """[1, N]: the positions of a [B, T + N] pass whose hidden states predict response tokens 0..N-1."""
    return prompt_len - 1 + jnp.arange(n, dtype=jnp.int32)[None, :]


def policy_outputs(model: Transformer, params, inputs: ModelInput, response: jax.Array, prompt_len: int,
                   temperature: float) -> tuple[jax.Array, jax.Array]:
    """(log-probs, entropies) [B, N] of the response under `params`, one forward over [B, T + N].

    Logits are computed only at the N positions that predict response tokens (`logits_at`), never
    over the prompt: the vocabulary projection and the [B, T + N, V] logits were the largest part of
    scoring and of the update's forward and backward passes.
    """
    b, n = response.shape
    at = jnp.broadcast_to(value_index(prompt_len, n), (b, n))
    logits = model.apply({"params": params}, inputs, logits_at=at).logits  # [B, N, V]
    return logprobs_and_entropy(logits, response, temperature)
