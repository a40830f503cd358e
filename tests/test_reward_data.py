"""Reward-model data: HH-RLHF pairs on the real file, K-wise jsonl rankings, the synthetic preference task."""

import collections
import gzip
import json

import numpy as np
import pytest

from instruct_jax.data import DataConfig, load_data, load_tokenizer, make_loader, read_records
from instruct_jax.data.build import is_eval
from instruct_jax.data.formats import prompt_key
from instruct_jax.data.synthetic_prefs import dense_ranks, quality, rankings_to_rows, synthetic_rankings
from instruct_jax.data.tokenizer import train_sentencepiece

TAG = "\n\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir):
    prefix = tmp_path_factory.mktemp("tok") / "spm"
    train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(prefix), 512)
    return load_tokenizer(str(prefix) + ".model")


def naive_split(chosen: str, rejected: str):
    """The rule, spelled out: the last Assistant tag lying wholly inside the common prefix."""
    common = 0
    while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
        common += 1
    cut = max((i for i in range(common - len(TAG) + 1) if chosen.startswith(TAG, i)), default=-1)
    return chosen[:cut], chosen[cut + len(TAG):].strip(), rejected[cut + len(TAG):].strip()


def test_hh_pairs_on_the_real_file(data_dir):
    path = str(data_dir / "hh_helpful_base_test.jsonl.gz")
    records, stats = read_records(path, DataConfig(format="pairwise", transcript="hh"))
    assert stats.rows == 2354 and len(records) == 2339
    assert dict(stats.skipped) == {"prompt_mismatch": 9, "identical_pair": 2, "empty_response": 4}
    raw = [json.loads(line) for line in gzip.open(path, "rt")]
    for where, record in records:
        row = raw[int(where.rsplit(":", 1)[1]) - 1]
        prompt, chosen, rejected = naive_split(row["chosen"], row["rejected"])
        assert record.responses == (chosen, rejected) and chosen != rejected and chosen and rejected
        # The prompt ends at that tag: it is the rest of the dialogue, ending with the user's turn.
        assert record.prompt[-1]["role"] == "user"
        assert record.prompt[-1]["content"] == prompt.rsplit("\n\nHuman:", 1)[1].strip()
        assert TAG not in chosen and TAG not in rejected  # no turn of the dialogue left inside an answer


def test_hh_token_pairs_share_the_prompt_and_end_with_end_of_turn(data_dir, tokenizer):
    cfg = DataConfig(source=str(data_dir / "hh_helpful_base_test.jsonl.gz"), format="pairwise", transcript="hh",
                     tokenizer="unused", eval_fraction=0.2, max_rows=300)
    data = load_data(cfg, tokenizer, seq_len=4096, seed=0)
    assert len(data.train) + len(data.eval) == data.train_stats.kept + data.eval_stats.kept
    assistant = tokenizer.special_tokens["<|assistant|>"]
    for example in data.train[:50]:
        a, b = (r.ids for r in example.responses)
        header = np.nonzero(a == assistant)[0][-1]  # the final answer's header
        assert np.array_equal(a[:header + 1], b[:header + 1]) and not np.array_equal(a, b)
        assert a[-1] == b[-1] == tokenizer.eot_id and example.ranks == (1, 2)
    # Split by prompt with a fixed seed: no prompt on both sides, the same split every time.
    records, _ = read_records(cfg.source, cfg)
    held = [is_eval(r, cfg.eval_fraction, 0) for _, r in records]
    assert len(data.eval) == sum(held) and 0.1 < sum(held) / len(held) < 0.3
    sides = collections.defaultdict(set)
    for (_, r), h in zip(records, held):
        sides[prompt_key(r)].add(h)
    assert all(len(s) == 1 for s in sides.values())
    again = load_data(cfg, tokenizer, seq_len=4096, seed=0)
    assert all(np.array_equal(a.responses[0].ids, b.responses[0].ids) for a, b in zip(again.eval, data.eval))


def test_kwise_jsonl_format_round_trips_with_ties_and_k_up_to_9(tmp_path, tokenizer):
    rankings = synthetic_rankings(40, seed=3, k_min=2, k_max=9)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rankings_to_rows(rankings)))
    records, stats = read_records(str(path), DataConfig(format="ranking"))
    assert [r for _, r in records] == rankings and stats.rows == 40
    assert {len(r.responses) for r in rankings} >= {2, 9} and any(len(set(r.ranks)) < len(r.ranks) for r in rankings)
    cfg = DataConfig(source=str(path), format="ranking", tokenizer="unused")
    data = load_data(cfg, tokenizer, seq_len=128, seed=0)
    batch = make_loader(data.train, cfg, tokenizer, global_batch_size=8, seq_len=128, seed=0).global_batch(0)
    assert batch["tokens"].shape == (8, 9, 128) and batch["ranks"].shape == (8, 9)
    real = batch["ranks"] > 0
    assert np.array_equal(real, batch["lengths"] > 0)  # empty slots: rank 0 and length 0
    ends = np.take_along_axis(batch["tokens"], np.maximum(batch["lengths"] - 1, 0)[..., None], axis=2)[..., 0]
    assert np.all(ends[real] == tokenizer.eot_id)  # every real response ends with end-of-turn, read at lengths - 1


def test_synthetic_preferences_follow_their_rule():
    rankings = synthetic_rankings(300, seed=0)
    assert rankings == synthetic_rankings(300, seed=0) and rankings != synthetic_rankings(300, seed=1)
    for r in rankings:
        assert r.ranks == dense_ranks([quality(x) for x in r.responses]) and len(set(r.ranks)) > 1
        assert 2 <= len(r.responses) <= 4 and all(len(x.split()) == 6 for x in r.responses)
    assert dense_ranks([2, -1, 2, 0]) == (1, 3, 1, 2)
    assert quality("good and bad sweet") == 1
