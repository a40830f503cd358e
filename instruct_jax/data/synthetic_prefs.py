"""A learnable synthetic preference task: K-wise rankings whose gold rule a tiny reward model can learn.

Each response is a short list of words; its hidden quality is

    quality = (# words from POSITIVE) - (# words from NEGATIVE)

and the K responses to one prompt are ranked by quality, best first, equal qualities tied
(dense ranks: qualities [2, -1, 2] -> ranks [1, 2, 1]). The prompt (a numbered request, so
every prompt is distinct) carries no signal, so a model that beats chance has learnt the rule
from the comparisons alone. Every response has the same number of words; token counts differ a
little (some words take more tokens than others), which the length-balanced accuracy of the
evaluation discounts. Example (seed 0 gives other words):

    Ranking(prompt=({"role": "user", "content": "Describe the weather. (#0)"},),
            responses=("the good sweet rain and wind", "foul the rain bad of cold"),
            ranks=(1, 2))

`rankings_to_rows` writes the documented K-wise jsonl format (docs/DATA.md, format "ranking"):

    {"prompt": "Describe the weather. (#0)", "responses": ["...", "..."], "ranks": [1, 2]}

so `python -m instruct_jax.data.synthetic_prefs --out prefs.jsonl --n 2000` makes a file that
`data.format="ranking"` reads; the reward trainer can also generate the rankings in memory
(`reward.synthetic=N`). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np

from instruct_jax.data.formats import MAX_RESPONSES, Ranking

POSITIVE = ("good", "kind", "sweet", "fair", "true", "love", "glad", "brave")
NEGATIVE = ("bad", "cruel", "sour", "foul", "false", "hate", "sad", "vile")
NEUTRAL = ("the", "and", "of", "to", "my", "is", "it", "with", "rain", "wind", "cold", "day", "king", "sea")
PROMPTS = ("Describe the weather.", "Tell me about the king.", "How was your day?", "Write about the sea.",
           "What do you think of it?", "Say something.")


def quality(text: str) -> int:
    """The gold rule: positive words minus negative words. quality("good and bad sweet") = 1."""
    words = text.split()
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def dense_ranks(qualities: Sequence[int]) -> tuple[int, ...]:
    """Best quality -> rank 1, ties share a rank: [2, -1, 2, 0] -> (1, 3, 1, 2)."""
    order = sorted(set(qualities), reverse=True)
    return tuple(order.index(q) + 1 for q in qualities)


def _response(rng: np.random.Generator, num_words: int) -> str:
    n_pos, n_neg = rng.multinomial(rng.integers(0, num_words + 1), [0.5, 0.5])
    words = ([POSITIVE[i] for i in rng.integers(0, len(POSITIVE), n_pos)]
             + [NEGATIVE[i] for i in rng.integers(0, len(NEGATIVE), n_neg)]
             + [NEUTRAL[i] for i in rng.integers(0, len(NEUTRAL), num_words - n_pos - n_neg)])
    return " ".join(words[i] for i in rng.permutation(num_words))


def synthetic_rankings(n: int, seed: int = 0, k_min: int = 2, k_max: int = 4, num_words: int = 6) -> list[Ranking]:
    """`n` rankings of K in [k_min, k_max] responses of `num_words` words each; never all tied."""
    if not 2 <= k_min <= k_max <= MAX_RESPONSES:
        raise ValueError(f"need 2 <= k_min <= k_max <= {MAX_RESPONSES}, got {k_min}, {k_max}")
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        k = int(rng.integers(k_min, k_max + 1))
        responses = tuple(_response(rng, num_words) for _ in range(k))
        qualities = [quality(r) for r in responses]
        if len(set(qualities)) < 2 or len(set(responses)) < k:
            continue  # all tied, or a duplicate answer: nothing (or something ambiguous) to learn
        # Numbered, so every prompt is distinct and a split by prompt holds out the expected share.
        prompt = ({"role": "user", "content": f"{PROMPTS[int(rng.integers(len(PROMPTS)))]} (#{len(out)})"},)
        out.append(Ranking(prompt, responses, dense_ranks(qualities)))
    return out


def rankings_to_rows(rankings: Sequence[Ranking]) -> list[dict]:
    """The K-wise jsonl rows of docs/DATA.md: {"prompt": str, "responses": [...], "ranks": [...]}."""
    return [{"prompt": r.prompt[-1]["content"], "responses": list(r.responses), "ranks": list(r.ranks)}
            for r in rankings]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="write synthetic K-wise rankings as jsonl")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with open(args.out, "w") as f:
        for row in rankings_to_rows(synthetic_rankings(args.n, args.seed)):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
