"""The built-in task: seeded data, held-out paraphrases, plain-text pretraining corpus, repo formats."""

import re

import numpy as np
import pytest

from instruct_jax.data.formats import check_conversation
from instruct_jax.instructgpt.task import (ADD_MAX, CATEGORIES, COPY_KINDS, KINDS, ORIGINAL_KINDS, SHARED_KINDS,
                                           SHORT_WORDS, SORT_MAX, SORT_SIZES, TEMPLATES, Task, TaskPrompt, TaskSpec,
                                           make_prompt, reported_request, spell_number, template_text)


def _pattern(kind: str, template: int, held_out: bool) -> re.Pattern:
    """A template as a regex: every {slot} matches any text."""
    body = template_text(kind, template, held_out)[1]
    parts = re.split(r"\{[a-z]+\}", body)
    return re.compile("^" + "(.+?)".join(map(re.escape, parts)) + "$")


HELD_OUT = [_pattern(k, i, True) for k in KINDS for i in range(len(TEMPLATES[k][1]))]
TRAIN = [_pattern(k, i, False) for k in KINDS for i in range(len(TEMPLATES[k][0]))]


@pytest.fixture(scope="module")
def task():
    return Task(seed=0)


def test_at_least_six_kinds_with_train_and_held_out_templates():
    assert len(KINDS) >= 6
    for kind in KINDS:
        train, held = TEMPLATES[kind]
        assert len(train) >= 3 and len(held) >= 2 and not set(train) & set(held)


def test_same_seed_same_data_other_seed_other_data(task):
    again, other = Task(seed=0), Task(seed=1)
    assert [p.to_row() for p in task.eval_prompts()] == [p.to_row() for p in again.eval_prompts()]
    assert task.sft_demos(50) == again.sft_demos(50)
    assert task.pretrain_corpus(20) == again.pretrain_corpus(20)
    assert [p.text for p in task.train_prompts(50)] == [p.text for p in again.train_prompts(50)]
    assert [p.text for p in task.eval_prompts()] != [p.text for p in other.eval_prompts()]
    assert task.sft_demos(50) != other.sft_demos(50)
    assert task.pretrain_corpus(20) != other.pretrain_corpus(20)


def test_eval_prompts_size_kinds_and_held_out_share(task):
    prompts = task.eval_prompts()
    assert len(prompts) >= 200
    held = [p for p in prompts if p.spec.held_out]
    assert len(held) / len(prompts) >= 0.3
    assert {p.spec.kind for p in held} == set(ORIGINAL_KINDS) == set(task.kinds)
    for p in held:  # the flag tells the truth: the wording is a held-out paraphrase
        assert any(pat.match(p.text) for pat in HELD_OUT)


def test_held_out_paraphrases_never_in_training(task):
    training = [p.text for p in task.train_prompts(2000)] + [d[0]["content"] for d in task.sft_demos(500)]
    for text in training:
        assert not any(pat.match(text) for pat in HELD_OUT), text
        assert any(pat.match(text) for pat in TRAIN), text


def test_eval_instances_not_trained_on(task):
    eval_keys = {p.spec.key() for p in task.eval_prompts() if p.spec.kind not in SHARED_KINDS}
    eval_texts = {p.text for p in task.eval_prompts()}
    for p in task.train_prompts(1000) + task.sft_prompts(400):
        assert p.spec.key() not in eval_keys and p.text not in eval_texts


def test_demos_are_conversations_answered_with_the_reference(task):
    demos = task.sft_demos(300)
    assert len(demos) == 300 and {d[0]["content"] for d in demos}  # distinct-ish prompts exist
    for d in demos:
        check_conversation(d)
        assert [m["role"] for m in d] == ["user", "assistant"]
        assert len(d[1]["content"].split()) <= 8  # short answers: a few dozen tokens at most
    kinds = {p.spec.kind for p in task.sft_prompts(300)}
    assert kinds == set(task.kinds)


def test_pretrain_corpus_is_plain_text_not_instructions(task):
    corpus = task.pretrain_corpus(300)
    assert len(corpus) == 300
    for doc in corpus:
        assert "?" not in doc and "<|" not in doc
        for sentence in doc.split(". "):
            s = sentence.strip().rstrip(".") + "."
            assert not any(pat.match(s) for pat in TRAIN + HELD_OUT), s
    words = {w for doc in corpus for w in re.findall(r"[a-z]+", doc)}
    assert len(words) < 400  # a small vocabulary a ~1k sentencepiece model covers


def test_rows_round_trip_and_specs_are_judgeable(task):
    for p in task.eval_prompts()[:50]:
        row = p.to_row()
        assert set(row) == {"prompt", "spec"} and TaskPrompt.from_row(row) == p
        assert TaskSpec.from_dict(p.spec.to_dict()).key() == p.spec.key()


