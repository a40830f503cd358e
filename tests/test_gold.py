"""The gold judge (worked examples per kind), the simulated labeler and the evaluation metrics."""

import itertools
import math

import numpy as np
import pytest

from instruct_jax.data.formats import check_ranks
from instruct_jax.instructgpt.gold import WEIGHTS, GoldJudge, LabelBudgetExhausted, Labeler
from instruct_jax.instructgpt.statistics import (agreement_rate, best_of_n_kl, bootstrap_ci, head_to_head,
                                                 pair_agreement, ranking_agreement)
from instruct_jax.instructgpt.task import (DEMO_PHRASES, KINDS, Task, TaskPrompt, TaskSpec, make_prompt, near_miss,
                                           sample_response)


def spec(kind, reference, **params):
    return TaskSpec(kind, params, reference, 0, False)


def test_reference_gets_full_marks_for_every_kind():
    judge, rng = GoldJudge(), np.random.default_rng(0)
    for kind in KINDS:
        for held_out in (False, True):
            for _ in range(40):
                p = make_prompt(kind, rng, held_out)
                s = judge.score(p.spec, p.spec.reference)
                assert (s.correctness, s.format, s.verbosity, s.total) == (1, 1, 1, 1), (p.text, p.spec.reference)
    assert judge.calls == len(KINDS) * 2 * 40
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


# (spec, response, correctness, format) — one partial answer per kind, and a chatty / empty case.
WORKED = [
    (spec("reverse", "nomel", word="lemon"), "nomal", 0.8, 1.0),
    (spec("reverse", "nomel", word="lemon"), "It is nomel.", 1.0, 0.5),
    (spec("reverse", "nomel", word="lemon"), "lemon", 0.2, 1.0),  # the right letters, unreversed: m in place
    (spec("sort", "2 5 9", nums=[9, 2, 5]), "2 9 5", 0.3 + 0.7 / 3, 1.0),
    (spec("sort", "2 5 9", nums=[9, 2, 5]), "2 5", 0.3 * 2 / 3 + 0.7 * 2 / 3, 1.0),
    (spec("add", "19", a=12, b=7), "19", 1.0, 1.0),
    (spec("add", "19", a=12, b=7), "The answer is 18.", 0.45, 0.5),
    (spec("add", "19", a=12, b=7), "nineteen", 1.0, 0.5),
    (spec("count", "3", word="banana", letter="a"), "2", 0.5 * (1 - 1 / 3), 1.0),
    (spec("spell", "forty two", n=42), "forty three", 0.5, 1.0),
    (spec("spell", "forty two", n=42), "42", 0.3, 0.0),
    (spec("list", "cat, dog, owl", category="animals", count=3), "cat, dog", 2 / 3, 0.5),
    (spec("list", "cat, dog, owl", category="animals", count=3), "cat, dog, lemon", (2 - 0.5) / 3, 1.0),
    (spec("list", "cat, dog, owl", category="animals", count=3), "pig, cow, fox", 1.0, 1.0),
    (spec("constrained", "a lemon is yellow", fruit="lemon", n=4, constraint="max_words"),
     "a lemon is very yellow and sour", 1.0 * 0.5, 1.0),
    (spec("constrained", "a lemon is yellow", fruit="lemon", n=4, constraint="max_words"), "it is yellow", 0.5, 1.0),
    (spec("constrained", "YELLOW", fruit="lemon", n=4, constraint="upper"), "yellow", 0.5, 1.0),
    (spec("constrained", "YELLOW", fruit="lemon", n=4, constraint="upper"), "GREEN", 0.0, 0.0),
    (spec("add", "19", a=12, b=7), "  ", 0.0, 0.0),
    (spec("pick", "plum", category="fruits", options=["cat", "plum", "saw"]), "plum", 1.0, 1.0),
    (spec("pick", "plum", category="fruits", options=["cat", "plum", "saw"]), "Sure! plum.", 1.0, 0.5),
    (spec("pick", "plum", category="fruits", options=["cat", "plum", "saw"]), "plum, cat", 0.5, 0.5),
    (spec("pick", "plum", category="fruits", options=["cat", "plum", "saw"]), "cat, plum, saw", 1 / 3, 0.5),
    (spec("repeat", "cat cat cat", word="cat", count=3), "cat cat", 2 / 3, 1.0),
    (spec("repeat", "cat cat cat", word="cat", count=3), "cat cat cat cat", (3 - 0.5) / 3, 1.0),
    (spec("repeat", "cat cat cat", word="cat", count=3), "The answer is cat cat cat.", 1.0, 0.5),
    (spec("reverse_list", "fig, owl, cat", items=["cat", "owl", "fig"]), "cat, owl, fig", 0.3 + 0.7 / 3, 1.0),
    (spec("reverse_list", "fig, owl, cat", items=["cat", "owl", "fig"]), "fig, owl", 0.3 * 2 / 3 + 0.7 * 2 / 3, 0.5),
    (spec("count_items", "4", items=["cat", "owl", "fig", "saw"]), "3", 0.5 * (1 - 1 / 3), 1.0),
]


