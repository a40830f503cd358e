"""HH-RLHF reward-model baselines on the reward model's own held-out pairs, side by side with the model.

    python benchmarks/rm_hh_baselines.py --experiment experiments/hh_rm.py:cpu
    python benchmarks/rm_hh_baselines.py --experiment experiments/hh_rm.py:cpu --rm-workdir runs/hh-rm runs/hh-rm-pt

The pairs are exactly the reward model's: the experiment's data config is read the same way and
split with the same seeded hash of the prompt (or its eval_source is used). On the held-out pairs:

* longer wins: the answer with more characters is preferred (equal lengths count 1/2);
* bag of words + length: a linear Bradley-Terry model r(answer) = w . phi(answer), fit by L2-
  regularised logistic regression on phi(chosen) - phi(rejected) of the training pairs, with
  phi = counts of the 1,000 most frequent training-answer words (log1p) and log characters /
  log words; the L2 strength is picked by 5-fold cross-validation on the training pairs;
* reward models (--rm-workdir, one or more): their normalized scores via instruct_jax.inference.scorer.RewardScorer.

For each: accuracy with a 95% Wilson interval, and the length-balanced accuracy (the mean of the
accuracies on pairs where the chosen answer is longer and where it is shorter, with a normal-
approximation 95% interval), which is exactly 0.5 for a scorer that only prefers length.
Needs numpy only (no scikit-learn); JSON goes to --out (default docs/rm_hh_baselines.json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from instruct_jax.config import Config, apply_overrides, load_experiment  # noqa: E402
from instruct_jax.data.build import is_eval, read_records  # noqa: E402
from instruct_jax.data.formats import Ranking  # noqa: E402
from instruct_jax.train.rm.ranking import (length_balanced_accuracy, length_balanced_interval, pair_credit,
                                           wilson_interval)

WORD = re.compile(r"[a-z0-9']+")


# ----------------------------------------------------------------------------- the pairs
def split_pairs(cfg: Config) -> tuple[list[Ranking], list[Ranking]]:
    """(train, eval) comparisons exactly as the reward model's load_data splits them."""
    d = cfg.data
    records = [r for _, r in read_records(d.source, d)[0]]
    if d.eval_source:
        return records, [r for _, r in read_records(d.eval_source, d, split=d.eval_split or d.split)[0]]
    held = [is_eval(r, d.eval_fraction, cfg.seed) for r in records]
    return [r for r, h in zip(records, held) if not h], [r for r, h in zip(records, held) if h]


def chosen_rejected(pairs: list[Ranking]) -> tuple[list[str], list[str]]:
    """The rank-1 and rank-2 answers of pairwise comparisons."""
    if any(len(p.responses) != 2 for p in pairs):
        raise ValueError("these baselines are for pairwise data (K = 2)")
    best = [p.ranks.index(min(p.ranks)) for p in pairs]
    return [p.responses[b] for p, b in zip(pairs, best)], [p.responses[1 - b] for p, b in zip(pairs, best)]


def summary(correct: np.ndarray, len_chosen: np.ndarray, len_rejected: np.ndarray) -> dict:
    """Accuracy (ties, as 0.5, count half), its Wilson 95% interval and the length-balanced accuracy."""
    n = len(correct)
    low, high = wilson_interval(float(correct.sum()), n)
    balanced_low, balanced_high = length_balanced_interval(correct, len_chosen, len_rejected)
    return {"accuracy": float(correct.mean()), "ci_low": low, "ci_high": high, "pairs": n,
            "length_balanced_accuracy": length_balanced_accuracy(correct, len_chosen, len_rejected),
            "length_balanced_ci_low": balanced_low, "length_balanced_ci_high": balanced_high}


def outcome(score_chosen: np.ndarray, score_rejected: np.ndarray) -> np.ndarray:
    """1 if chosen scores higher, 0 if lower, 1/2 on a tie (the reward trainer's `pair_credit`)."""
    return pair_credit(np.asarray(score_chosen, np.float64) - np.asarray(score_rejected, np.float64))


# ----------------------------------------------------------------------------- bag of words + length
def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class BagOfWords:
    """phi(answer) = [log1p(count of each vocabulary word)..., log1p(chars), log1p(words)], standardized."""

    def __init__(self, texts: list[str], vocab_size: int = 1000, min_count: int = 3):
        df = collections.Counter(w for t in texts for w in set(words(t)))
        common = [w for w, c in df.most_common(vocab_size) if c >= min_count]
        self.index = {w: i for i, w in enumerate(common)}
        raw = self._raw(texts)
        self.mean, self.std = raw.mean(0), raw.std(0) + 1e-6

    def _raw(self, texts: list[str]) -> np.ndarray:
        x = np.zeros((len(texts), len(self.index) + 2))
        for row, t in enumerate(texts):
            ws = words(t)
            for w in ws:
                if w in self.index:
                    x[row, self.index[w]] += 1
            x[row, -2:] = len(t), len(ws)
        return np.log1p(x)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return (self._raw(texts) - self.mean) / self.std


