"""Reward model numerics: the K-wise ranking loss, the jitted steps, normalization and evaluation.

A ranking batch (data/packing.py `ranking_row`) holds, per prompt b, K response sequences
[B, K, T] (prompt + response + end-of-turn, right-padded on their own line), `ranks` [B, K]
(1 = best, ties share a rank, 0 = empty slot) and `lengths` [B, K]. Each sequence is forwarded
once (K forwards per prompt, not 2 * C(K, 2)) and scored at its end-of-turn token, index
lengths - 1. The loss is InstructGPT's (Ouyang et al. 2022, eq. 1):

    loss_b = mean over the n_b non-tied pairs (i better than j) of -log sigmoid(r_i - r_j - margin)
    loss   = mean of loss_b over the prompts with n_b > 0

so all C(K, 2) comparisons of one prompt form a single batch element: a prompt with K = 9 does
not weigh 36 times a pairwise one, and the model sees each response once per step (InstructGPT
found that treating comparisons as independent examples overfits). Pairwise data is K = 2.

Scores: raw rewards become gain * raw + bias (`apply_normalization`), fitted after training so
that reference demonstrations score mean 0 (and std 1 if asked). `reward_scores` (inference/scorer.py) is the one
scoring function every consumer (evaluation, `score`, PPO) calls.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from instruct_jax.model.heads import RewardModel
from instruct_jax.model.lora import freeze_base_grads
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.context import in_mesh_context, logical_constraint
from instruct_jax.parallel.sharding import logical_to_spec, replicated
from instruct_jax.train.guards import GuardConfig
from instruct_jax.train.state import TrainState
from instruct_jax.train.optimizer import applied_updates
from instruct_jax.train.step import guarded_optimizer_step

RANKING_KEYS = ("tokens", "positions", "segment_ids", "ranks", "lengths")  # what the steps read


def ranking_keys(cfg) -> tuple:
    """The batch keys the steps read for a model config: RANKING_KEYS, `images` with model.vision and `prefix`
    with vision.prefix_lm."""
    v = cfg.vision
    return RANKING_KEYS + (("images",) if v.enabled else ()) + (("prefix",) if v.enabled and v.prefix_lm else ())
IDENTITY_NORM = {"gain": 1.0, "bias": 0.0}


# ----------------------------------------------------------------------------- the loss (pure)
def pair_credit(diff):
    """Credit of a comparison from r_better - r_worse (numpy or jax, any shape): 1 if > 0, 1/2 on a tie, 0 if < 0.

    The one tie rule of the codebase (instructgpt/statistics.py `pair_agreement` and the win rates count a
    tie 1/2 too): a scorer that gives every answer the same reward gets 0.5, chance, not 0.
    pair_credit([0.3, 0.0, -2.0]) = [1.0, 0.5, 0.0].

    (The jitted step counts the same credit as integer sums, `ranking_loss_sum`: with the float form inside the
    sharded step, a run resumed with its program from the persistent compilation cache deadlocked in an XLA CPU
    collective rendezvous, tests/test_reward_resume.py.)
    """
    return (diff > 0) * 1.0 + (diff == 0) * 0.5


def better_pairs(ranks: jax.Array) -> jax.Array:
    """ranks [B, K] -> bool [B, K, K]: pairs[b, i, j] iff response i is ranked strictly above j.

    Empty slots (rank 0) and ties take part in no pair. ranks [1, 2, 2, 0] ->
        [[F, T, T, F],      0 beats 1 and 2
         [F, F, F, F],      1 and 2 tie
         [F, F, F, F],
         [F, F, F, F]]      slot 3 is empty
    """
    real = ranks > 0
    return (ranks[:, :, None] < ranks[:, None, :]) & real[:, :, None] & real[:, None, :]


def ranking_loss_sum(rewards: jax.Array, ranks: jax.Array, margin: float = 0.0):
    """(sum over prompts of the per-prompt mean pair loss, number of prompts with a pair, stats).

    rewards [B, K] float, ranks [B, K] int. Sums, not means, so microbatches accumulate exactly:
    the batch loss is total / prompts. stats = {"correct": sum over pairs of `pair_credit(r_i - r_j)`
    (a reward tie counts 1/2), "pairs": pairs}.

    Worked example (one prompt, K slots 4): rewards [1, 2, 0, 5], ranks [1, 2, 2, 0]. Pairs (0, 1)
    and (0, 2); (1, 2) tie; slot 3 is empty. Loss = mean(-log s(1 - 2), -log s(1 - 0))
    = mean(1.3133, 0.3133) = 0.8133 over 1 prompt.
    """
    pairs = better_pairs(ranks)  # [B, K, K]
    rewards = rewards.astype(jnp.float32)
    diff = rewards[:, :, None] - rewards[:, None, :]  # [B, K, K]: r_i - r_j
    nll = jax.nn.softplus(-(diff - margin))  # -log sigmoid(x) = softplus(-x), stable for any x
    n = jnp.sum(pairs, axis=(1, 2)).astype(jnp.float32)  # [B] non-tied pairs per prompt
    per_prompt = jnp.sum(jnp.where(pairs, nll, 0.0), axis=(1, 2)) / jnp.maximum(n, 1.0)
    has_pair = n > 0
    credit = jnp.sum(pairs & (diff > 0)) + 0.5 * jnp.sum(pairs & (diff == 0))
    stats = {"correct": credit.astype(jnp.float32), "pairs": jnp.sum(n)}
    return jnp.sum(jnp.where(has_pair, per_prompt, 0.0)), jnp.sum(has_pair).astype(jnp.float32), stats


def ranking_loss(rewards: jax.Array, ranks: jax.Array, margin: float = 0.0) -> jax.Array:
    """Mean over prompts with at least one non-tied pair of the per-prompt mean -log sigmoid loss."""
    total, prompts, _ = ranking_loss_sum(rewards, ranks, margin)
    return total / jnp.maximum(prompts, 1.0)


def fit_normalization(raw_scores: np.ndarray, normalize_std: bool = False) -> dict:
    """Gain and bias so that the reference set's normalized scores have mean 0 (and std 1 if asked).

    raw [1, 2, 3] -> {"gain": 1, "bias": -2}; with normalize_std -> {"gain": 1.2247, "bias": -2.4495}.
    """
    raw = np.asarray(raw_scores, np.float64)
    if raw.size == 0:
        raise ValueError("no reference scores to normalize with (empty reference set)")
    std = float(raw.std())
    gain = 1.0 / std if normalize_std and std > 0 else 1.0
    return {"gain": gain, "bias": -gain * float(raw.mean())}


# ----------------------------------------------------------------------------- the steps (sharded)
def ranking_shardings(mesh, rules, images: bool = False, prefix: bool = False) -> dict:
    """Shardings of a ranking batch: [B, K, T] arrays over (batch, -, length), [B, K] over batch; with images,
    the image slots [B, K, M, H, W, C] over batch; with prefix, the [B, K, T] prefix flags like the tokens."""
    seq = NamedSharding(mesh, logical_to_spec(("batch", None, "length"), rules))
    slot = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    out = {"tokens": seq, "positions": seq, "segment_ids": seq, "ranks": slot, "lengths": slot}
    if images:
        out["images"] = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    if prefix:
        out["prefix"] = seq
    return out


def model_ranking_shardings(mesh, rules, cfg) -> dict:
    """`ranking_shardings` for the batch keys a model config reads (`ranking_keys`)."""
    keys = ranking_keys(cfg)
    return ranking_shardings(mesh, rules, "images" in keys, "prefix" in keys)


def ranking_rewards(model: RewardModel, params, batch: dict) -> jax.Array:
    """Raw rewards [B, K]: the B * K sequences go through the trunk as one [B * K, T] batch."""
    b, k, t = batch["tokens"].shape

    def flat(x):  # [B, K, T] -> [B * K, T]; rows stay on the devices holding their prompt
        return logical_constraint(x.reshape(b * k, t), ("batch", "length"))

    images = batch.get("images")
    if images is not None:  # [B, K, M, H, W, C] -> [B * K, M, H, W, C]: each line with its prompt's images
        images = logical_constraint(images.reshape((b * k,) + images.shape[2:]), ("batch",))
    prefix = flat(batch["prefix"]) if "prefix" in batch else None
    inputs = ModelInput(flat(batch["tokens"]), flat(batch["positions"]), flat(batch["segment_ids"]), images, prefix)
    eos = batch["lengths"].reshape(b * k) - 1  # empty slots give -1, clipped by the head and masked by the loss
    return model.apply({"params": params}, inputs, eos).reshape(b, k)


def split_ranking_microbatches(batch: dict, num_micro: int, rules) -> dict:
    """[B, ...] -> [M, B/M, ...], microbatch m = prompts m, m + M, ... (as train/step.py's split)."""
    def split(key, x):
        b = x.shape[0]
        x = x.reshape(b // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
        axes = (None, "batch") if key == "images" else (None, "batch", None, "length")[:x.ndim]
        return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))

    return {key: split(key, x) for key, x in batch.items()}