@pytest.mark.parametrize("s,response,correctness,fmt", WORKED)
def test_partial_credit_worked_examples(s, response, correctness, fmt):
    score = GoldJudge().score(s, response)
    assert score.correctness == pytest.approx(correctness) and score.format == fmt
    expected = (WEIGHTS["correctness"] * score.correctness + WEIGHTS["format"] * score.format
                + WEIGHTS["verbosity"] * score.verbosity)
    assert score.total == pytest.approx(expected)


def test_a_response_without_the_answer_earns_nothing():
    """Correctness 0 zeroes every component: a bare wrong word is not a well-formatted answer."""
    judge = GoldJudge()
    # "north" matches "nomel" in two places, but shares only 2 of 5 letters: not an attempt at it
    for s, response in [(spec("reverse", "nomel", word="lemon"), "north"), (spec("add", "19", a=12, b=7), "cat"),
                        (spec("spell", "forty two", n=42), "lemon"), (spec("sort", "2 5 9", nums=[9, 2, 5]), "dog")]:
        score = judge.score(s, response)
        assert (score.correctness, score.format, score.verbosity, score.total) == (0, 0, 0, 0), response


def test_partial_answers_score_between_wrong_and_right_for_every_kind():
    judge, rng = GoldJudge(), np.random.default_rng(1)
    for kind in KINDS:
        partial = [judge.score(p.spec, near_miss(p.spec, rng)).total
                   for p in (make_prompt(kind, rng) for _ in range(30))]
        assert 0.2 < np.mean(partial) < 1.0, kind


def test_verbosity_falls_with_length():
    judge, s = GoldJudge(), spec("add", "19", a=12, b=7)
    v = [judge.score(s, "19 " + "well " * n).verbosity for n in (0, 2, 5, 10, 40)]
    assert v[0] == v[1] == 1.0 and v[1] > v[2] > v[3] > v[4] == 0.0


# ----------------------------------------------------------------------------- labeler
def prompt(s):
    return TaskPrompt(({"role": "user", "content": "q"},), s)


def test_zero_temperature_no_flips_gives_the_gold_order_with_ties():
    s = spec("add", "19", a=12, b=7)
    responses = ["19", "18", "The answer is 19.", "19", "5", "cat"]
    labeler = Labeler(GoldJudge(), temperature=0.0, flip_rate=0.0)
    ranking = labeler.rank(prompt(s), responses)
    # "19" twice: a gold tie kept as a tie; "5" (off by 14) and "cat" have none of the answer: both 0, tied
    assert ranking.ranks == (1, 3, 2, 1, 4, 4)
    check_ranks(list(ranking.ranks), len(responses))
    assert labeler.judge.calls == 6 and labeler.comparisons == 15


