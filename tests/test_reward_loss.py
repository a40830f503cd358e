"""Reward-model numerics against hand-computed values and naive loops: the K-wise loss, metrics, normalization."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from instruct_jax.inference.scorer import apply_normalization, last_token_index
from instruct_jax.train.rm.ranking import (better_pairs, fit_normalization, length_balanced_accuracy,
                                           length_balanced_interval, pairwise_metrics, ranking_loss, ranking_loss_sum,
                                           ranking_metrics, wilson_interval)


def neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def naive_loss(rewards, ranks, margin=0.0):
    """InstructGPT's loss by explicit loops: per prompt the mean over its non-tied pairs, then the mean over prompts."""
    per_prompt = []
    for r, k in zip(rewards, ranks):
        terms = [neg_log_sigmoid(r[i] - r[j] - margin) for i in range(len(k)) for j in range(len(k))
                 if k[i] > 0 and k[j] > 0 and k[i] < k[j]]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


def test_k2_loss_is_the_bradley_terry_formula():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(32, 2)).astype(np.float32) * 3
    ranks = np.where(rng.random(32)[:, None] < 0.5, [[1, 2]], [[2, 1]]).astype(np.int32)
    chosen = np.where(ranks[:, 0] == 1, rewards[:, 0], rewards[:, 1])
    rejected = np.where(ranks[:, 0] == 1, rewards[:, 1], rewards[:, 0])
    bradley_terry = np.mean(-np.log(1.0 / (1.0 + np.exp(-(chosen - rejected).astype(np.float64)))))
    assert float(ranking_loss(rewards, ranks)) == pytest.approx(bradley_terry, rel=1e-5)


def test_kwise_worked_example_with_a_tie_and_a_padded_slot():
    # Prompt 0: slots [1, 2, 2, empty]: pairs (0,1), (0,2); 1 and 2 tie; slot 3 is padding.
    #   mean(-log s(1 - 2), -log s(1 - 0)) = mean(1.313262, 0.313262) = 0.813262
    # Prompt 1: slot 1 beats slot 0: -log s(1 - 0) = 0.313262. Prompt 2: all empty -> not counted.
    rewards = np.array([[1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 7.0, 7.0], [3.0, 3.0, 3.0, 3.0]], np.float32)
    ranks = np.array([[1, 2, 2, 0], [2, 1, 0, 0], [0, 0, 0, 0]], np.int32)
    expected = (0.5 * (1.313262 + 0.313262) + 0.313262) / 2  # 0.563262
    assert float(ranking_loss(rewards, ranks)) == pytest.approx(expected, abs=1e-5)
    total, prompts, stats = ranking_loss_sum(rewards, ranks)
    assert float(prompts) == 2 and float(stats["pairs"]) == 3 and float(stats["correct"]) == 2
    # Padded slots and prompts without a pair get no gradient, whatever their (garbage) reward.
    grads = jax.grad(lambda r: ranking_loss(r, ranks))(jnp.asarray(rewards))
    assert float(grads[0, 3]) == 0 and float(jnp.abs(grads[2]).sum()) == 0 and float(grads[1, 2]) == 0
    # The example from the docstring of better_pairs.
    pairs = np.asarray(better_pairs(jnp.array([[1, 2, 2, 0]])))[0]
    assert pairs.tolist() == [[False, True, True, False]] + [[False] * 4] * 3


def test_margin_shifts_every_difference():
    rewards = np.array([[0.5, -0.25]], np.float32)
    ranks = np.array([[1, 2]], np.int32)
    assert float(ranking_loss(rewards, ranks, margin=1.0)) == pytest.approx(neg_log_sigmoid(0.75 - 1.0), rel=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=9, max_size=9), min_size=1, max_size=4), st.integers(0, 10**6))
def test_loss_matches_naive_loop_for_any_ranking(ranks, seed):
    ranks = np.array(ranks, np.int32)
    if not any(len(set(k[k > 0])) > 1 for k in ranks):
        ranks[0, :2] = [1, 2]  # at least one prompt with a pair
    rewards = np.random.default_rng(seed).normal(size=ranks.shape).astype(np.float32) * 2
    assert float(ranking_loss(rewards, ranks, 0.3)) == pytest.approx(naive_loss(rewards, ranks, 0.3), rel=1e-5)


def test_wilson_interval_known_values():
    low, high = wilson_interval(60, 100)
    assert (round(low, 3), round(high, 3)) == (0.502, 0.691)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # 0.722: no interval past 1 at p = 1


def test_length_only_scorer_is_visible():
    rng = np.random.default_rng(1)
    len_better, len_worse = rng.integers(5, 50, 400), rng.integers(5, 50, 400)
    # A scorer that only counts tokens: r = length.
    m = pairwise_metrics(len_better.astype(float), len_worse.astype(float), len_better, len_worse)
    by_length = np.mean((len_better > len_worse) + 0.5 * (len_better == len_worse))  # equal lengths tie: 1/2
    assert m["accuracy"] == pytest.approx(by_length) and m["longer_wins"] == pytest.approx(by_length)
    assert m["length_balanced_accuracy"] == 0.5
    correct = np.array([1, 0, 1, 1], float)
    assert length_balanced_accuracy(correct, np.array([5, 5, 1, 1]), np.array([1, 1, 5, 5])) == 0.75