def reward_loss_and_grads(model: RewardModel, params, batch: dict, num_micro: int, rules, grad_shardings,
                          margin: float = 0.0):
    """(loss, grads, stats): loss = sum of per-prompt losses / prompts with a pair, over all microbatches."""

    def loss_sum(p, micro):
        total, prompts, stats = ranking_loss_sum(ranking_rewards(model, p, micro), micro["ranks"], margin)
        return total, (prompts, stats)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def accumulate(carry, micro):
        grads_acc, total, prompts, correct, pairs = carry
        (s, (n, stats)), g = grad_fn(params, micro)
        g = freeze_base_grads(g, model.cfg.lora_train)  # LoRA: adapters (+ head) only
        grads_acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads_acc, g), grad_shardings)
        return (grads_acc, total + s, prompts + n, correct + stats["correct"], pairs + stats["pairs"]), None

    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
    micro = split_ranking_microbatches({k: batch[k] for k in ranking_keys(model.cfg)}, num_micro, rules)
    (grads, total, prompts, correct, pairs), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0, 0.0, 0.0), micro)
    denom = jnp.maximum(prompts, 1.0)
    stats = {"accuracy": correct / jnp.maximum(pairs, 1.0), "pairs": pairs, "prompts": prompts}
    return total / denom, jax.tree.map(lambda g: g / denom, grads), stats