def test_zero_temperature_reproduces_gold_order_on_random_sets():
    judge, labeler, rng = GoldJudge(), Labeler(GoldJudge(), 0.0, 0.0), np.random.default_rng(2)
    for p in Task(3).train_prompts(100):
        responses = [sample_response(p.spec, rng) for _ in range(int(rng.integers(4, 10)))]
        gold = judge.totals(p.spec, responses)
        ranking = labeler.rank(p, responses)
        if ranking is None:
            assert len(set(gold)) == 1
            continue
        agree, n = ranking_agreement(ranking.ranks, gold)
        assert agree == n
        for i, j in itertools.combinations(range(len(gold)), 2):
            assert (gold[i] == gold[j]) == (ranking.ranks[i] == ranking.ranks[j])


def test_labeler_is_seeded_and_skips_all_tied():
    s = spec("add", "19", a=12, b=7)
    responses = ["19", "18", "17", "The answer is 19.", "5", "cat", "12"]
    a = [Labeler(GoldJudge(), seed=4).rank(prompt(s), responses).ranks for _ in range(2)]
    assert a[0] == a[1]
    labeler = Labeler(GoldJudge())
    assert labeler.rank(prompt(s), ["19", "19"]) is None and labeler.all_tied == 1


def test_comparison_budget():
    s = spec("add", "19", a=12, b=7)
    labeler = Labeler(GoldJudge(), max_comparisons=10)
    labeler.rank(prompt(s), ["19", "18", "17", "5"])  # 6 comparisons
    with pytest.raises(LabelBudgetExhausted):
        labeler.rank(prompt(s), ["19", "18", "17"])  # 3 more: 9 <= 10, fine; 3 more again would be 12
        labeler.rank(prompt(s), ["19", "18", "17"])
    assert labeler.comparisons == 9 and labeler.report()["judge_calls"] == 7


MEASURED_AGREEMENT = 0.8496  # docs/BUILTIN_TASK.md; Task(0), 600 prompts, K = 4..9, default labeler


def test_default_labeler_agreement_with_gold_is_human_like():
    """InstructGPT's labelers agreed with each other ~73% of the time; ours agree with gold 70-85%."""
    judge, labeler, rng = GoldJudge(), Labeler(GoldJudge(), seed=0), np.random.default_rng(0)
    counts = []
    for p in Task(0).train_prompts(600):
        responses = [sample_response(p.spec, rng) for _ in range(int(rng.integers(4, 10)))]
        ranking = labeler.rank(p, responses)
        if ranking is not None:
            counts.append(ranking_agreement(ranking.ranks, judge.totals(p.spec, responses)))
    rate = agreement_rate(counts)
    assert 0.70 <= rate <= 0.85
    assert rate == pytest.approx(MEASURED_AGREEMENT, abs=1e-4)


def test_a_demonstrators_phrase_costs_format_before_or_after_the_answer():
    judge, rng = GoldJudge(), np.random.default_rng(1)
    for kind in KINDS:
        for _ in range(30):
            s = make_prompt(kind, rng).spec
            scores = {judge.score(s, phrase.format(s.reference)) for phrases in DEMO_PHRASES.values()
                      for phrase in phrases}
            if kind != "constrained":  # the answer is still read out, in a readable but wrong shape
                assert {(x.correctness, x.format) for x in scores} == {(1.0, 0.5)}
            elif s.params["constraint"] == "upper":  # lower-case letters break the rule
                assert {(x.correctness, x.format) for x in scores} == {(0.5, 0.5)}


