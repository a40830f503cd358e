"""Evaluation arithmetic: pairwise agreement with a gold order, head-to-head win rates (greedy, and paired
temperature-1 samples) with bootstrap confidence intervals over prompts, the KL of best-of-n sampling (the
analytic bound and the exact value over the distinct samples drawn), the largest share of prompts given
one wrong response, and the calibration of predicted probabilities (reliability bins, ECE).

Scores are "higher is better" everywhere; pass `-ranks` for a ranking (rank 1 = best).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def pair_agreement(pred: Sequence[float], gold: Sequence[float], same: Optional[Sequence] = None,
                   want_same: bool = True) -> tuple[float, int]:
    """(agreeing pairs, non-tied gold pairs) over the C(K, 2) pairs of one prompt.

    Only pairs the gold order separates count; a predicted tie on such a pair scores 1/2.
    pair_agreement([3, 1, 2], [0.9, 0.1, 0.5]) = (3.0, 3);  pair_agreement([1, 1, 0], [2, 1, 1]) = (1.5, 2).
    With `same` (one label per response), only pairs whose labels are equal (want_same) or differ
    (not want_same) count: pair_agreement([3, 1, 2], [0.9, 0.1, 0.5], same=[1, 0, 1]) = (1.0, 1).
    """
    p, g = np.asarray(pred, float), np.asarray(gold, float)
    if p.shape != g.shape:
        raise ValueError(f"pred and gold must have one score per response, got {p.shape} and {g.shape}")
    i, j = np.triu_indices(len(g), k=1)
    separated = g[i] != g[j]
    if same is not None:
        labels = np.asarray(same)
        if labels.shape != g.shape:
            raise ValueError(f"same must have one label per response, got {labels.shape} for {g.shape}")
        separated &= (labels[i] == labels[j]) == want_same
    dp, dg = p[i] - p[j], g[i] - g[j]
    agree = np.where(dp == 0, 0.5, (np.sign(dp) == np.sign(dg)).astype(float))
    return float(agree[separated].sum()), int(separated.sum())


def ranking_agreement(ranks: Sequence[int], gold: Sequence[float]) -> tuple[float, int]:
    """pair_agreement of a ranking (1 = best) with gold totals."""
    return pair_agreement(-np.asarray(ranks, float), gold)


def agreement_rate(counts: Sequence[tuple[float, int]]) -> float:
    """Pooled agreement over prompts: sum of agreeing pairs / sum of non-tied pairs (nan if none)."""
    agree, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return agree / total if total else float("nan")


def outcomes(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-prompt result of A against B: 1 win, 1/2 tie, 0 loss."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need one score per prompt for both sides, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def bootstrap_ci(values: Sequence[float], num_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling the values (one per prompt) with replacement."""
    v = np.asarray(values, float)
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(num_resamples, v.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


def head_to_head(a: Sequence[float], b: Sequence[float], num_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict:
    """Win rate of A over B by per-prompt gold totals (ties count 1/2) with a bootstrap CI over prompts.

    head_to_head([1, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1])["win_rate"] = (1 + 0.5 + 0 + 1) / 4 = 0.625.
    """
    o = outcomes(a, b)
    lo, hi = bootstrap_ci(o, num_resamples, level, seed)
    return {"win_rate": float(o.mean()), "ci_low": lo, "ci_high": hi, "wins": int((o == 1).sum()),
            "ties": int((o == 0.5).sum()), "losses": int((o == 0).sum()), "prompts": int(o.size)}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020, app. G; exact for continuous rewards)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_kl_exact(logp: Sequence[float], reward: Sequence[float], n: int) -> float:
    """KL(best-of-n || base) when the base draws only from the given distinct responses.

    The base q is their probabilities exp(logp) renormalized over the set; best-of-n draws n times from
    q and keeps the highest reward (responses with equal rewards act as one). With the responses sorted
    by reward and F_k the base's CDF up to the k-th, best-of-n gives the k-th F_k^n - F_(k-1)^n, so
    KL = sum_k P_k log(P_k / q_k). Two equally likely responses, n = 2: P = (1/4, 3/4), KL =
    3/4 log 3/2 + 1/4 log 1/2 = 0.1308 (the continuous bound log 2 - 1/2 = 0.1931 holds only for a
    base that never repeats). One distinct response: 0.
    """
    lp, r = np.asarray(logp, float), np.asarray(reward, float)
    if lp.shape != r.shape or lp.ndim != 1 or lp.size == 0:
        raise ValueError(f"need one log-prob and one reward per distinct response, got {lp.shape} and {r.shape}")
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    levels, group = np.unique(r, return_inverse=True)  # ascending rewards; ties merged into one outcome
    q = np.zeros(levels.size)
    np.add.at(q, group, np.exp(lp - lp.max()))
    q /= q.sum()
    cdf = np.minimum(np.cumsum(q), 1.0)
    p = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
    keep = p > 0
    return max(0.0, float(np.sum(p[keep] * np.log(p[keep] / q[keep]))))  # >= 0; rounding can dip below


def paired_sample_outcomes(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> np.ndarray:
    """Per-prompt win rate of A's i-th sample against B's i-th (ties 1/2), averaged over the m pairs.

    a, b: [prompts, m] scores. paired_sample_outcomes([[1, 0], [0.5, 0.5]], [[0, 0], [0.5, 1]]) = [0.75, 0.25].
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"need [prompts, m] scores with m >= 1 for both sides, got {a.shape} and {b.shape}")
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0)).mean(axis=1)


def mean_with_ci(values: Sequence[float], seed: int = 0) -> dict:
    """{"mean", "ci_low", "ci_high", "prompts"}: the mean of per-prompt values with a bootstrap CI over prompts."""
    lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(values)), "ci_low": lo, "ci_high": hi, "prompts": int(np.size(values))}


def max_response_share(texts: Sequence[str], correct: Sequence[bool]) -> tuple[float, str]:
    """(share, text): the largest fraction of prompts given one identical response that is wrong for them.

    A response counts against the prompts it is not a correct answer for, so "1." given to every prompt
    whose answer is 1 does not count. Texts compare whitespace-stripped.
    max_response_share(["1.", "1.", " 1.", "8", "8"], [True, True, False, False, False]) = (0.4, "8").
    """
    if len(texts) != len(correct) or not texts:
        raise ValueError(f"need one correctness flag per response, got {len(texts)} texts and {len(correct)}")
    wrong: dict = {}
    for t, ok in zip(texts, correct):
        if not ok:
            wrong[t.strip()] = wrong.get(t.strip(), 0) + 1
    if not wrong:
        return 0.0, ""
    text = min(wrong, key=lambda k: (-wrong[k], k))
    return wrong[text] / len(texts), text


def calibration(p: Sequence[float], y: Sequence[float], bins: int = 10) -> tuple[float, list[dict]]:
    """(expected calibration error, reliability bins) of predicted probabilities p against outcomes y in {0, 1}.

    Equal-width bins on [0, 1] (the last one closed); ECE = sum over bins of (count / N) |mean y - mean p|.
    calibration([0.1, 0.3, 0.8, 0.9], [0, 1, 1, 1], bins=2)[0]
      = 2/4 |1/2 - 0.2| + 2/4 |1 - 0.85| = 0.225.
    """
    p, y = np.asarray(p, float), np.asarray(y, float)
    if p.shape != y.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"need one outcome per prediction, got {p.shape} and {y.shape}")
    which = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            row = {"low": b / bins, "high": (b + 1) / bins, "count": int(sel.sum()),
                   "mean_predicted": float(p[sel].mean()), "frequency": float(y[sel].mean())}
            ece += row["count"] / p.size * abs(row["frequency"] - row["mean_predicted"])
            table.append(row)
    return float(ece), table
