"""The gold judge of the built-in task and the simulated labeler that ranks responses with it.

GoldJudge scores any response to a TaskSpec (instruct_jax/instructgpt/task.py) in [0, 1]:

    correctness   the answer itself, with partial credit (per kind, below)
    format        1 = the response is exactly the answer's shape ("59", "2 5 9", "cat, dog");
                  1/2 = an answer can be read out of other text ("The answer is 59."); 0 = none found
    verbosity     1 up to the reference's word count + 4 (a "max_words" limit counts as the length),
                  then falling linearly to 0 at three times that plus 4
    total         0.6 correctness + 0.25 format + 0.15 verbosity (WEIGHTS); a response with correctness 0
                  scores 0 on every component (no answer, so no answer's format or length to credit)

Partial credit of `correctness` per kind (the reference always scores 1 on everything):

    reverse      best positional letter match of a response word to the reversed word ("nomel" vs "nomal" 0.8),
                 over words sharing >= 60% of their letters with it (others are not attempts at the answer)
    sort         0.3 multiset overlap + 0.7 positional match of the numbers ("2 9 5" for "2 5 9": 0.3 + 0.7/3)
    add, count   exact 1, else 0.5 (1 - |error| / scale), scale 10 (add) or 3 (count), floored at 0
    spell        positional match of the number words ("forty three" for "forty two": 0.5); the right digits 0.3
    list         (distinct items of the category, at most the count asked, - 1/2 per item of another) / count
    constrained  content x (1/2 + 1/2 constraint met): content = fruit and color named (max_words, 1/2 each)
                 or the color named (upper); constraint = at most n words, or all letters capitals
    pick         1 / (options named) if the right one is among them ("plum" 1, "plum, cat" 0.5), else 0
    repeat       (repetitions of the word up to the count asked - 1/2 per extra one) / count
    reverse_list as sort, over the item words
    count_items  as count

Every `score` call counts one in `judge.calls`: only the labeler and the final evaluation may call it.

Labeler (a simulated human, after InstructGPT's K-wise rankings): the K gold totals are grouped into
tie groups (equal totals); the groups are ordered by a Plackett-Luce sample with utilities
total / temperature (Gumbel-max), then each adjacent pair of the order is swapped with probability
`flip_rate`, one pass from the top. The ranking gives every response its group's place, so gold ties
are recorded as ties and nothing else is. The defaults (temperature 0.02, flip_rate 0.3) agree with the
noiseless gold order on 85.0% of non-tied pairs over 600 simulated K = 4..9 rankings of Task(0)
(tests/test_gold.py; 82.0-85.0%, mean 83.9%, over seeds 0-9; temperature alone gives 99.2%, flips alone
84.8%); docs/PIPELINE.md has the agreement on the default pipeline's own SFT samples. Most of the
noise is flips on purpose: a flip is as likely for a clear difference as for a small one, so a reward
model trained on many rankings can still learn the gold order everywhere, while temperature noise makes
every small difference a coin toss.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from instruct_jax.data.formats import Ranking
from instruct_jax.instructgpt.task import (CATEGORIES, FORMAT_WORD, FRUIT_COLOR, NUMBER_WORDS, ONES, TENS, TaskPrompt,
                                          TaskSpec, unformatted)

WEIGHTS = {"correctness": 0.6, "format": 0.25, "verbosity": 0.15}
# Words beyond the reference's that cost nothing: a short chat phrase ("The answer is 59.") is not
# verbose (its format already scores 1/2); rambling is.
VERBOSITY_SLACK = 4
_TOKEN = re.compile(r"[A-Za-z]+|\d+")
_NUMBER = re.compile(r"\d+")
_ITEM_WORDS = {w: c for c, items in CATEGORIES.items() for w in items}


@dataclass(frozen=True)
class Score:
    correctness: float
    format: float
    verbosity: float
    total: float
    instruction: Optional[float] = None  # a format instruction (task.FORMATS): 1 followed, 0 not; None: none asked


def _words(text: str) -> list[str]:
    return [w.lower() for w in _TOKEN.findall(text)]


def _positional(a: Sequence, b: Sequence) -> float:
    """Share of positions where a and b agree, over the longer length."""
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b), 1)


def _number_value(words: Sequence[str]) -> Optional[int]:
    """The last number a response states, in digits or spelled out ("fifty nine" = 59)."""
    digits = [int(w) for w in words if w.isdigit()]
    if digits:
        return digits[-1]
    value, after_tens = None, False
    for w in words:
        if w in TENS[2:]:
            value, after_tens = 10 * TENS.index(w), True
        elif w in ONES:
            value = value + ONES.index(w) if after_tens and ONES.index(w) < 10 else ONES.index(w)
            after_tens = False
        else:
            after_tens = False
    return value


def _numeric(spec: TaskSpec, text: str, scale: float) -> tuple[float, float]:
    value = _number_value(_words(text))
    if value is None:
        return 0.0, 0.0
    target = int(spec.reference)
    correct = 1.0 if value == target else max(0.0, 0.5 * (1 - abs(value - target) / scale))
    return correct, 1.0 if re.fullmatch(r"\s*\d+\.?\s*", text) else 0.5


def _letter_overlap(a: str, b: str) -> float:
    """Shared letters (as multisets) over the longer word: 1 for an anagram, 0 for disjoint letters."""
    return sum((Counter(a) & Counter(b)).values()) / max(len(a), len(b), 1)


def _reverse(spec: TaskSpec, text: str) -> tuple[float, float]:
    words = [w for w in _words(text) if w.isalpha()]
    if not words:
        return 0.0, 0.0
    # Only a word made of (mostly) the right letters is an attempt at the answer: "nomal" for "nomel"
    # earns 0.8, while an unrelated word earns nothing for letters it shares by chance.
    correct = max(_positional(w, spec.reference) if _letter_overlap(w, spec.reference) >= 0.6 else 0.0
                  for w in words)
    return correct, 1.0 if re.fullmatch(r"\s*[a-z]+\.?\s*", text) else 0.5


def _order_credit(got: Sequence, target: Sequence) -> float:
    """0.3 multiset overlap + 0.7 positional match: an ordered answer's partial credit (sort, reverse_list)."""
    common = sum(min(got.count(x), target.count(x)) for x in set(target))
    return 0.3 * common / max(len(got), len(target)) + 0.7 * _positional(got, target)


