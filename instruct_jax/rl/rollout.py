"""From sampled responses to PPO's training batch (the "experience"): one pure function.

Letters: B rows, T prompt length, N response slots, V vocab.

Sampling itself is `instruct_jax.inference.sampling.sample` (prefill + decode_step in a lax.while_loop, the
one decoding loop of the codebase). `make_experience` takes its output and runs one full forward
pass per model over prompt + response [B, T + N] (no dropout exists in the model; the same
temperature as the sampler), reading every per-token quantity at the position that predicts the
token: index T - 1 + i for response token i.

    policy    (trained)  -> old log-probs l_t, entropy                 [B, N]
    reference (frozen)   -> l_ref_t                                     [B, N]
    value     (trained)  -> V_t (trunk + scalar head, RM-initialised)   [B, N]
    reward    (frozen)   -> score at the response's stop token          [B]

then rewards (rewards.py), GAE and whitening (advantages.py). Everything after a row's end
(its first stop token, or N - 1) is masked: V, rewards, advantages and returns are 0 there.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from instruct_jax.config import PPOConfig
from instruct_jax.inference.logprobs import policy_outputs, value_index
from instruct_jax.inference.sampling import SampleOutput, prompt_and_response
from instruct_jax.model.heads import RewardModel
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.sharding import logical_to_spec
from instruct_jax.rl.advantages import (GROUP_ALGORITHMS, explained_variance, gae, group_advantages, masked_mean,
                                       masked_var, masked_whiten)
from instruct_jax.rl.rewards import (RewardFn, apply_missing_eos, first_stop, kl_estimate, response_mask,
                                     scoring_input, sequence_kl, token_rewards)


@flax.struct.dataclass
class Experience:
    """One rollout batch, everything the update reads plus what the diagnostics read. Rows first."""

    inputs: ModelInput  # [B, T + N] prompt + response (sampling.prompt_and_response)
    response: jax.Array  # [B, N] int32 sampled tokens, pad after the stop token
    mask: jax.Array  # [B, N] float32: 1 up to and including the first stop token
    lengths: jax.Array  # [B] int32 response tokens (stop token included)
    done: jax.Array  # [B] bool: the response emitted a stop token
    sampler_logprobs: jax.Array  # [B, N] float32 log-probs recorded while sampling
    logprobs: jax.Array  # [B, N] float32 old-policy log-probs from the full forward pass
    ref_logprobs: jax.Array  # [B, N] float32 reference log-probs
    values: jax.Array  # [B, N] float32 V_t, 0 after the end
    scores: jax.Array  # [B] float32 score after the missing-EOS penalty
    rewards: jax.Array  # [B, N] float32 per-token rewards (before any reward whitening)
    advantages: jax.Array  # [B, N] float32 GAE advantages, whitened over valid tokens (rloo / grpo: the
    #                        response's group advantage on each of its tokens, not whitened)
    returns: jax.Array  # [B, N] float32 advantages + values, before whitening (rloo / grpo: 0, no value model)

    @classmethod
    def shardings(cls, mesh, rules, images: bool = False, prefix: bool = False) -> "Experience":
        """Rows over the batch mesh axes, everything else whole (images: the prompts' image slots, by rows)."""
        rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))
        rows_2d = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
        return cls(inputs=prompt_shardings(mesh, rules, images, prefix), response=rows_2d, mask=rows_2d, lengths=rows,
                   done=rows, sampler_logprobs=rows_2d, logprobs=rows_2d, ref_logprobs=rows_2d, values=rows_2d,
                   scores=rows, rewards=rows_2d, advantages=rows_2d, returns=rows_2d)


def prompt_shardings(mesh, rules, images: bool = False, prefix: bool = False) -> ModelInput:
    """A prompt (or prompt + response) ModelInput's shardings: [B, T] rows over the batch axes, and with images
    the [B, M, H, W, C] image slots by rows (prefix: the prefix-LM flags like the tokens)."""
    rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    rows_2d = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    return ModelInput(rows_2d, rows_2d, rows_2d, rows if images else None, rows_2d if prefix else None)


def prompt_input(batch: dict) -> ModelInput:
    """The prompt ModelInput of a prompt batch (data/packing.py `prompt_row`, with its image slots and prefix
    flags if any)."""
    return ModelInput(batch["tokens"], batch["positions"], batch["segment_ids"], batch.get("images"),
                      batch.get("prefix"))


def sample_from_tokens(response: jax.Array, stop_tokens: tuple[int, ...], pad_id: int,
                       logprobs: jax.Array | None = None) -> SampleOutput:
    """A SampleOutput for given response tokens [B, N] (teacher forcing): cut at the first stop token,
    pad after it, as the sampler would have. Sampler log-probs default to 0 (mismatch then = |l|)."""
    lengths, done = first_stop(response, stop_tokens)
    mask = response_mask(lengths, response.shape[1])
    tokens = jnp.where(mask > 0, response, pad_id).astype(jnp.int32)
    logprobs = jnp.zeros(response.shape, jnp.float32) if logprobs is None else logprobs * mask
    return SampleOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, done=done)


