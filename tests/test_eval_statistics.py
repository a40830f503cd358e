"""Issue 25's evaluation arithmetic on hand-made inputs: the tau = 1 paired win rate, max_response_share,
calibration (ECE), best-of-n's KL over the distinct samples drawn, the scorers on held-out label rankings,
and the summary's new sections against naive loops written here."""

import itertools
import math

import numpy as np
import pytest

from instruct_jax.instructgpt.evaluate import EvalSettings, best_of_n_kl_measured, heldout_label_summary, summarize
from instruct_jax.instructgpt.statistics import (best_of_n_kl, best_of_n_kl_exact, calibration, max_response_share,
                                                 paired_sample_outcomes)


# ----------------------------------------------------------------------------- tau = 1 paired win rate
def test_paired_sample_outcomes_by_hand():
    # prompt 0: pairs (1 vs 0) win, (0 vs 0) tie -> 0.75; prompt 1: (0.5 vs 0.5) tie, (0.5 vs 1) loss -> 0.25
    np.testing.assert_allclose(paired_sample_outcomes([[1, 0], [0.5, 0.5]], [[0, 0], [0.5, 1]]), [0.75, 0.25])
    # pairing is by sample index, not best against best: A = [1, 0], B = [0, 1] is two decided pairs, 1/2
    np.testing.assert_allclose(paired_sample_outcomes([[1, 0]], [[0, 1]]), [0.5])
    with pytest.raises(ValueError):
        paired_sample_outcomes([[1, 0]], [[0, 1, 1]])


# ----------------------------------------------------------------------------- repeated wrong responses
def test_max_response_share_counts_only_prompts_the_response_is_wrong_for():
    # "1." is the correct answer for three prompts: it does not count; "8" is wrong twice: 2 of 6
    texts = ["1.", "1.", " 1.", "8", "8 ", "x"]
    assert max_response_share(texts, [True, True, True, False, False, False]) == (pytest.approx(2 / 6), "8")
    # the same "1." wrong for three of four prompts counts those three: 3 of 6
    assert max_response_share(["1.", "1.", "1.", "1.", "8", "x"], [True, False, False, False, False, False]) == \
        (pytest.approx(3 / 6), "1.")
    assert max_response_share(["a", "b"], [True, True]) == (0.0, "")  # every response right
    assert max_response_share(["a", "b"], [False, False]) == (0.5, "a")  # ties in count by text


# ----------------------------------------------------------------------------- calibration
def test_calibration_by_hand():
    ece, bins = calibration([0.1, 0.3, 0.8, 0.9], [0, 1, 1, 1], bins=2)
    assert ece == pytest.approx(0.5 * abs(0.5 - 0.2) + 0.5 * abs(1.0 - 0.85))
    assert [(b["count"], b["frequency"]) for b in bins] == [(2, 0.5), (2, 1.0)]
    assert calibration([0.25] * 4, [1, 0, 0, 0])[0] == pytest.approx(0.0)  # calibrated
    assert calibration([1.0, 1.0], [0, 0], bins=10)[1][0]["low"] == 0.9  # p = 1 lands in the last bin
    assert calibration([1.0, 1.0], [0, 0])[0] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- best-of-n KL
def test_best_of_n_kl_exact_by_hand():
    # two equally likely responses, n = 2: best-of-2 gives the better one 3/4
    assert best_of_n_kl_exact([0.0, 0.0], [0.0, 1.0], 2) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # q = (1/4, 3/4) from unnormalized log-probs (log 1, log 3), the likelier one worse: best-of-2 P = (7/16, 9/16)
    expected = 0.5625 * math.log(0.5625 / 0.75) + 0.4375 * math.log(0.4375 / 0.25)
    assert best_of_n_kl_exact([0.0, math.log(3.0)], [1.0, 0.0], 2) == pytest.approx(expected)
    assert best_of_n_kl_exact([-3.0], [0.2], 16) == 0.0  # one distinct response: best-of-n is the sampler
    assert best_of_n_kl_exact([-1.0, -2.0], [0.5, 0.5], 4) == pytest.approx(0.0)  # equal rewards act as one
    assert best_of_n_kl_exact([-1.0, -2.0, -0.5], [0.1, 0.7, 0.3], 1) == pytest.approx(0.0)