def _sort(spec: TaskSpec, text: str) -> tuple[float, float]:
    nums, target = [int(x) for x in _NUMBER.findall(text)], [int(x) for x in spec.reference.split()]
    if not nums:
        return 0.0, 0.0
    return _order_credit(nums, target), 1.0 if re.fullmatch(r"\s*\d+(\s*,?\s*\d+)*\s*\.?\s*", text) else 0.5


def _spell(spec: TaskSpec, text: str) -> tuple[float, float]:
    words = _words(text)
    spelled = [w for w in words if w in NUMBER_WORDS]
    if not spelled:
        return (0.3, 0.0) if str(spec.params["n"]) in words else (0.0, 0.0)
    exact_shape = all(w in NUMBER_WORDS for w in words) and re.fullmatch(r"[\sa-zA-Z\-]+\.?\s*", text)
    return _positional(spelled, spec.reference.split()), 1.0 if exact_shape else 0.5


def _list(spec: TaskSpec, text: str) -> tuple[float, float]:
    category, count = spec.params["category"], spec.params["count"]
    items = list(dict.fromkeys(w for w in _words(text) if w in _ITEM_WORDS))  # distinct, in order
    valid = [w for w in items if _ITEM_WORDS[w] == category]
    if not valid:
        return 0.0, 0.0
    wrong = len(items) - len(valid)
    correct = max(0.0, min(len(valid), count) - 0.5 * wrong) / count
    parts = [p.strip().lower() for p in text.strip().rstrip(".").split(",")]
    exact_shape = len(parts) == count and all(p in _ITEM_WORDS for p in parts)
    return correct, 1.0 if exact_shape else 0.5


