"""Sources and formats: field mapping, named errors for malformed rows, counted skips, real shared files."""

import gzip
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instruct_jax.data.build import load_self_instruct_sft, read_records
from instruct_jax.data.config import DataConfig
from instruct_jax.data.formats import Ranking, get_field, parse_field_path, split_hh_pair
from instruct_jax.data.sources import iter_rows, local_files
from instruct_jax.data.stats import FilteredRow, MalformedDataError

GOOD = {"prompt": "Hi", "response": "Hello!"}


def _write(path, lines: list[bytes]):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


# ----------------------------------------------------------------------------- malformed input
MALFORMED = [  # (line bytes, reason, field named in the message or None)
    (b'{"prompt": "Hi", "response": ', "bad_json", None),
    (b'{"prompt": "Hi"}', "missing_field", "response"),
    (b'{"prompt": "   ", "response": "x"}', "empty_text", "prompt"),
    (b'{"prompt": "Hi", "response": 3}', "wrong_type", "response"),
    (b'{"prompt": "caf\xe9", "response": "x"}', "not_utf8", None),
    (b'["a list"]', "not_an_object", None),
    (b'{"prompt": [{"role": "wizard", "content": "x"}], "response": "x"}', "bad_role", "prompt[0]"),
]


@pytest.mark.parametrize("line,reason,field", MALFORMED)
def test_malformed_row_is_a_named_error(tmp_path, line, reason, field):
    path = _write(tmp_path / "train.jsonl", [json.dumps(GOOD).encode(), line])
    with pytest.raises(MalformedDataError) as info:
        read_records(path, DataConfig(format="sft"))
    err = info.value
    assert err.reason == reason and err.where == f"{path}:2"
    assert str(err).startswith(f"{path}:2: ")
    if field:
        assert f"field '{field}'" in str(err)


def test_malformed_rows_are_counted_skips(tmp_path):
    path = _write(tmp_path / "train.jsonl", [json.dumps(GOOD).encode()] + [line for line, _, _ in MALFORMED])
    records, stats = read_records(path, DataConfig(format="sft", on_malformed="skip"))
    assert [r for _, r in records] == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]
    assert stats.rows == 1 + len(MALFORMED)
    assert dict(stats.skipped) == {reason: 1 for _, reason, _ in MALFORMED}
    assert stats.where["missing_field"] == [f"{path}:3"]
    assert "skipped bad_json: 1" in stats.report()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(st.binary(max_size=40),
                                st.builds(lambda d: json.dumps(d).encode(),
                                          st.dictionaries(st.sampled_from(["prompt", "response", "text", "x"]),
                                                          st.one_of(st.text(max_size=5), st.integers(), st.none(),
                                                                    st.lists(st.text(max_size=3), max_size=2)),
                                                          max_size=3))),
                      max_size=6),
       fmt=st.sampled_from(["sft", "text", "prompt", "pairwise", "ranking"]))
def test_arbitrary_bytes_never_raise_anything_but_the_named_error(tmp_path, lines, fmt):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = DataConfig(format=fmt, on_malformed="skip")
    records, stats = read_records(str(path), cfg)  # skip: never raises
    assert stats.rows == len(records) + sum(stats.skipped.values())
    try:
        read_records(str(path), DataConfig(format=fmt, on_malformed="error"))
    except MalformedDataError as e:
        assert e.where.startswith(str(path) + ":")


def test_text_files_units_and_bad_bytes(tmp_path):
    path = str(tmp_path / "corpus.txt")
    (tmp_path / "corpus.txt").write_bytes(b"To be,\nor not.\n\nA bad \xff byte.\n\n\nThe end.\n")
    records, stats = read_records(path, DataConfig(format="text", on_malformed="skip"))
    assert [r for _, r in records] == ["To be,\nor not.", "The end."]
    assert dict(stats.skipped) == {"not_utf8": 1} and stats.where["not_utf8"] == [f"{path}:4"]
    lines, _ = read_records(path, DataConfig(format="text", text_unit="line", on_malformed="skip"))
    assert [r for _, r in lines] == ["To be,", "or not.", "The end."]
    with pytest.raises(MalformedDataError, match=r"corpus.txt:4: byte 0xff"):
        read_records(path, DataConfig(format="text", text_unit="document"))


