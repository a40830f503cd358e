"""Loader: batches are a pure function of (seed, step), the same for any host count, and resumable."""

import gc

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from instruct_jax.data.build import load_data, make_loader
from instruct_jax.data.config import DataConfig
from instruct_jax.data.examples import LMExample, PromptExample, RankingExample
from instruct_jax.data.formats import SELF_INSTRUCT_FIELDS
from instruct_jax.data.loader import Loader
from instruct_jax.data.tokenizer import train_sentencepiece

B, T, PAD = 8, 32, 0


def _lm_examples(n=37, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, T + 2))
        ids = rng.integers(1, 500, length).astype(np.int32)
        ids[0] = i + 1000  # tag each example so tests can tell which one a row holds
        out.append(LMExample(ids, rng.integers(0, 2, length).astype(np.float32)))
    return out


def _loaders():
    lm = _lm_examples()
    prompts = [PromptExample(np.arange(1, 2 + i % 9, dtype=np.int32)) for i in range(21)]
    rankings = [RankingExample(tuple(lm[(i + k) % len(lm)] for k in range(2 + i % 3)), tuple(range(1, 3 + i % 3)))
                for i in range(13)]
    return {"packed": Loader(lm, B, T, seed=3, pad_id=PAD, prefetch=0),
            "padded": Loader(lm, B, T + 1, seed=3, pad_id=PAD, packing=False, prefetch=0),
            "prompts": Loader(prompts, B, T, seed=3, pad_id=PAD, prompt_len=12, prefetch=0),
            "rankings": Loader(rankings, B, T + 1, seed=3, pad_id=PAD, prefetch=0)}


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("kind", ["packed", "padded", "prompts", "rankings"])
def test_same_global_batch_for_1_2_4_hosts(kind):
    loader = _loaders()[kind]
    for step in (0, 1, 7, 19):  # 19 * 8 rows is several epochs in: batches straddle epoch boundaries
        whole = loader.global_batch(step)
        for hosts in (1, 2, 4):
            fresh = _loaders()[kind]  # another process: its own plan cache, same seed
            slices = [fresh.host_batch(step, h, hosts) for h in range(hosts)]
            _equal(whole, {k: np.concatenate([s[k] for s in slices]) for k in whole})


def test_each_host_builds_only_its_rows(monkeypatch):
    loader = _loaders()["packed"]
    built = []
    original = loader._build_row
    monkeypatch.setattr(loader, "_build_row", lambda ids: built.append(ids) or original(ids))
    loader.host_batch(5, 1, 4)
    assert len(built) == B // 4


def test_batch_is_a_pure_function_of_seed_and_step():
    a, b = _loaders()["packed"], _loaders()["packed"]
    later_first = {s: b.global_batch(s) for s in (12, 3, 0)}  # call order doesn't matter
    for s in (0, 3, 12):
        _equal(a.global_batch(s), later_first[s])
    other_seed = Loader(_lm_examples(), B, T, seed=4, pad_id=PAD)
    assert not np.array_equal(other_seed.global_batch(0)["tokens"], a.global_batch(0)["tokens"])


def test_every_epoch_covers_every_example_once_in_a_new_order():
    loader = _loaders()["packed"]
    plans = [loader.epoch_plan(e) for e in range(3)]
    for plan in plans:
        assert sorted(i for row in plan for i in row) == list(range(37))
        assert all(sum(loader.examples[i].length for i in row) <= T for row in plan)
    assert plans[0] != plans[1] != plans[2]
    assert loader.epoch_plan(1) == Loader(_lm_examples(), B, T, seed=3, pad_id=PAD).epoch_plan(1)


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_at_step_continues_the_exact_sequence(prefetch):
    steps, resume_at = 12, 5
    with _loaders()["packed"].iterate(start_step=0, prefetch=prefetch) as it:
        straight = [next(it) for _ in range(steps)]
        assert it.state() == steps
    with _loaders()["packed"].iterate(start_step=resume_at, prefetch=prefetch) as it:  # a fresh process
        assert it.state() == resume_at
        resumed = [next(it) for _ in range(steps - resume_at)]
    for a, b in zip(straight[resume_at:], resumed):
        _equal(a, b)


@pytest.mark.parametrize("kind", ["packed", "prompts", "rankings"])
def test_sharded_iterator_matches_global_batch(kind):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))  # also shards rank-1/2 keys (lengths, ranks)
    loader = _loaders()[kind]
    with loader.iterate(4, sharding, prefetch=2) as it:
        for step in (4, 5):
            batch = next(it)
            _equal(batch, loader.global_batch(step))
            assert all(isinstance(v, jax.Array) and v.shape[0] == B for v in batch.values())
            assert batch["tokens"].sharding.spec[0] == ("data", "fsdp")
            assert len(batch["tokens"].addressable_shards) == 8
    _equal(loader.device_batch(9, sharding), loader.global_batch(9))