def _constrained(spec: TaskSpec, text: str) -> tuple[float, float]:
    words, fruit = _words(text), spec.params["fruit"]
    color = FRUIT_COLOR[fruit]
    if spec.params["constraint"] == "upper":
        content = float(color in words)
        met = any(c.isalpha() for c in text) and not any(c.islower() for c in text)
        exact_shape = re.fullmatch(r"\s*[A-Za-z]+\.?\s*", text)
    else:
        content = 0.5 * (fruit in words) + 0.5 * (color in words)
        met = len(words) <= spec.params["n"]
        exact_shape = "?" not in text and "\n" not in text.strip()
    if content == 0:
        return 0.0, 0.0
    return content * (0.5 + 0.5 * met), 1.0 if exact_shape else 0.5


def _pick(spec: TaskSpec, text: str) -> tuple[float, float]:
    named = {w for w in _words(text) if w in spec.params["options"]}
    if spec.reference not in named:
        return 0.0, 0.0
    return 1.0 / len(named), 1.0 if re.fullmatch(r"\s*[a-z]+\.?\s*", text) else 0.5


def _repeat(spec: TaskSpec, text: str) -> tuple[float, float]:
    words, word, count = _words(text), spec.params["word"], spec.params["count"]
    k = words.count(word)
    correct = max(0.0, min(k, count) - 0.5 * max(0, k - count)) / count
    exact_shape = all(w == word for w in words) and re.fullmatch(r"\s*[a-z]+([\s,]+[a-z]+)*\.?\s*", text)
    return correct, 1.0 if exact_shape else 0.5


def _reverse_list(spec: TaskSpec, text: str) -> tuple[float, float]:
    items, target = [w for w in _words(text) if w in _ITEM_WORDS], spec.reference.split(", ")
    correct = _order_credit(items, target)
    if not correct:
        return 0.0, 0.0
    parts = [p.strip().lower() for p in text.strip().rstrip(".").split(",")]
    exact_shape = len(parts) == len(target) and all(p in _ITEM_WORDS for p in parts)
    return correct, 1.0 if exact_shape else 0.5


_KINDS = {"reverse": _reverse, "sort": _sort, "add": lambda s, t: _numeric(s, t, 10.0),
          "count": lambda s, t: _numeric(s, t, 3.0), "spell": _spell, "list": _list, "constrained": _constrained,
          "pick": _pick, "repeat": _repeat, "reverse_list": _reverse_list,
          "count_items": lambda s, t: _numeric(s, t, 3.0)}


def strip_format(fmt: str, text: str) -> tuple[str, bool]:
    """(the response without what the format instruction asked for, whether it was there): end -> the last
    word "done" removed; start -> the first word "ok" removed; only -> unchanged (the judge checks that
    nothing but the answer is there)."""
    if fmt == "end":
        m = re.search(rf"\b{FORMAT_WORD['end']}\W*$", text, re.IGNORECASE)
        return (text[:m.start()].rstrip(), True) if m else (text, False)
    if fmt == "start":
        m = re.match(rf"\W*{FORMAT_WORD['start']}\b\W*", text, re.IGNORECASE)
        return (text[m.end():], True) if m else (text, False)
    return text, True


def _verbosity(spec: TaskSpec, text: str) -> float:
    allowed = len(_words(spec.reference)) + VERBOSITY_SLACK
    if spec.kind == "constrained" and spec.params["constraint"] == "max_words":
        allowed = spec.params["n"]
    extra = len(_words(text)) - allowed
    return 1.0 if extra <= 0 else max(0.0, 1.0 - extra / (2 * allowed + 4))


class GoldJudge:
    """Scores responses to task specs; `calls` counts every response scored."""

    def __init__(self):
        self.calls = 0

    def score(self, spec: TaskSpec, response: str) -> Score:
        self.calls += 1
        fmt = spec.params.get("format")
        if not fmt:
            return self._score(spec, response)
        content, followed = strip_format(fmt, response)
        s = self._score(unformatted(spec), content)
        followed = followed and (fmt != "only" or s.format == 1.0)  # only: nothing beside the answer
        return Score(s.correctness, s.format, s.verbosity, round(s.total * (0.5 + 0.5 * followed), 9),
                     float(followed))

    def _score(self, spec: TaskSpec, response: str) -> Score:
        if spec.kind not in _KINDS:
            raise ValueError(f"unknown task kind {spec.kind!r}")
        if not response.strip():
            return Score(0.0, 0.0, 0.0, 0.0)
        correct, fmt = _KINDS[spec.kind](spec, response)
        if correct == 0:  # nothing of the answer: no answer whose shape or length could earn credit
            return Score(0.0, 0.0, 0.0, 0.0)
        verbose = _verbosity(spec, response)
        total = (WEIGHTS["correctness"] * correct + WEIGHTS["format"] * fmt + WEIGHTS["verbosity"] * verbose)
        return Score(correct, fmt, verbose, round(total, 9))  # rounded: equal answers' totals compare equal

    def totals(self, spec: TaskSpec, responses: Sequence[str]) -> np.ndarray:
        return np.array([self.score(spec, r).total for r in responses])


