"""The tokenised data store (issue 27, item 7): prepared once, each host its share; read by index, each host only
the examples of the rows its devices hold; the same batches as the in-memory path, bit for bit."""

import json

import numpy as np
import pytest

from instruct_jax.data.build import (build_lm_data, load_data, load_stored_data, make_loader, prepare_store,
                                     store_key, build_chat_template)
from instruct_jax.data.config import DataConfig, DataConfigError, validate_data_config
from instruct_jax.data.formats import SELF_INSTRUCT_FIELDS
from instruct_jax.data.loader import Loader
from instruct_jax.data.store import ExampleStore, complete_parts
from instruct_jax.data.tokenizer import train_sentencepiece

SEQ = 64


@pytest.fixture(scope="module")
def tok(data_dir, tmp_path_factory):
    return train_sentencepiece([str(data_dir / "tinyshakespeare.txt")],
                               str(tmp_path_factory.mktemp("spm") / "spm"), vocab_size=512)


@pytest.fixture(scope="module")
def text_files(data_dir, tmp_path_factory):
    """tinyshakespeare cut into 5 files of whole paragraphs (a corpus of several files, as pretraining mixes are)."""
    paragraphs = (data_dir / "tinyshakespeare.txt").read_text().split("\n\n")[:600]
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        (folder / f"part{i}.txt").write_text("\n\n".join(paragraphs[i::5]))
    return str(folder)


def _sft_cfg(data_dir, **kw):
    fields = {k: v for k, v in SELF_INSTRUCT_FIELDS.items() if k != "format"}
    return DataConfig(source=str(data_dir / "self_instruct_seed_tasks.jsonl"), eval_fraction=0.1, **fields, **kw)


def _same_examples(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x.ids, y.ids) and x.ids.dtype == y.ids.dtype == np.int32
        if hasattr(x, "weights"):
            assert np.array_equal(x.weights, y.weights) and y.weights.dtype == np.float32


@pytest.mark.parametrize("fmt", ["sft", "text", "prompt"])
def test_one_host_store_equals_memory_and_gives_the_same_batches(fmt, data_dir, text_files, tok, tmp_path):
    cfg = DataConfig(source=text_files, format="text", eval_fraction=0.1) if fmt == "text" else \
        _sft_cfg(data_dir, format=fmt)
    memory = load_data(cfg, tok, seq_len=SEQ, seed=1)
    stored = load_stored_data(cfg, tok, seq_len=SEQ, seed=1, folder=str(tmp_path / "store"))
    assert isinstance(stored.train, ExampleStore) and isinstance(stored.eval, ExampleStore)
    _same_examples(memory.train, list(stored.train))
    _same_examples(memory.eval, list(stored.eval))
    assert stored.train_stats.as_dict() == memory.train_stats.as_dict()
    assert stored.eval_stats.as_dict() == memory.eval_stats.as_dict()
    for packing in (True, False):
        cfg.packing = packing
        a = make_loader(memory.train, cfg, tok, global_batch_size=8, seq_len=SEQ, seed=1)
        b = make_loader(stored.train, cfg, tok, global_batch_size=8, seq_len=SEQ, seed=1)
        for step in (0, 1, 7, 40):  # 40 lies several epochs in
            x, y = a.global_batch(step), b.global_batch(step)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


@pytest.mark.parametrize("how", ["by file", "by row", "by row, capped"])
def test_hosts_tokenise_only_their_share_and_together_all(how, data_dir, text_files, tok, tmp_path):
    """3 hosts prepare one part each: host i's part holds exactly its share; the parts hold every example of the
    one-host store, each once; rows are read by one host each."""
    if how == "by file":  # 5 files over 3 hosts: files 0, 3 | 1, 4 | 2
        cfg = DataConfig(source=text_files, format="text", eval_fraction=0.1)
    else:  # one file: every third row
        cfg = _sft_cfg(data_dir, max_rows=100 if "capped" in how else 0)
    hosts, folder = 3, str(tmp_path / "store")
    calls = []
    template = build_chat_template(cfg, tok)
    encode = tok.encode

    def counting(text, *args, **kwargs):  # what each host tokenises
        calls[-1] += 1
        return encode(text, *args, **kwargs)

    tok.encode = counting
    try:
        for host in range(hosts):
            calls.append(0)
            assert prepare_store(cfg, tok, template, seq_len=SEQ, seed=2, folder=folder, shard=(host, hosts))
            assert not prepare_store(cfg, tok, template, seq_len=SEQ, seed=2, folder=folder, shard=(host, hosts))
    finally:
        del tok.encode
    key = store_key(cfg, tok, template, SEQ, 2)
    parts = complete_parts(f"{folder}/train", key)
    assert [p.rsplit("/", 1)[1] for p in parts] == [f"part-0000{i}-of-00003" for i in range(3)]
    metas = [json.loads(open(f"{folder}/{side}/part-0000{i}-of-00003/meta.json").read())["stats"]
             for side in ("train", "eval") for i in range(hosts)]
    one = load_data(cfg, tok, seq_len=SEQ, seed=2)  # the whole data, as one host reads it
    assert sum(m["rows"] for m in metas) == one.train_stats.rows + one.eval_stats.rows
    per_host = [sum(m["rows"] for m in metas[i::hosts]) for i in range(hosts)]
    total = sum(per_host)
    assert max(per_host) < total / 2  # nobody read it all...
    assert all(0 < c < sum(calls) / 2 for c in calls)  # ...or tokenised it all
    stored = load_stored_data(cfg, tok, seq_len=SEQ, seed=2, folder=folder)
    assert len(stored.train.parts) == hosts
    key_of = lambda e: (e.ids.tobytes(), e.weights.tobytes() if hasattr(e, "weights") else b"")  # noqa: E731
    assert sorted(map(key_of, stored.train)) == sorted(map(key_of, one.train))
    assert sorted(map(key_of, stored.eval)) == sorted(map(key_of, one.eval))
    assert stored.train_stats.tokens == one.train_stats.tokens and stored.train_stats.rows == one.train_stats.rows


