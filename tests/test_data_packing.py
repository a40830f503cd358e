"""Packing and padding: a packed row holds each example exactly as it would be alone, separated by segment ids."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from instruct_jax.data.chat import BuiltinChatTemplate
from instruct_jax.data.examples import LMExample, PromptExample, RankingExample, encode_conversation, encode_text
from instruct_jax.data.packing import LM_KEYS, greedy_pack, pack_lm_row, prompt_row, ranking_row
from instruct_jax.data.stats import DataStats
from instruct_jax.data.tokenizer import train_sentencepiece

PAD = 0


def _ex(ids, weights):
    return LMExample(np.asarray(ids, np.int32), np.asarray(weights, np.float32))


def _segment(row, segment_id):
    """The arrays of one segment of a packed row, cut out."""
    where = row["segment_ids"] == segment_id
    return {k: row[k][where] for k in LM_KEYS}


def _alone(example, seq_len):
    """The example padded alone in its own row, cut to its real positions."""
    return _segment(pack_lm_row([example], seq_len, PAD), 1)


def _attention(row):
    """[T, T] mask the model builds: same nonzero segment and key position <= query position."""
    seg, pos = row["segment_ids"], row["positions"]
    return (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & (pos[None, :] <= pos[:, None])


def _check_packed_equals_alone(examples, seq_len):
    row = pack_lm_row(examples, seq_len, PAD)
    for segment_id, ex in enumerate(examples, start=1):
        packed, alone = _segment(row, segment_id), _alone(ex, seq_len)
        for key in ("tokens", "targets", "loss_mask", "positions"):
            np.testing.assert_array_equal(packed[key], alone[key], err_msg=f"segment {segment_id} {key}")
    # attention never crosses segments, and each segment's own pattern is plain causal
    attn = _attention(row)
    seg = row["segment_ids"]
    assert not (attn & (seg[:, None] != seg[None, :])).any()
    for segment_id, ex in enumerate(examples, start=1):
        idx = np.flatnonzero(seg == segment_id)
        np.testing.assert_array_equal(attn[np.ix_(idx, idx)], np.tril(np.ones((ex.length, ex.length), bool)))
    # padding follows the contract
    pad = seg == 0
    assert (row["tokens"][pad] == PAD).all() and (row["targets"][pad] == PAD).all()
    assert (row["loss_mask"][pad] == 0).all() and (row["positions"][pad] == 0).all()
    assert int((seg > 0).sum()) == sum(e.length for e in examples)


def test_docstring_worked_example():
    a, b = _ex([1, 5, 6, 7], [0, 0, 1, 1]), _ex([1, 8, 9], [0, 1, 1])
    row = pack_lm_row([a, b], 8, PAD)
    np.testing.assert_array_equal(row["tokens"], [1, 5, 6, 1, 8, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [5, 6, 7, 8, 9, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    assert {k: v.dtype for k, v in row.items()} == {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                                                    "positions": np.int32, "segment_ids": np.int32}


def test_packed_sft_conversations_equal_each_alone(data_dir, tmp_path):
    tok = train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(tmp_path / "spm"), vocab_size=512)
    template, stats = BuiltinChatTemplate(tok), DataStats()
    conversations = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                     for q, a in [("Who art thou?", "A citizen."), ("Speak.", "Speak, speak."), ("Why?", "Because.")]]
    examples = [encode_conversation(c, template, 64, "truncate", stats) for c in conversations]
    for rows in greedy_pack([e.length for e in examples], 64):
        _check_packed_equals_alone([examples[i] for i in rows], 64)
    text_examples = encode_text("First Citizen:\nBefore we proceed any further, hear me speak.", tok, 8, stats)
    _check_packed_equals_alone(text_examples[:3], 24)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 12), min_size=1, max_size=8), st.integers(0, 2 ** 31 - 1))
def test_packed_random_examples_equal_each_alone(lengths, seed):
    rng = np.random.default_rng(seed)
    examples = [_ex(rng.integers(1, 100, n), rng.integers(0, 2, n)) for n in lengths]
    capacity = 16
    for rows in greedy_pack([e.length for e in examples], capacity):
        _check_packed_equals_alone([examples[i] for i in rows], capacity)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 16), max_size=40), st.integers(1, 4))
def test_greedy_pack_places_every_example_once_within_capacity(lengths, max_open):
    rows = greedy_pack(lengths, 16, max_open)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 16 for r in rows)
    assert greedy_pack(lengths, 16, max_open) == rows  # deterministic


def test_greedy_pack_docstring_example():
    assert greedy_pack([5, 4, 3, 2], 8) == [[0, 2], [1, 3]]


def test_text_windows_cover_every_token_once(data_dir, tmp_path):
    tok = train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(tmp_path / "spm"), vocab_size=512)
    text = (data_dir / "tinyshakespeare.txt").read_text()[:3000]
    windows = encode_text(text, tok, 32, DataStats())
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    targets = np.concatenate([w.ids[1:] for w in windows])
    np.testing.assert_array_equal(targets, ids[1:])  # each token after BOS is a target exactly once
    assert all(w.length <= 32 for w in windows)


def test_prompt_row_left_padding_docstring_example():
    row = prompt_row(PromptExample(np.array([1, 5, 40, 7, 6], np.int32)), 8, PAD)
    np.testing.assert_array_equal(row["tokens"], [0, 0, 0, 1, 5, 40, 7, 6])
    np.testing.assert_array_equal(row["positions"], [0, 0, 0, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(row["segment_ids"], [0, 0, 0, 1, 1, 1, 1, 1])
    assert row["lengths"] == 5
    right = prompt_row(PromptExample(np.array([1, 5, 40, 7, 6], np.int32)), 8, PAD, side="right")
    np.testing.assert_array_equal(right["tokens"], [1, 5, 40, 7, 6, 0, 0, 0])


def test_ranking_row_docstring_example():
    example = RankingExample((_ex([1, 5, 40, 6, 41, 7], [0, 0, 0, 0, 1, 1]), _ex([1, 5, 40, 6, 7], [0, 0, 0, 0, 1])),
                             (1, 2))
    row = ranking_row(example, 3, 6, PAD)
    np.testing.assert_array_equal(row["tokens"], [[1, 5, 40, 6, 41, 7], [1, 5, 40, 6, 7, 0], [0] * 6])
    np.testing.assert_array_equal(row["targets"], [[5, 40, 6, 41, 7, 0], [5, 40, 6, 7, 0, 0], [0] * 6])
    np.testing.assert_array_equal(row["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0], [0] * 6])
    np.testing.assert_array_equal(row["segment_ids"], [[1] * 6, [1, 1, 1, 1, 1, 0], [0] * 6])
    np.testing.assert_array_equal(row["ranks"], [1, 2, 0])
    np.testing.assert_array_equal(row["lengths"], [6, 5, 0])
    # the reward is read at the end-of-turn token
    assert row["tokens"][0, row["lengths"][0] - 1] == 7 and row["tokens"][1, row["lengths"][1] - 1] == 7


def test_overlength_policies_truncate_or_drop_and_count(data_dir, tmp_path):
    from instruct_jax.data.examples import encode_prompt, encode_ranking
    from instruct_jax.data.formats import Ranking

    tok = train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(tmp_path / "spm"), vocab_size=512)
    template = BuiltinChatTemplate(tok)
    long_question = "Speak, speak. " * 40
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": long_question}]
    stats = DataStats()
    cut = encode_conversation(conversation, template, 16, "truncate", stats)
    assert len(cut.ids) == 17 and stats.truncated == 1
    assert encode_conversation(conversation, template, 16, "drop", stats) is None
    answerless = [{"role": "user", "content": long_question}, {"role": "assistant", "content": "Aye."}]
    assert encode_conversation(answerless, template, 16, "truncate", stats) is None  # the answer fell off the end
    assert dict(stats.dropped) == {"overlength": 1, "no_target_in_window": 1}

    prompt = encode_prompt([{"role": "user", "content": long_question}], template, 12, "truncate", stats)
    assert len(prompt.ids) == 12 and prompt.ids[0] == tok.bos_id
    assert prompt.ids[-1] == tok.special_tokens["<|assistant|>"]  # generation continues from the end

    ranking = encode_ranking(Ranking(({"role": "user", "content": long_question},), ("Aye.", "No."), (1, 2)),
                             template, 16, "truncate", stats)
    for response in ranking.responses:
        assert len(response.ids) <= 16 and response.ids[0] == tok.bos_id and response.ids[-1] == tok.eot_id
        assert response.weights[-1] == 1 and response.weights[0] == 0
    assert stats.truncated == 3
