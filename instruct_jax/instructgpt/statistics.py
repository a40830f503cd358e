"""Evaluation arithmetic: pairwise agreement with a gold order, head-to-head win rate with a bootstrap
confidence interval over prompts, and the analytic KL of best-of-n sampling.

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