def test_references_worked_examples():
    assert spell_number(0) == "zero" and spell_number(13) == "thirteen"
    assert spell_number(40) == "forty" and spell_number(42) == "forty two"
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = make_prompt("sort", rng)
        assert p.spec.reference.split() == [str(x) for x in sorted(p.spec.params["nums"])]
        assert len(p.spec.params["nums"]) in SORT_SIZES and max(p.spec.params["nums"]) <= SORT_MAX
        p = make_prompt("add", rng)
        assert p.spec.reference == str(p.spec.params["a"] + p.spec.params["b"])
        assert max(p.spec.params["a"], p.spec.params["b"]) <= ADD_MAX
        p = make_prompt("count", rng)
        assert p.spec.reference == str(p.spec.params["word"].count(p.spec.params["letter"]))
        assert p.spec.params["word"] in SHORT_WORDS
        p = make_prompt("reverse", rng)
        assert p.spec.reference == p.spec.params["word"][::-1] and p.spec.params["word"] in SHORT_WORDS


def test_pretrain_corpus_never_reports_an_eval_instance(task):
    # Reported answers read "to <request>, you say ..." or "asked <request>, people say ...".
    corpus = " ".join(task.pretrain_corpus(2000))
    assert corpus.count(", you say ") + corpus.count(", people say ") > 2000  # about a third of 12,000
    for p in task.eval_prompts():
        if p.spec.kind not in SHARED_KINDS:
            assert reported_request(p.text) not in corpus, p.text
    # The same check does find training instances (the instance space is small), so it can fail.
    found = sum(reported_request(p.text) in corpus for p in task.train_prompts(2000) if p.spec.kind not in SHARED_KINDS)
    assert found > 50


MIX = ("pick", "repeat", "reverse_list", "count_items", "spell", "list", "constrained")


def test_a_kind_mix_draws_only_its_kinds_everywhere_and_keeps_the_guarantees():
    task = Task(seed=0, kinds=MIX)
    assert set(COPY_KINDS) <= set(KINDS) and len(KINDS) == len(ORIGINAL_KINDS) + len(COPY_KINDS)
    for prompts in (task.eval_prompts(), task.train_prompts(700), task.sft_prompts(300)):
        assert {p.spec.kind for p in prompts} == set(MIX)
    eval_keys = {p.spec.key() for p in task.eval_prompts() if p.spec.kind not in SHARED_KINDS}
    for p in task.train_prompts(1000):
        assert p.spec.key() not in eval_keys and not any(pat.match(p.text) for pat in HELD_OUT)
    corpus = " ".join(task.pretrain_corpus(300))
    # prose facts only for the mix: no sums or reversed words, but number spellings and categories
    assert " plus " not in corpus and " backwards" not in corpus.replace("backwards, you say", "")
    assert " is written " in corpus and "some fruits are" in corpus
    assert "?" not in corpus and corpus.count(", you say ") + corpus.count(", people say ") > 300
    # the original seven kinds' corpus is unchanged by the mix machinery: same draws as before
    assert Task(seed=0).pretrain_corpus(5) == Task(seed=0, kinds=ORIGINAL_KINDS).pretrain_corpus(5)


def test_copy_kinds_references():
    rng = np.random.default_rng(4)
    for _ in range(200):
        p = make_prompt("pick", rng)
        options, category = p.spec.params["options"], p.spec.params["category"]
        assert len(set(options)) == 3 and p.spec.reference in options
        assert [o in CATEGORIES[category] for o in options].count(True) == 1
        p = make_prompt("repeat", rng)
        assert p.spec.reference.split() == [p.spec.params["word"]] * p.spec.params["count"]
        p = make_prompt("reverse_list", rng)
        assert p.spec.reference.split(", ") == p.spec.params["items"][::-1]
        p = make_prompt("count_items", rng)
        assert p.spec.reference == str(len(p.spec.params["items"])) and 2 <= len(p.spec.params["items"]) <= 5
        assert ", ".join(p.spec.params["items"]) in p.text


def test_unknown_or_repeated_kinds_are_rejected():
    for kinds in (("pick", "nope"), ("pick", "pick"), ()):
        with pytest.raises(ValueError, match="kinds must be distinct names"):
            Task(seed=0, kinds=kinds)


