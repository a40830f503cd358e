"""Evaluation of the built-in task: the programmatic gold judge, the simulated labeler and the metrics.

    gold.py       GoldJudge (correctness / format / verbosity / total, every call counted) and Labeler
    metrics.py    pairwise agreement, head-to-head win rate with bootstrap CI, best-of-n KL
"""

from instruct_jax.eval.gold import WEIGHTS, GoldJudge, Labeler, LabelBudgetExhausted, Score
from instruct_jax.eval.metrics import (agreement_rate, best_of_n_kl, bootstrap_ci, head_to_head, outcomes,
                                       pair_agreement, ranking_agreement)

__all__ = ["GoldJudge", "LabelBudgetExhausted", "Labeler", "Score", "WEIGHTS", "agreement_rate", "best_of_n_kl",
           "bootstrap_ci", "head_to_head", "outcomes", "pair_agreement", "ranking_agreement"]