def test_metrics_by_margin_bucket_and_ranking_metrics():
    r_better = np.array([0.1, 0.2, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    r_worse = np.array([0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    m = pairwise_metrics(r_better, r_worse, np.ones(8), np.ones(8), margin_buckets=4)
    assert m["accuracy_margin_q1"] == 0.5 and m["accuracy_margin_q4"] == 1.0 and m["pairs"] == 8
    rewards = np.array([[1.0, 2.0, 0.0, 5.0], [0.0, 1.0, 7.0, 7.0]])
    ranks = np.array([[1, 2, 2, 0], [2, 1, 0, 0]])
    lengths = np.array([[9, 5, 5, 0], [3, 4, 0, 0]])
    out = ranking_metrics(rewards, ranks, lengths)
    assert out["pairs"] == 3 and out["accuracy"] == pytest.approx(2 / 3) and out["prompts"] == 2
    assert out["loss"] == pytest.approx((0.5 * (1.313262 + 0.313262) + 0.313262) / 2, abs=1e-5)
    assert out["reward_mean"] == pytest.approx(np.mean([1.0, 2.0, 0.0, 0.0, 1.0]))
    assert out["longer_wins"] == 1.0  # 9 > 5, 9 > 5, 4 > 3


def test_a_reward_tie_counts_one_half_in_every_accuracy():
    """One tie rule everywhere (as instructgpt/statistics.py pair_agreement): r_better == r_worse scores 1/2.

    Prompt 0, ranks [1, 2, 3]: rewards [1, 1, 0.5] -> (0,1) tie 1/2, (0,2) 1, (1,2) 1; lengths [5, 3, 4].
    Prompt 1, slot 1 beats slot 0: rewards [0.25, 0.25] -> tie 1/2; lengths [2, 6].
    Prompt 2, slot 0 beats slot 1: rewards [-1, 0] -> 0; lengths [4, 4].
    Accuracy (1/2 + 1 + 1 + 1/2 + 0) / 5 = 0.6 (the old ties-are-wrong rule: 0.4).
    By |margin|, 2 buckets (edges 0, 0.5, 1): q1 = the two ties = 0.5; q2 = {1, 1, 0} = 2/3.
    Length-balanced: better longer {(0,1) 1/2, (0,2) 1, p1 1/2} = 2/3, better shorter {(1,2) 1} = 1 -> 5/6.
    """
    rewards = np.array([[1.0, 1.0, 0.5, 9.0], [0.25, 0.25, 7.0, 7.0], [-1.0, 0.0, 3.0, 3.0]], np.float32)
    ranks = np.array([[1, 2, 3, 0], [2, 1, 0, 0], [1, 2, 0, 0]], np.int32)
    lengths = np.array([[5, 3, 4, 0], [2, 6, 0, 0], [4, 4, 0, 0]], np.int32)
    _, _, stats = ranking_loss_sum(rewards, ranks)  # what the training step logs as accuracy
    assert float(stats["correct"]) == 3.0 and float(stats["pairs"]) == 5
    out = ranking_metrics(rewards, ranks, lengths, margin_buckets=2)
    assert out["accuracy"] == pytest.approx(0.6) and out["pairs"] == 5
    assert (out["accuracy_ci_low"], out["accuracy_ci_high"]) == pytest.approx((0.2307, 0.8824), abs=1e-4)
    assert out["accuracy_margin_q1"] == pytest.approx(0.5) and out["accuracy_margin_q2"] == pytest.approx(2 / 3)
    assert out["length_balanced_accuracy"] == pytest.approx(5 / 6)
    assert out["longer_wins"] == pytest.approx(0.7)  # longer better in 3 pairs, shorter in 1, equal in 1
    # A scorer that ties everything is at chance, not at 0.
    assert ranking_metrics(np.zeros_like(rewards), ranks, lengths)["accuracy"] == 0.5


def test_normalization_centres_the_reference_set():
    raw = np.random.default_rng(2).normal(3.0, 2.5, size=1000)
    norm = fit_normalization(raw)
    assert norm["gain"] == 1.0 and abs(apply_normalization(raw, norm).mean()) < 1e-9
    norm = fit_normalization(raw, normalize_std=True)
    scaled = apply_normalization(raw, norm)
    assert abs(scaled.mean()) < 1e-9 and scaled.std() == pytest.approx(1.0)
    assert fit_normalization([1.0, 2.0, 3.0]) == {"gain": 1.0, "bias": -2.0}


def test_last_token_index_reads_the_mask():
    segment_ids = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1], [1, 0, 0, 0]])
    assert last_token_index(segment_ids).tolist() == [2, 3, 0]


def test_length_balanced_interval_covers_its_estimate():
    correct = np.array([1, 1, 0, 1, 0, 0, 1, 1], float)
    longer, shorter = np.array([9, 9, 9, 9, 1, 1, 1, 1]), np.array([1, 1, 1, 1, 9, 9, 9, 9])
    low, high = length_balanced_interval(correct, longer, shorter)
    # groups: 3/4 and 2/4 -> 0.625 +- 1.96 * 0.5 * sqrt(0.1875 / 4 + 0.25 / 4)
    half = 1.96 * 0.5 * math.sqrt(0.1875 / 4 + 0.25 / 4)
    assert (low, high) == pytest.approx((0.625 - half, 0.625 + half))