# ----------------------------------------------------------------------------- sources
def test_local_sources_compressed_json_parquet_and_globs(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(3)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(map(json.dumps, rows)).encode()))
    (tmp_path / "b.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "c.parquet"))
    got = list(iter_rows(str(tmp_path)))  # a folder: every known file, sorted
    assert [v for _, v in got] == rows * 3
    assert [w.rsplit("/", 1)[1] for w, _ in got][::3] == ["a.jsonl.gz:1", "b.json:item 0", "c.parquet:row 0"]
    assert len(list(iter_rows(f"{tmp_path}/*.json*", max_rows=4))) == 4
    assert local_files("Anthropic/hh-rlhf") is None  # a Hub name
    with pytest.raises(FileNotFoundError):
        local_files(str(tmp_path / "missing.jsonl"))


def test_hub_source_goes_through_datasets(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, data_dir=None, split=None):
        calls.append((name, config, data_dir, split))
        return datasets.Dataset.from_list([{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                                            "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(source="Anthropic/hh-rlhf", format="pairwise", transcript="hh", hub_data_dir="helpful-base",
                     split="test")
    records, _ = read_records(cfg.source, cfg)
    assert calls == [("Anthropic/hh-rlhf", None, "helpful-base", "test")]
    assert records == [("Anthropic/hh-rlhf[test]:row 0",
                        Ranking(({"role": "user", "content": "Hi"},), ("Hello!", "Go away."), (1, 2)))]


# ----------------------------------------------------------------------------- formats
def test_field_paths():
    row = {"instances": [{"input": "", "output": "42"}]}
    assert parse_field_path("instances[0].output") == ["instances", 0, "output"]
    assert get_field(row, "instances[0].output") == "42"
    with pytest.raises(MalformedDataError, match="field 'instances\\[1\\].output': missing"):
        get_field(row, "instances[1].output")


def test_self_instruct_seed_tasks_as_sft(data_dir):
    conversations, stats = load_self_instruct_sft(str(data_dir / "self_instruct_seed_tasks.jsonl"))
    assert len(conversations) == 175 and stats.rows == 175 and not stats.skipped
    first = json.loads((data_dir / "self_instruct_seed_tasks.jsonl").read_text().splitlines()[0])
    assert conversations[0] == [{"role": "user", "content": first["instruction"]},
                                {"role": "assistant", "content": first["instances"][0]["output"]}]
    with_input = next(c for c in conversations if "\n\n" in c[0]["content"])
    assert [m["role"] for m in with_input] == ["user", "assistant"]


def test_hh_pairs_split_at_the_last_shared_assistant_tag(data_dir):
    cfg = DataConfig(format="pairwise", transcript="hh")
    records, stats = read_records(str(data_dir / "hh_helpful_base_test.jsonl.gz"), cfg)
    assert stats.rows == 2354 and len(records) == 2354 - sum(stats.skipped.values())
    assert set(stats.skipped) == {"prompt_mismatch", "identical_pair", "empty_response"}
    for _, r in records[:200]:
        assert r.prompt[-1]["role"] == "user" and r.responses[0] != r.responses[1] and r.ranks == (1, 2)
    prompt, chosen, rejected = split_hh_pair("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant: Ciao",
                                             "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye\n\nAssistant: No")
    assert (prompt, chosen, rejected) == ("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye", "Ciao", "No")
    with pytest.raises(FilteredRow, match="prompt_mismatch"):
        split_hh_pair("\n\nHuman: Hi\n\nAssistant: A\n\nHuman: x\n\nAssistant: y", "\n\nHuman: Hi\n\nAssistant: B")


def test_ranking_rows(tmp_path):
    rows = [{"prompt": "Pick", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},  # a tie is fine
            {"prompt": "Pick", "responses": ["a", "b"], "ranks": [1, 1]},  # all tied
            {"prompt": "Pick", "responses": ["a", "b"], "ranks": [1]},  # wrong count
            {"prompt": "Pick", "responses": ["a"] * 10, "ranks": list(range(1, 11))},  # K > 9
            {"prompt": [{"role": "user", "content": "Pick"}], "responses": ["a", ""], "ranks": [1, 2]}]
    path = _write(tmp_path / "r.jsonl", [json.dumps(r).encode() for r in rows])
    records, stats = read_records(path, DataConfig(format="ranking", on_malformed="skip"))
    assert [r for _, r in records] == [Ranking(({"role": "user", "content": "Pick"},), ("a", "b", "c"), (2, 1, 2))]
    assert dict(stats.skipped) == {"bad_ranks": 3, "empty_text": 1}