# ----------------------------------------------------------------------------- format instructions (issue 25)
def test_format_instructions_follow_the_same_requests_and_leave_half_plain():
    from instruct_jax.instructgpt.task import FORMATS, UNFORMATTED_KINDS, unformatted

    plain, formatted = Task(4), Task(4, format_fraction=0.5)
    for a, b in ((plain.eval_prompts(), formatted.eval_prompts()), (plain.train_prompts(400), formatted.train_prompts(400))):
        assert [p.spec.key() for p in a] == [p.spec.key() for p in b]  # the same instances, in the same order
        for p, q in zip(a, b):
            fmt = q.spec.params.get("format")
            if fmt is None:
                assert q == p
                continue
            assert p.spec.kind not in UNFORMATTED_KINDS
            sentence = q.text[len(p.text) + 1:]
            assert q.text.startswith(p.text + " ") and sentence in FORMATS[fmt][int(p.spec.held_out)]
            assert unformatted(q.spec) == p.spec
    share = np.mean([p.spec.params.get("format") is None for p in formatted.eval_prompts()])
    assert 0.5 <= share <= 0.7  # at least half of the eval prompts stay plain requests
    assert Task(4, format_fraction=0.0).eval_prompts() == plain.eval_prompts()


def test_demonstrators_follow_format_instructions_half_the_time_whatever_their_slips():
    from instruct_jax.instructgpt.gold import GoldJudge
    from instruct_jax.instructgpt.task import unformatted

    task, judge = Task(2, format_fraction=0.5), GoldJudge()
    demos = task.sft_demos(1200, chatty=0.8, slip=0.15, follow=0.5)
    prompts = task.sft_prompts(1200)
    followed, slipped = [], []
    for p, d in zip(prompts, demos):
        if p.spec.params.get("format") is None:
            continue
        score = judge.score(p.spec, d[-1]["content"])
        followed.append(score.instruction)
        slipped.append(score.correctness < 1.0)
    followed, slipped = np.array(followed), np.array(slipped)
    assert len(followed) > 300 and abs(followed.mean() - 0.5) < 0.07
    # independent of the slip: the slip rate is the same whether the instruction was followed or not
    assert abs(slipped[followed == 1].mean() - slipped[followed == 0].mean()) < 0.08
    # and the plain requests' habits are those of a task without format instructions
    base = Task(2).sft_demos(1200, chatty=0.8, slip=0.15)
    same = [d == e for p, d, e in zip(prompts, demos, base) if p.spec.params.get("format") is None]
    assert np.mean(same) > 0.99 and len(same) > 500
    assert unformatted(prompts[0].spec).params.get("format") is None


def test_phrase_twins_vary_the_phrase_and_the_correctness_of_a_sample_independently():
    """Design (a) of issue 25, judged by the gold judge: the phrase twin keeps the sample's correctness and
    flips its format (the chat phrase stripped or added); the reference and the near miss keep the sample's
    phrasing, the reference fully correct and the near miss not. (On the `constrained` kind a phrase can
    break the word limit or the capitals, so there the phrase is part of correctness.)"""
    from instruct_jax.instructgpt.gold import GoldJudge
    from instruct_jax.instructgpt.task import (DEMO_TAILS, DEMO_WRAPPERS, near_miss, phrase_twins, split_phrase,
                                               unformatted)

    judge, rng, misses = GoldJudge(), np.random.default_rng(0), 0
    prompts = Task(seed=3, format_fraction=0.3).train_prompts(150)
    for phrases in (DEMO_WRAPPERS, DEMO_TAILS):
        for i, p in enumerate(prompts):
            core = near_miss(unformatted(p.spec), rng) if i % 3 == 0 else p.spec.reference
            sample = phrases[i % 2].format(core) if i % 2 == 0 else core
            twin, ref, near = phrase_twins(p.spec, sample, phrases, rng)
            s, t = judge.score(p.spec, sample), judge.score(p.spec, twin)
            assert split_phrase(ref, phrases)[1] == split_phrase(near, phrases)[1] == split_phrase(sample, phrases)[1]
            assert (split_phrase(twin, phrases)[1] is None) == (split_phrase(sample, phrases)[1] is not None)
            if p.spec.kind == "constrained":
                continue
            assert t.correctness == pytest.approx(s.correctness), (sample, twin)
            assert judge.score(p.spec, ref).correctness == 1.0, (p.text, ref)
            misses += judge.score(p.spec, near).correctness < 1.0
            if s.correctness > 0:  # a phrase costs format: plain 1, answer inside other text 1/2
                assert (t.format > s.format) == (split_phrase(sample, phrases)[1] is not None), (sample, twin)
    assert misses >= 0.95 * 2 * sum(p.spec.kind != "constrained" for p in prompts)
    assert split_phrase("The answer is 5.", DEMO_WRAPPERS) == ("5", "The answer is {}.")
    assert split_phrase("5", DEMO_WRAPPERS) == ("5", None)