def test_any_device_order_gets_its_own_rows_and_a_missing_row_is_named():
    """Each device's shard is its own rows, whatever the mesh's device order (real pods interleave hosts along
    the batch axis: tests/test_topology_loader.py); a shard asking for rows this process did not build fails."""
    from instruct_jax.data.loader import process_rows, shard_of

    order = np.random.default_rng(1).permutation(8)
    mesh = Mesh(np.array(jax.devices())[order].reshape(2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
    loader = _loaders()["rankings"]
    batch = loader.device_batch(3, sharding)
    _equal(batch, loader.global_batch(3))
    want = loader.global_batch(3)["tokens"]
    for shard in batch["tokens"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])
    assert process_rows(sharding, B).tolist() == list(range(B))
    rows = np.array([0, 1, 4, 5])
    local = loader.rows_at(3, rows)["tokens"]
    np.testing.assert_array_equal(shard_of(local, rows, (slice(4, 6),), B), want[4:6])
    with pytest.raises(ValueError, match=r"batch rows \[2, 3\] asked for, but this process built \[0, 1, 4, 5\]"):
        shard_of(local, rows, (slice(2, 4),), B)


def test_prefetch_thread_errors_reach_the_caller():
    loader = _loaders()["packed"]
    loader._build_row = lambda ids: 1 / 0
    with loader.iterate(prefetch=2) as it, pytest.raises(ZeroDivisionError):
        next(it)


def test_dropped_iterator_stops_its_prefetch_thread():
    it = _loaders()["packed"].iterate(prefetch=2)
    next(it)
    thread = it._thread
    del it
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_config_to_sharded_batches_end_to_end(data_dir, tmp_path):
    tok = train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(tmp_path / "spm"), vocab_size=512)
    cfg = DataConfig(source=str(data_dir / "self_instruct_seed_tasks.jsonl"), eval_fraction=0.1,
                     **{k: v for k, v in SELF_INSTRUCT_FIELDS.items() if k != "format"})
    data = load_data(cfg, tok, seq_len=256, seed=0)
    assert data.train_stats.rows + data.eval_stats.rows == 175 and 0 < len(data.eval) < 40
    assert "data 'train'" in data.report()
    loader = make_loader(data.train, cfg, tok, global_batch_size=8, seq_len=256, seed=0)
    batch = loader.global_batch(0)
    assert batch["tokens"].shape == (8, 256) and batch["segment_ids"].max() >= 2  # packed
    # the loss falls on assistant tokens only: each loss target is an answer token or <|end|>
    answer_ids = {t for e in data.train for t, w in zip(e.ids, e.weights) if w}
    assert set(batch["targets"][batch["loss_mask"] > 0].tolist()) <= answer_ids
    assert tok.special_tokens["<|end|>"] in batch["targets"][batch["loss_mask"] > 0]


@pytest.mark.parametrize("fmt", ["sft", "text"])
def test_build_lm_data_for_the_training_loop(data_dir, tmp_path, fmt):
    from instruct_jax.config import Config, TrainConfig
    from instruct_jax.data.build import build_lm_data

    shakespeare = str(data_dir / "tinyshakespeare.txt")
    if fmt == "sft":
        data_cfg = DataConfig(source=str(data_dir / "self_instruct_seed_tasks.jsonl"), eval_fraction=0.1,
                              tokenizer_train_files=(shakespeare,), vocab_size=512,
                              **{k: v for k, v in SELF_INSTRUCT_FIELDS.items() if k != "format"})
    else:
        data_cfg = DataConfig(source=shakespeare, format="text", vocab_size=512, eval_fraction=0.05, max_rows=400)
    cfg = Config(data=data_cfg, train=TrainConfig(global_batch_size=8, seq_len=128), seed=1)
    data = build_lm_data(cfg, str(tmp_path))
    assert data.tokenizer.vocab_size == 512 and (tmp_path / "tokenizer" / "spm_512.model").is_file()
    assert build_lm_data(cfg, str(tmp_path)).tokenizer.vocab_size == 512  # reused, not retrained
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    with data.train.iterate(3, sharding) as it:  # positional (start, sharding), as the trainer calls it
        _equal(next(it), data.train.global_batch(3))
    assert data.eval is not None and not data.eval.shuffle
    _equal(data.eval.device_batch(0, sharding), data.eval.global_batch(0))
    assert "data 'train'" in data.report() and "data 'eval'" in data.report()