def test_best_of_n_kl_exact_matches_a_simulation_and_stays_under_the_bound():
    rng = np.random.default_rng(0)
    logp, reward, n = np.log([0.1, 0.2, 0.3, 0.4]), np.array([0.3, 0.9, 0.1, 0.5]), 3
    q = np.exp(logp)
    draws = rng.choice(4, size=(200_000, n), p=q)
    picks = draws[np.arange(len(draws)), np.argmax(reward[draws], axis=1)]
    freq = np.bincount(picks, minlength=4) / len(picks)
    simulated = float(np.sum(freq * np.log(freq / q)))
    assert best_of_n_kl_exact(logp, reward, n) == pytest.approx(simulated, abs=3e-3)
    for m in (2, 5, 50):  # m equally likely distinct responses: below the continuous bound, reaching it as m grows
        kl = best_of_n_kl_exact(np.zeros(m), np.arange(m), 16)
        assert kl < best_of_n_kl(16)
    assert best_of_n_kl_exact(np.zeros(5000), np.arange(5000), 16) == pytest.approx(best_of_n_kl(16), abs=5e-3)


def test_best_of_n_kl_measured_dedupes_repeated_samples():
    # four samples, two distinct texts (one drawn three times): the KL of best-of-2 over {a, b}
    samples = [{"text": "a", "logp": 0.0, "rm": 1.0}, {"text": "b ", "logp": 0.0, "rm": 0.0},
               {"text": "a", "logp": 0.0, "rm": 1.0}, {"text": "b", "logp": 0.0, "rm": 0.0}]
    assert best_of_n_kl_measured(samples, 2) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert best_of_n_kl_measured(samples[:1] * 4, 16) == 0.0  # the same text 4 times: no KL at all


# ----------------------------------------------------------------------------- held-out label rankings
def test_heldout_label_summary_by_hand():
    # labeler ranks a > b > c; gold says b > a > c (one noisy flip)
    ranking = {"responses": ["aaaa", "b", "cc"], "ranks": [1, 2, 3], "gold": [0.5, 0.9, 0.1],
               "rm": [1.0, 1.0, -1.0], "sft_logp": [-3.0, -1.0, -2.0]}
    s = heldout_label_summary([ranking], rm_gain=2.0)
    assert s["pairs"] == 3 and s["rankings"] == 1
    assert s["labeler_ceiling"] == pytest.approx(2 / 3)  # (a, b) disagrees, (a, c) and (b, c) agree
    assert s["rm"] == pytest.approx(2.5 / 3)  # the RM ties a and b: 1/2
    assert s["sft_logprob"] == pytest.approx(1 / 3)  # prefers b over a and c over a
    assert s["longer_answer"] == pytest.approx(2 / 3)  # a (4 chars) over both; c over b is wrong
    # calibration: raw differences (normalized / gain 2) 0, 1, 1 -> p = 0.5, s(1), s(1), every pair won by A;
    # both orientations: bins 0.5 (y 1, 0: calibrated), 0.7 (2 at s(1), y = 1), 0.2 (2 at s(-1), y = 0)
    sig = 1 / (1 + math.exp(-1))
    assert s["rm_ece"] == pytest.approx(2 / 6 * (1 - sig) + 2 / 6 * (1 - sig))
    assert sorted(b["count"] for b in s["reliability"]) == [2, 2, 2]
    tied = dict(ranking, ranks=[1, 1, 2], gold=[0.5, 0.5, 0.1])  # labeler ties (gold ties) are not pairs
    assert heldout_label_summary([tied])["pairs"] == 2


# ----------------------------------------------------------------------------- the summary's new sections
def _response(total, correctness=None, rm=0.0, text="x", logp=None):
    o = {"text": text, "rm": rm, "tokens": 3, "stopped": True,
         "gold": {"correctness": total if correctness is None else correctness, "format": 0.5, "verbosity": 1.0,
                  "total": total}}
    if logp is not None:
        o["logp"] = logp
    return o