def make_reward_train_step(model: RewardModel, tx: optax.GradientTransformation, schedule: optax.Schedule,
                           mesh, rules, state_shardings: TrainState, num_micro: int = 1,
                           margin: float = 0.0, guard: GuardConfig = GuardConfig()) -> Callable:
    """step(state, batch) -> (state, metrics); batch holds at least RANKING_KEYS. State donated.
    A non-finite (or spiking) step is skipped by the numerical guard (train/guards.py)."""

    def step(state: TrainState, batch: dict):
        loss, grads, stats = reward_loss_and_grads(model, state.params, batch, num_micro, rules,
                                                   state_shardings.params, margin)
        new, guard_stats = guarded_optimizer_step(tx, state, grads, loss, guard)
        metrics = {"loss": loss, "lr": schedule(applied_updates(state.opt_state)), **stats, **guard_stats}
        return new, metrics

    jitted = jax.jit(step, in_shardings=(state_shardings, model_ranking_shardings(mesh, rules, model.cfg)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    return _select_keys(in_mesh_context(jitted, mesh, rules), 1, ranking_keys(model.cfg))


def make_reward_eval_step(model: RewardModel, mesh, rules, param_shardings) -> Callable:
    """eval(params, batch) -> raw rewards [B, K] (replicated, for host-side metrics)."""
    jitted = jax.jit(lambda params, batch: ranking_rewards(model, params, batch),
                     in_shardings=(param_shardings, model_ranking_shardings(mesh, rules, model.cfg)),
                     out_shardings=replicated(mesh))
    return _select_keys(in_mesh_context(jitted, mesh, rules), 1, ranking_keys(model.cfg))


def _select_keys(fn: Callable, batch_arg: int, keys: tuple = RANKING_KEYS) -> Callable:
    """Pass only `keys` of the batch dict (the loader also builds targets / loss_mask)."""
    def wrapped(*args):
        args = list(args)
        args[batch_arg] = {k: args[batch_arg][k] for k in keys}
        return fn(*args)

    wrapped.lower = lambda *args: fn.lower(*[({k: a[k] for k in keys} if i == batch_arg else a)
                                             for i, a in enumerate(args)])
    return wrapped


# ----------------------------------------------------------------------------- evaluation (host)
def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion; (0, 1) when n = 0.

    wilson_interval(60, 100) = (0.502, 0.691). Better than p +- z * sqrt(p(1-p)/n) near 0 or 1
    and for small n. It assumes independent trials: exact for pairwise data, optimistic for
    K-wise data, whose pairs of one prompt share responses.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def pair_arrays(rewards: np.ndarray, ranks: np.ndarray, lengths: np.ndarray):
    """Every non-tied comparison as flat arrays: (r_better, r_worse, len_better, len_worse).

    rewards, ranks, lengths: [N, K] over all evaluated prompts.
    """
    pairs = np.asarray(better_pairs(jnp.asarray(ranks)))
    b, i, j = np.nonzero(pairs)
    return rewards[b, i], rewards[b, j], lengths[b, i], lengths[b, j]


def length_balanced_accuracy(correct: np.ndarray, len_better: np.ndarray, len_worse: np.ndarray) -> float:
    """Mean of the accuracy on pairs where the better answer is longer and where it is shorter.

    Pairs of equal length are left out. A scorer that only prefers the longer answer gets
    exactly 0.5, whatever share of pairs the longer answer wins; NaN if either group is empty.
    """
    longer, shorter = len_better > len_worse, len_better < len_worse
    if not longer.any() or not shorter.any():
        return float("nan")
    return 0.5 * (float(correct[longer].mean()) + float(correct[shorter].mean()))


def length_balanced_interval(correct: np.ndarray, len_better: np.ndarray, len_worse: np.ndarray,
                             z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation 95% interval of `length_balanced_accuracy` (the mean of two independent
    group accuracies: variance (p1 q1 / n1 + p2 q2 / n2) / 4)."""
    groups = [correct[len_better > len_worse], correct[len_better < len_worse]]
    if any(len(g) == 0 for g in groups):
        return float("nan"), float("nan")
    mean = 0.5 * sum(float(g.mean()) for g in groups)
    half = z * 0.5 * math.sqrt(sum(float(g.mean()) * (1 - float(g.mean())) / len(g) for g in groups))
    return max(0.0, mean - half), min(1.0, mean + half)


def pairwise_metrics(r_better: np.ndarray, r_worse: np.ndarray, len_better: np.ndarray, len_worse: np.ndarray,
                     margin_buckets: int = 4) -> dict:
    """Accuracy (+ 95% CI), accuracy by |margin| quantile, the length baseline and length-balanced accuracy.

    A comparison's credit is `pair_credit(r_better - r_worse)`: 1 if r_better > r_worse, 1/2 on a tie, 0
    otherwise; accuracy, its interval, the margin buckets and the length-balanced accuracy all average it.
    "longer_wins" is the accuracy of scoring each answer by its length on the same pairs (ties 1/2 as well).
    """
    n = len(r_better)
    correct = pair_credit(np.asarray(r_better, np.float64) - np.asarray(r_worse, np.float64))
    low, high = wilson_interval(correct.sum(), n)
    out = {"accuracy": float(correct.mean()) if n else float("nan"), "accuracy_ci_low": low,
           "accuracy_ci_high": high, "pairs": n,
           "longer_wins": float(np.mean((len_better > len_worse) + 0.5 * (len_better == len_worse))) if n else
           float("nan"),
           "length_balanced_accuracy": length_balanced_accuracy(correct, len_better, len_worse) if n else
           float("nan")}
    if n and margin_buckets > 0:
        margin = np.abs(r_better - r_worse)
        edges = np.quantile(margin, np.linspace(0, 1, margin_buckets + 1))
        bucket = np.clip(np.searchsorted(edges, margin, side="right") - 1, 0, margin_buckets - 1)
        for q in range(margin_buckets):
            members = bucket == q
            out[f"accuracy_margin_q{q + 1}"] = float(correct[members].mean()) if members.any() else float("nan")
            out[f"margin_q{q + 1}_upper"] = float(edges[q + 1])
    return out


def ranking_metrics(rewards: np.ndarray, ranks: np.ndarray, lengths: np.ndarray, margin: float = 0.0,
                    margin_buckets: int = 4) -> dict:
    """Everything the trainer logs at an evaluation, from scores of all held-out rankings [N, K].

    loss (the training loss on held-out data), pairwise metrics (see `pairwise_metrics`) and the
    mean / std of the rewards of all real responses.
    """
    rewards, ranks, lengths = (np.asarray(x) for x in (rewards, ranks, lengths))
    real = ranks > 0
    out = {"loss": float(ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks), margin)),
           "reward_mean": float(rewards[real].mean()), "reward_std": float(rewards[real].std()),
           "prompts": int((np.asarray(better_pairs(jnp.asarray(ranks))).sum((1, 2)) > 0).sum())}
    out.update(pairwise_metrics(*pair_arrays(rewards, ranks, lengths), margin_buckets=margin_buckets))
    return out