def value_outputs(model: RewardModel, params, inputs: ModelInput, prompt_len: int, n: int) -> jax.Array:
    """V_t [B, N]: the value model's scalar head at each position that predicts a response token."""
    b = inputs.tokens.shape[0]
    return model.apply({"params": params}, inputs, jnp.broadcast_to(value_index(prompt_len, n), (b, n)))


def make_experience(policy_model: Transformer, value_model: RewardModel, reward_fn: RewardFn, hp: PPOConfig,
                    eot_id: int, policy_params, ref_params, value_params, reward_params, prompt: ModelInput,
                    sample: SampleOutput, kl_coef: jax.Array) -> tuple[Experience, dict]:
    """The training batch of one rollout, and its diagnostics (scalars). Pure and jittable."""
    t = prompt.tokens.shape[1]
    n = sample.tokens.shape[1]
    inputs = prompt_and_response(prompt, sample)  # [B, T + N]
    mask = response_mask(sample.lengths, n)  # [B, N]

    logprobs, entropy = policy_outputs(policy_model, policy_params, inputs, sample.tokens, t, hp.temperature)
    ref_logprobs, _ = policy_outputs(policy_model, ref_params, inputs, sample.tokens, t, hp.temperature)
    critic_free = hp.algorithm in GROUP_ALGORITHMS
    values = jnp.zeros_like(mask) if critic_free else value_outputs(value_model, value_params, inputs, t, n) * mask

    score_inputs, score_index = scoring_input(prompt, sample.tokens, sample.lengths, sample.done, eot_id)
    raw_scores = reward_fn(reward_params, score_inputs, score_index, sample.tokens, mask).astype(jnp.float32)
    scores = apply_missing_eos(raw_scores, sample.done, hp.missing_eos, hp.missing_eos_score,
                               hp.missing_eos_penalty)

    k1 = kl_estimate(logprobs, ref_logprobs, "k1") * mask
    kl = kl_estimate(logprobs, ref_logprobs, hp.kl_estimator) * mask
    reward_kl_coef = kl_coef if hp.kl_in == "reward" else 0.0  # kl_in = "loss": the update adds the KL term
    rewards = token_rewards(scores, kl, reward_kl_coef, sample.lengths)  # [B, N]
    if critic_free:  # one advantage per response, against its group of k samples of the same prompt
        seq_adv = group_advantages(jnp.sum(rewards, axis=1), hp.group_size, hp.algorithm, hp.group_std_normalize)
        advantages = whitened = seq_adv[:, None] * mask
        returns = jnp.zeros_like(mask)
    else:
        gae_rewards = masked_whiten(rewards, mask, shift_mean=False) if hp.whiten_rewards else rewards
        advantages, returns = gae(gae_rewards, values, mask, hp.gamma, hp.lam)
        whitened = masked_whiten(advantages, mask)

    seq_kl = sequence_kl(k1, mask)  # [B]
    stats = {
        "score": jnp.mean(scores),
        "raw_score": jnp.mean(raw_scores),
        "kl": jnp.mean(seq_kl),
        "kl_penalty": jnp.mean(sequence_kl(kl, mask)),  # per-sequence sum of the estimator in the reward
        "negative_kl_sequences": jnp.sum(seq_kl < 0).astype(jnp.float32),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "entropy": masked_mean(entropy, mask),
        "explained_variance": explained_variance(values, returns, mask),
        "response_length": jnp.mean(sample.lengths.astype(jnp.float32)),
        "eos_rate": jnp.mean(sample.done.astype(jnp.float32)),
        "logprob_mismatch": masked_mean(jnp.abs(sample.logprobs - logprobs), mask),
        "logprob_mismatch_max": jnp.max(jnp.abs(sample.logprobs - logprobs) * mask),
        "reward_total": jnp.mean(jnp.sum(rewards, axis=1)),
        "value_mean": masked_mean(values, mask),
        "return_mean": masked_mean(returns, mask),
        "advantage_std": jnp.sqrt(masked_var(advantages, mask)),
    }
    if critic_free:  # no value model: report the spread of rewards inside each group instead
        for key in ("explained_variance", "value_mean", "return_mean"):
            del stats[key]
        groups = jnp.sum(rewards, axis=1).reshape(-1, hp.group_size)
        stats["group_reward_std"] = jnp.mean(jnp.std(groups, axis=1))
        stats["zero_advantage_groups"] = jnp.mean((jnp.max(groups, axis=1) == jnp.min(groups, axis=1)).astype(jnp.float32))
    experience = Experience(inputs=inputs, response=sample.tokens, mask=mask, lengths=sample.lengths,
                            done=sample.done, sampler_logprobs=sample.logprobs, logprobs=logprobs,
                            ref_logprobs=ref_logprobs, values=values, scores=scores, rewards=rewards,
                            advantages=whitened, returns=returns)
    return experience, stats