def test_a_host_reads_only_the_examples_of_its_rows(data_dir, text_files, tok, tmp_path):
    cfg = DataConfig(source=text_files, format="text")
    stored = load_stored_data(cfg, tok, seq_len=SEQ, seed=0, folder=str(tmp_path / "store"))
    store = stored.train
    loader = Loader(store, 32, SEQ, seed=0, pad_id=tok.pad_id, prefetch=0)
    plans = loader.epoch_plan(0)
    interleaved = np.array([0, 1, 8, 9, 16, 17, 24, 25])  # a v5p:4x4x4 host's rows hold such blocks
    for step in (0, 3):
        store.reads = 0
        loader.rows_at(step, interleaved)
        wanted = {i for r in interleaved for i in plans[step * 32 + int(r)]}
        assert store.reads == len(wanted) < len(store) / 8
    # the rows all hosts build together read each example of the step once
    store.reads = 0
    for host in range(4):
        loader.rows_at(1, np.arange(host, 32, 4))
    assert store.reads == len({i for r in range(32) for i in plans[32 + r]})


def test_build_lm_data_reads_through_the_store_and_refuses_a_foreign_one(data_dir, text_files, tok, tmp_path):
    from instruct_jax.config import Config, TrainConfig

    folder = str(tmp_path / "store")
    cfg = Config(data=DataConfig(source=text_files, format="text", tokenizer=str(tok.path), eval_fraction=0.1,
                                 store=folder),
                 train=TrainConfig(seq_len=SEQ, global_batch_size=8))
    memory = Config(data=DataConfig(source=text_files, format="text", tokenizer=str(tok.path), eval_fraction=0.1),
                    train=TrainConfig(seq_len=SEQ, global_batch_size=8))
    a, b = build_lm_data(cfg), build_lm_data(memory)
    assert isinstance(a.train.examples, ExampleStore) and a.report() == b.report()
    assert all(np.array_equal(a.train.global_batch(3)[k], b.train.global_batch(3)[k]) for k in ("tokens", "targets"))
    assert all(np.array_equal(a.eval.global_batch(0)[k], b.eval.global_batch(0)[k]) for k in ("tokens", "loss_mask"))
    cfg.train.seq_len = SEQ * 2  # other examples: the store on disk is not theirs
    with pytest.raises(DataConfigError, match="data.store.*another data configuration"):
        build_lm_data(cfg)
    with pytest.raises(DataConfigError, match="data.store"):
        validate_data_config(DataConfig(format="ranking", store=folder))


@pytest.mark.parametrize("cap", [0, 7])
def test_a_streamed_dataset_is_split_by_node(cap, tmp_path):
    """A Hub source on n hosts: streamed, split by node, capped at max_rows in all. The `parquet` builder over a
    local folder stands in for a Hub dataset (same `datasets` streaming path, no network)."""
    datasets = pytest.importorskip("datasets")
    from instruct_jax.data.sources import iter_rows

    for i in range(4):  # 4 shards of 5 rows
        datasets.Dataset.from_dict({"text": [f"file {i} row {j}" for j in range(5)]}).to_parquet(
            str(tmp_path / f"p{i}.parquet"))
    everything = sorted(r["text"] for _, r in iter_rows("parquet", hub_data_dir=str(tmp_path), max_rows=cap))
    all_rows = [r["text"] for _, r in iter_rows("parquet", hub_data_dir=str(tmp_path))]
    for hosts in (2, 3):  # shards divide evenly / not
        shares = [[r["text"] for _, r in iter_rows("parquet", hub_data_dir=str(tmp_path), max_rows=cap,
                                                     shard=(h, hosts))] for h in range(hosts)]
        rows = sorted(sum(shares, []))
        if not cap:
            assert rows == everything  # the same rows as one host reads, each once
        else:  # max_rows rows in all, each once (not necessarily the first max_rows of one host's order)
            assert len(set(rows)) == len(rows) == cap and set(rows) <= set(all_rows)
        assert sum(map(len, shares)) == (cap or 20) and all(len(s) <= (cap or 20) / hosts + 1 for s in shares)
    assert len(everything) == (cap or 20)


@pytest.mark.slow
def test_prepare_command_then_a_training_run_reads_the_store(tmp_path):
    """`prepare` tokenises ahead of the job; the SFT run then opens the complete store instead of tokenising."""
    import subprocess
    import sys

    from conftest import REPO

    store, experiment = tmp_path / "store", str(REPO / "experiments" / "tiny_cpu.py") + ":sft"

    def cli(command, *sets):
        return subprocess.run([sys.executable, "-m", "instruct_jax", command, "--experiment", experiment,
                               "--workdir", str(tmp_path / "run"), "--set", f"data.store={store}", *sets],
                              cwd=REPO, capture_output=True, text=True, timeout=600)

    prepared = cli("prepare")
    assert prepared.returncode == 0 and "in 1 part(s)" in prepared.stdout, prepared.stdout + prepared.stderr
    written = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    run = cli("sft", "train.steps=2", "logging.progress_bar=false", "train.seq_len=64", "model.max_seq_len=64")
    # seq_len differs from the prepared store's: the run refuses it, naming the field
    assert run.returncode == 2 and "data.store" in run.stderr, run.stdout + run.stderr
    run = cli("sft", "train.steps=2", "logging.progress_bar=false")
    assert run.returncode == 0, run.stdout + run.stderr
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == written  # read, not prepared again
    assert (tmp_path / "run" / "params").is_dir()