def test_summary_tau1_gains_and_best_of_n_against_naive_loops():
    rng = np.random.default_rng(1)
    kinds = ["add", "sort", "pick", "repeat"]
    rows = []
    for i in range(40):
        grid = [0.0, 0.25, 0.5, 1.0]
        rows.append({"spec": {"kind": kinds[i % 4]}, "prompt_truncated": i % 10 == 0, "responses": {
            "sft": _response(float(rng.choice(grid)), text=str(i % 3)),
            "ppo": _response(float(rng.choice(grid)), text="7" if i % 2 else str(i))},
            "samples": [_response(float(rng.choice(grid)), rm=float(rng.normal()), text=str(rng.integers(3)),
                                  logp=float(-rng.uniform(1, 4))) for _ in range(4)],
            "tau1": {p: [_response(float(rng.choice(grid))) for _ in range(4)] for p in ("sft", "ppo")}})
    s = summarize(rows, EvalSettings(best_of=(4,), kl_pairs=(), win_pairs=(("ppo", "sft"),)))
    assert s["truncated_prompts"] == 4
    # tau = 1: the i-th PPO sample against the i-th SFT sample, averaged per prompt, then over prompts
    per_prompt = []
    for r in rows:
        pairs = [(a["gold"]["total"], b["gold"]["total"]) for a, b in zip(r["tau1"]["ppo"], r["tau1"]["sft"])]
        per_prompt.append(np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs]))
    t = s["tau1"]["win_rates"]["ppo_vs_sft"]
    assert t["win_rate"] == pytest.approx(np.mean(per_prompt)) and t["ci_low"] <= t["win_rate"] <= t["ci_high"]
    gain = np.mean([np.mean([o["gold"]["total"] for o in r["tau1"]["ppo"]]) -
                    np.mean([o["gold"]["total"] for o in r["tau1"]["sft"]]) for r in rows])
    assert t["gold_gain"]["mean"] == pytest.approx(gain)
    # greedy gold gain on the original seven kinds alone (add, sort) and per kind
    h = s["win_rates"]["ppo_vs_sft"]
    orig = [r["responses"]["ppo"]["gold"]["total"] - r["responses"]["sft"]["gold"]["total"] for r in rows
            if r["spec"]["kind"] in ("add", "sort")]
    assert h["original_kinds"]["gold_gain"]["mean"] == pytest.approx(np.mean(orig))
    assert h["original_kinds"]["gold_gain"]["prompts"] == 20 and set(h["by_kind"]) == set(kinds)
    # "7" is PPO's answer to the 20 odd prompts: wrong wherever its correctness is not 1
    wrong7 = sum(1 for r in rows if r["responses"]["ppo"]["text"] == "7" and r["responses"]["ppo"]["gold"]["correctness"] != 1)
    assert s["max_response_share"]["ppo"]["share"] == pytest.approx(wrong7 / 40)
    # best-of-4 vs best-of-1, paired per prompt; KL exact over each prompt's distinct samples
    pick = [max(r["samples"], key=lambda o: o["rm"]) for r in rows]  # no exact rm ties with normal draws
    b4 = s["best_of_n"]["4"]
    assert b4["gold_gain_vs_1"]["mean"] == pytest.approx(np.mean([p["gold"]["total"] - r["samples"][0]["gold"]["total"]
                                                                  for p, r in zip(pick, rows)]))
    assert b4["kl_bound"] == pytest.approx(best_of_n_kl(4)) and b4["kl"] < b4["kl_bound"]
    assert s["best_of_n"]["1"]["kl"] == pytest.approx(0.0, abs=1e-12)
    kls = []
    for r in rows:
        distinct = {}
        for o in r["samples"]:
            distinct.setdefault(o["text"], o)
        q = np.exp([o["logp"] for o in distinct.values()])
        q /= q.sum()
        rw = np.array([o["rm"] for o in distinct.values()])
        # P(best-of-4 picks j) = P(all 4 draws have reward <= r_j) - P(all 4 have reward < r_j)
        p = np.array([q[rw <= x].sum() ** 4 - q[rw < x].sum() ** 4 for x in rw])
        kls.append(float(np.sum([a * math.log(a / b) for a, b in zip(p, q) if a > 0])))
    assert b4["kl"] == pytest.approx(np.mean(kls))


def test_pairwise_agreement_ties_and_every_pair_once():
    """heldout_label_summary visits each unordered pair once: the pair count is C(K, 2) minus labeler ties."""
    rng = np.random.default_rng(2)
    rankings = []
    for _ in range(20):
        k = int(rng.integers(2, 7))
        ranks = list(rng.integers(1, 4, size=k))
        rankings.append({"responses": ["x" * int(n) for n in rng.integers(1, 9, size=k)], "ranks": ranks,
                         "gold": list(rng.random(k)), "rm": list(rng.normal(size=k)), "sft_logp": list(-rng.random(k))})
    s = heldout_label_summary(rankings)
    pairs = sum(1 for r in rankings for i, j in itertools.combinations(range(len(r["ranks"])), 2)
                if r["ranks"][i] != r["ranks"][j])
    assert s["pairs"] == pairs and sum(b["count"] for b in s["reliability"]) == 2 * pairs


# ----------------------------------------------------------------------------- report plumbing
def test_oracle_win_rate_is_read_when_present_and_unmeasured_checks_fail():
    from instruct_jax.instructgpt.report import _check, oracle_win_rate

    assert oracle_win_rate({}) is None
    assert oracle_win_rate({"oracle": {"step": 40}, "eval": {"win_rates": {"oracle_vs_sft": {"win_rate": 0.8}}}}) == 0.8
    missing = _check(None, "CI low > 0", lambda: True)
    assert missing["passed"] is False and missing["threshold"].endswith("(not measured)")
    assert _check([0.7, None], "x", lambda: True)["passed"] is False
    assert _check(0.01, "CI low > 0", lambda: 0.01 > 0) == {"value": 0.01, "threshold": "CI low > 0", "passed": True}