def fit_bradley_terry(diff: np.ndarray, l2: float, steps: int = 300) -> np.ndarray:
    """w minimising mean log(1 + exp(-diff @ w)) + l2/2 |w|^2: logistic regression on pair differences.

    No intercept: swapping a pair's sides negates its features, so the model is symmetric. Newton's
    method (d is about a thousand, so the d x d Hessian is cheap): ~10 steps; `steps` caps it.
    """
    n, d = diff.shape
    w = np.zeros(d)
    for _ in range(steps):
        z = diff @ w
        p = 1.0 / (1.0 + np.exp(-z))  # P(chosen preferred)
        grad = -diff.T @ (1.0 - p) / n + l2 * w
        hess = (diff.T * (p * (1.0 - p))) @ diff / n + l2 * np.eye(d)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def pick_l2(diff: np.ndarray, grid=(0.1, 1.0, 10.0, 100.0), folds: int = 5, seed: int = 0) -> float:
    """The L2 strength with the best 5-fold cross-validated accuracy on the training pairs."""
    fold = np.random.default_rng(seed).permutation(len(diff)) % folds
    scores = {}
    for l2 in grid:
        acc = [np.mean(pair_credit(diff[fold == f] @ fit_bradley_terry(diff[fold != f], l2))) for f in range(folds)]
        scores[l2] = float(np.mean(acc))
    return max(scores, key=scores.get)


# ----------------------------------------------------------------------------- the report
def run(cfg: Config, rm_workdirs: tuple = ()) -> dict:
    start = time.time()
    train, held_out = split_pairs(cfg)
    train_c, train_r = chosen_rejected(train)
    eval_c, eval_r = chosen_rejected(held_out)
    len_c, len_r = np.array([len(t) for t in eval_c]), np.array([len(t) for t in eval_r])
    results = {"longer_wins": summary(outcome(len_c, len_r), len_c, len_r)}

    features = BagOfWords(train_c + train_r)
    train_diff = features(train_c) - features(train_r)
    l2 = pick_l2(train_diff)
    w = fit_bradley_terry(train_diff, l2)
    results["bag_of_words_length_logreg"] = {
        **summary(outcome(features(eval_c) @ w, features(eval_r) @ w), len_c, len_r),
        "l2": l2, "features": train_diff.shape[1],
        "train_accuracy": float(np.mean(pair_credit(train_diff @ w)))}

    for workdir in rm_workdirs:
        from instruct_jax.inference.scorer import RewardScorer  # jax and the model only when a reward model is scored

        scorer = RewardScorer(cfg, workdir)
        scores_c = scorer.score([(list(p.prompt), a) for p, a in zip(held_out, eval_c)])
        scores_r = scorer.score([(list(p.prompt), a) for p, a in zip(held_out, eval_r)])
        name = f"reward_model ({os.path.basename(os.path.normpath(workdir))})"
        results[name] = {**summary(outcome(scores_c, scores_r), len_c, len_r), "workdir": workdir}
        eval_file = os.path.join(workdir, "eval.json")
        if os.path.isfile(eval_file):  # the trainer's own number on the same pairs, as a cross-check
            results[name]["trainer_eval_accuracy"] = json.load(open(eval_file))["eval_accuracy"]
    return {"experiment": cfg.name, "train_pairs": len(train), "eval_pairs": len(held_out),
            "chosen_longer_share": float(np.mean(len_c > len_r)), "results": results,
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU ({platform.system()})",
            "seconds": time.time() - start}


def table(report: dict) -> str:
    lines = [f"{report['experiment']}: {report['train_pairs']} training pairs, {report['eval_pairs']} held-out",
             "| method | accuracy | 95% CI | length-balanced accuracy | 95% CI |", "|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['accuracy']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['length_balanced_accuracy']:.3f} | "
                     f"[{r['length_balanced_ci_low']:.3f}, {r['length_balanced_ci_high']:.3f}] |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="experiments/hh_rm.py:cpu")
    parser.add_argument("--rm-workdir", nargs="+", default=[],
                        help="trained reward models to score the same pairs with")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="docs/rm_hh_baselines.json")
    args = parser.parse_args(argv)
    cfg = apply_overrides(load_experiment(args.experiment), args.overrides)
    report = run(cfg, tuple(args.rm_workdir))
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
