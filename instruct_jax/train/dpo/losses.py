"""DPO numerics, pure: sequence log-probs of ranked responses and the preference losses over their pairs.

A ranking batch (data/packing.py `ranking_row`) holds K responses per prompt, [B, K, T], each prompt + answer +
end-of-turn with `loss_mask` on the answer's tokens (the end-of-turn included). The policy's implicit reward of a
response is r = beta * (log pi(y | x) - log pi_ref(y | x)), the log-probs summed over the answer's tokens.

    sigmoid (DPO):  per non-tied pair (i ranked above j):  -log sigmoid(r_i - r_j)
    ipo:            per pair:  (h_ij - 1 / (2 beta))^2,  h_ij = (log-ratio of i) - (log-ratio of j)
    plackett_luce:  per response i ranked above some other:  -log( exp(r_i) / sum_{j ranked no better} exp(r_j) )

The Plackett-Luce form (the DPO paper's K-wise model) is the negative log-likelihood of the whole ranking as
successive choices: the best response chosen from all, the next from the rest, ...; a tied group is chosen as
Breslow's partial likelihood does (each member against the group and everything below it). Its terms are averaged
over a ranking's choices, so at K = 2 it is exactly the sigmoid loss.

Every non-tied pair of a ranking counts (pairwise data is K = 2); a prompt's pairs are averaged, then prompts,
as in the reward model's K-wise loss (train/rm/ranking.py), so a K = 9 ranking does not weigh 36 times a pair.
The sigmoid form *is* that loss with the implicit rewards in place of the reward model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.context import logical_constraint
from instruct_jax.train.losses import token_nll
from instruct_jax.train.rm.ranking import better_pairs, ranking_loss_sum


def sequence_logprobs(model, params, batch: dict) -> jax.Array:
    """[B, K] float32: sum over each response's answer tokens (loss_mask) of log p(token | everything before)."""
    b, k, t = batch["tokens"].shape

    def flat(x):  # [B, K, T] -> [B * K, T]; rows stay on the devices holding their prompt
        return logical_constraint(x.reshape(b * k, t), ("batch", "length"))

    out = model.apply({"params": params}, ModelInput(flat(batch["tokens"]), flat(batch["positions"]),
                                                     flat(batch["segment_ids"])))
    nll = token_nll(out.logits, flat(batch["targets"]))  # [B * K, T]
    return -jnp.sum(nll * flat(batch["loss_mask"]).astype(jnp.float32), axis=-1).reshape(b, k)


def preference_loss_sum(policy_logps: jax.Array, reference_logps: jax.Array, ranks: jax.Array, beta: float,
                        loss: str = "sigmoid"):
    """(sum over prompts of the per-prompt mean pair loss, prompts with a pair, stats) of [B, K] log-probs.

    Sums, not means, so microbatches accumulate exactly. stats (sums over the non-tied pairs): "correct" (pair
    credit of the implicit rewards: 1, 1/2 on a tie, 0), "pairs", "chosen" and "rejected" (implicit rewards of
    the better and the worse response of each pair).
    """
    ratios = (policy_logps - reference_logps).astype(jnp.float32)
    rewards = beta * ratios
    pairs = better_pairs(ranks)
    if loss == "sigmoid":
        total, prompts, stats = ranking_loss_sum(rewards, ranks)
    elif loss == "ipo":
        gap = ratios[:, :, None] - ratios[:, None, :]
        per_pair = jnp.square(gap - 1.0 / (2.0 * beta))
        n = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)
        per_prompt = jnp.sum(jnp.where(pairs, per_pair, 0.0), axis=(1, 2)) / jnp.maximum(n, 1.0)
        total, prompts = jnp.sum(jnp.where(n > 0, per_prompt, 0.0)), jnp.sum(n > 0).astype(jnp.float32)
        stats = _pair_stats(rewards, pairs)
    elif loss == "plackett_luce":
        real = ranks > 0
        # at_risk[b, i, j]: j is still to be chosen when i is (ranked no better than i: i itself, ties, below)
        at_risk = (ranks[:, None, :] >= ranks[:, :, None]) & real[:, :, None] & real[:, None, :]
        chooses = jnp.any(pairs, axis=2)  # i is ranked above some response: its choice is a term
        log_z = jax.nn.logsumexp(jnp.where(at_risk, rewards[:, None, :], -1e30), axis=2)  # finite where all masked
        n = jnp.sum(chooses, axis=1).astype(jnp.float32)
        per_prompt = jnp.sum(jnp.where(chooses, log_z - rewards, 0.0), axis=1) / jnp.maximum(n, 1.0)
        total, prompts = jnp.sum(jnp.where(n > 0, per_prompt, 0.0)), jnp.sum(n > 0).astype(jnp.float32)
        stats = _pair_stats(rewards, pairs)
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; expected sigmoid, ipo or plackett_luce")
    weights = pairs.astype(jnp.float32)
    stats["chosen"] = jnp.sum(weights * rewards[:, :, None])
    stats["rejected"] = jnp.sum(weights * rewards[:, None, :])
    return total, prompts, stats


def _pair_stats(rewards: jax.Array, pairs: jax.Array) -> dict:
    """The sigmoid loss's stats for the other losses: pair credit of the implicit rewards over the non-tied pairs
    (1, 1/2 on a tie, 0; integer sums, as `ranking_loss_sum` counts them) and the number of pairs."""
    diff = rewards[:, :, None] - rewards[:, None, :]
    credit = jnp.sum(pairs & (diff > 0)) + 0.5 * jnp.sum(pairs & (diff == 0))
    return {"correct": credit.astype(jnp.float32), "pairs": jnp.sum(pairs.astype(jnp.float32))}