# ----------------------------------------------------------------------------- metrics
def test_pair_agreement_hand_cases():
    assert pair_agreement([3, 1, 2], [0.9, 0.1, 0.5]) == (3.0, 3)
    assert pair_agreement([1, 1, 0], [2, 1, 1]) == (1.5, 2)  # gold tie (1, 1) skipped; predicted tie = 1/2
    assert pair_agreement([3, 1, 2], [0.9, 0.1, 0.5], same=[1, 0, 1]) == (1.0, 1)  # only the pair labelled alike
    assert pair_agreement([1, 2, 3], [0.9, 0.1, 0.5], same=[1, 0, 1], want_same=False) == (1.0, 2)
    assert ranking_agreement([2, 1], [0.9, 0.1]) == (0.0, 1)
    assert agreement_rate([(3.0, 3), (1.5, 2), (0.0, 1)]) == 4.5 / 6


def test_head_to_head_ties_count_half_and_ci_covers():
    r = head_to_head([1, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1])
    assert r["win_rate"] == 0.625 and (r["wins"], r["ties"], r["losses"], r["prompts"]) == (2, 1, 1, 4)
    assert r["ci_low"] <= 0.625 <= r["ci_high"]
    same = head_to_head([0.3] * 50, [0.3] * 50)
    assert same["win_rate"] == same["ci_low"] == same["ci_high"] == 0.5
    all_win = head_to_head([1.0] * 10, [0.0] * 10)
    assert (all_win["ci_low"], all_win["ci_high"]) == (1.0, 1.0)


def test_bootstrap_ci_matches_normal_approximation():
    rng = np.random.default_rng(0)
    o = (rng.random(400) < 0.6).astype(float)
    lo, hi = bootstrap_ci(o, num_resamples=4000, seed=1)
    half = 1.96 * o.std() / math.sqrt(o.size)
    assert lo == pytest.approx(o.mean() - half, abs=0.01) and hi == pytest.approx(o.mean() + half, abs=0.01)
    assert bootstrap_ci(o, seed=1) == bootstrap_ci(o, seed=1)


def test_best_of_n_kl():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    # Monte Carlo check on a continuous base distribution: KL(best-of-n || base) over n uniform draws.
    n = 4
    x = np.linspace(0.0005, 0.9995, 1000)  # quantiles of the base; best-of-n density is n u^(n-1)
    density = n * x ** (n - 1)
    assert np.mean(density * np.log(density)) == pytest.approx(best_of_n_kl(n), abs=1e-3)
    with pytest.raises(ValueError):
        best_of_n_kl(0)


@pytest.mark.parametrize("fmt, followed, ignored", [
    ("end", ["sixty one done", "sixty one. Done.", "sixty one, done!"], ["sixty one", "done sixty one"]),
    ("start", ["ok sixty one", "OK, sixty one", "Ok: sixty one"], ["sixty one", "sixty one ok"]),
    ("only", ["sixty one", "sixty one."], ["The answer is sixty one.", "Sure! sixty one."]),
])
def test_a_format_instruction_halves_a_right_answer_that_ignores_it(fmt, followed, ignored):
    from instruct_jax.instructgpt.task import make_prompt, with_format

    prompt = make_prompt("spell", np.random.default_rng(0))
    base = GoldJudge().score(prompt.spec, prompt.spec.reference)
    spec = with_format(prompt, fmt, 0).spec
    spec = type(spec)(spec.kind, {**spec.params, "n": 61}, spec.reference.replace(prompt.spec.reference, "sixty one"),
                      spec.template, spec.held_out)
    judge = GoldJudge()
    assert judge.score(spec, spec.reference).total == 1.0 == base.total
    for text in followed:
        s = judge.score(spec, text)
        assert s.instruction == 1.0 and s.correctness == 1.0, text
    for text in ignored:
        s = judge.score(spec, text)
        assert s.instruction == 0.0, text
        plain = GoldJudge().score(type(spec)("spell", {"n": 61}, "sixty one", 0, False), text)
        assert s.total == pytest.approx(plain.total / 2), text  # the content's score, halved
    assert judge.score(spec, "fifty").total == 0.0  # no answer: nothing, followed or not