# ----------------------------------------------------------------------------- labeler
class LabelBudgetExhausted(RuntimeError):
    """The labeler's comparison budget would be exceeded by this ranking."""


class Labeler:
    """Ranks K responses to a prompt like a noisy human would, from the gold totals.

    temperature   Plackett-Luce temperature on gold totals in [0, 1]; 0 = the gold order exactly
    flip_rate     probability of swapping each adjacent pair of the sampled order (one top-down pass)
    max_comparisons  budget of pairwise comparisons, C(K, 2) per ranking; 0 = unlimited
    seed          the labeler's noise; rankings are reproducible for a seed and call order
    """

    def __init__(self, judge: GoldJudge, temperature: float = 0.02, flip_rate: float = 0.3,
                 max_comparisons: int = 0, seed: int = 0):
        if temperature < 0 or not 0.0 <= flip_rate <= 1.0 or max_comparisons < 0:
            raise ValueError(f"need temperature >= 0, 0 <= flip_rate <= 1, max_comparisons >= 0; got "
                             f"{temperature}, {flip_rate}, {max_comparisons}")
        self.judge, self.temperature, self.flip_rate = judge, temperature, flip_rate
        self.max_comparisons = max_comparisons
        self.rng = np.random.default_rng(seed)
        self.comparisons = 0
        self.rankings = 0
        self.all_tied = 0  # prompts skipped because every response had the same gold total
        self.last_totals = np.zeros(0)

    def rank_totals(self, totals: Sequence[float]) -> tuple[int, ...]:
        """Noisy ranks (1 = best, gold ties share a rank) for K gold totals; no judge call."""
        totals = np.asarray(totals, float)
        groups = np.unique(totals)  # ascending distinct totals = tie groups
        if self.temperature > 0:
            keys = groups / self.temperature + self.rng.gumbel(size=groups.size)  # Gumbel-max = a PL sample
        else:
            keys = groups + 0.0
        order = list(np.argsort(-keys, kind="stable"))  # group indices, best first
        for i in range(len(order) - 1):
            if self.rng.random() < self.flip_rate:
                order[i], order[i + 1] = order[i + 1], order[i]
        place = {int(g): p + 1 for p, g in enumerate(order)}
        return tuple(place[int(np.searchsorted(groups, t))] for t in totals)

    def rank(self, prompt: TaskPrompt, responses: Sequence[str]) -> Optional[Ranking]:
        """A Ranking of the responses (docs/DATA.md "ranking"), or None when gold ties them all."""
        k = len(responses)
        if not 2 <= k <= 9:
            raise ValueError(f"a ranking holds 2..9 responses, got {k}")
        cost = math.comb(k, 2)
        if self.max_comparisons and self.comparisons + cost > self.max_comparisons:
            raise LabelBudgetExhausted(f"{self.comparisons} of {self.max_comparisons} comparisons used; "
                                       f"this ranking needs {cost}")
        self.comparisons += cost
        totals = self.judge.totals(prompt.spec, responses)
        self.last_totals = totals  # the gold totals behind the latest ranking (agreement without re-judging)
        if np.unique(totals).size < 2:
            self.all_tied += 1
            return None
        self.rankings += 1
        return Ranking(tuple(prompt.messages), tuple(responses), self.rank_totals(totals))

    def report(self) -> dict:
        return {"rankings": self.rankings, "all_tied": self.all_tied, "comparisons": self.comparisons,
                "max_comparisons": self.max_comparisons, "judge_calls": self.judge.calls}
