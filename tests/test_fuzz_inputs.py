"""Bad-input fuzzing (hypothesis) of every loader, the config loader and the CLI's input checks.

The contract: bad input gives a clear error that names file, line and field (MalformedDataError) or
the config field (ConfigError), or a counted skip per data.on_malformed; never another exception,
never a row that disappears without being counted. tests/test_data_sources.py fuzzes the raw reader
with random bytes; here whole rows of every format go through read -> split -> tokenize, under both
policies, and the config loader gets random overrides, meshes and broken experiment files.
"""

import copy
import json
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO
from instruct_jax.config import Config, apply_overrides, load_experiment, to_dict, validate
from instruct_jax.data.build import load_data
from instruct_jax.data.config import DataConfig
from instruct_jax.data.sources import iter_rows
from instruct_jax.data.stats import MalformedDataError
from instruct_jax.data.tokenizer import train_sentencepiece
from instruct_jax.errors import ConfigError
from instruct_jax.parallel.mesh import MeshConfig

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = ("sft", "text", "prompt", "pairwise", "ranking")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("spm")
    text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")[:60000]
    (folder / "corpus.txt").write_text(text, encoding="utf-8")
    return train_sentencepiece([str(folder / "corpus.txt")], str(folder / "spm"), vocab_size=400)


# ----------------------------------------------------------------------------- rows of every format
words = st.text(alphabet=st.sampled_from("ab cdé\n\t€😀"), max_size=12)
long_text = st.integers(20, 120).map(lambda n: "to be or not " * n)  # over-length at seq_len 32
value = st.one_of(words, long_text, st.just(""), st.just("   "), st.integers(), st.none(), st.booleans(),
                  st.lists(words, max_size=3), st.floats(allow_nan=True))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "wizard"]),
                                           "content": st.one_of(words, st.integers())}), max_size=3)
ranks = st.one_of(st.lists(st.integers(-1, 5), max_size=5), st.lists(st.sampled_from([1, 2, 1.0, True, "1"]),
                                                                     max_size=4), st.integers())


@st.composite
def row(draw):
    """One row as bytes: valid-ish JSON of any format with fields missing, mistyped, empty, duplicated,
    over-long or out of range; or broken JSON / non-UTF-8 / not an object."""
    kind = draw(st.sampled_from(["object"] * 6 + ["broken", "bytes", "array"]))
    if kind == "broken":
        return draw(st.sampled_from([b'{"prompt": "Hi", ', b"{", b'{"a": 1}}', b"nul", b'"just a string"']))
    if kind == "bytes":
        return b'{"prompt": "caf\xe9 \xff", "response": "x"}'
    if kind == "array":
        return json.dumps([draw(words)]).encode()
    obj = {}
    for key, strategy in (("prompt", st.one_of(value, messages)), ("response", value), ("text", value),
                          ("chosen", value), ("rejected", value), ("responses", st.one_of(st.lists(value, max_size=4),
                                                                                         value)),
                          ("ranks", ranks)):
        if draw(st.booleans()):
            obj[key] = draw(strategy)
    if draw(st.integers(0, 4)) == 0 and isinstance(obj.get("chosen"), str):
        obj["rejected"] = obj["chosen"]  # identical comparison
    if draw(st.integers(0, 4)) == 0:
        same = draw(words)
        obj["responses"], obj["ranks"] = [same, same], [1, 2]  # the same text ranked twice
    return json.dumps(obj, allow_nan=True).encode()


def accounted(stats, records_only: bool) -> bool:
    """Every row read is kept, skipped with a reason, or (as an example) dropped with a reason."""
    lost = sum(stats.skipped.values()) + (0 if records_only else sum(stats.dropped.values()))
    return stats.kept + lost == stats.rows


@FUZZ
@given(rows=st.lists(row(), min_size=1, max_size=8), fmt=st.sampled_from(FORMATS),
       overlength=st.sampled_from(["truncate", "drop"]), eval_fraction=st.sampled_from([0.0, 0.5]))
def test_every_format_every_row_is_kept_skipped_or_dropped_and_counted(tmp_path, tokenizer, rows, fmt, overlength,
                                                                       eval_fraction):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    n_rows = len(list(iter_rows(str(path))))
    cfg = DataConfig(source=str(path), format=fmt, on_malformed="skip", on_overlength=overlength,
                     eval_fraction=eval_fraction, max_prompt_len=16)
    data = load_data(cfg, tokenizer, seq_len=32, seed=0)  # skip: never raises
    assert data.train_stats.rows + data.eval_stats.rows == n_rows
    for stats, examples in ((data.train_stats, data.train), (data.eval_stats, data.eval)):
        assert accounted(stats, records_only=False), stats.as_dict()
        assert stats.examples == len(examples)
        for e in examples:  # what survives fits the sequence
            ids = [r.ids for r in e.responses] if hasattr(e, "responses") else [e.ids]
            assert all(len(x) <= 33 for x in ids)
    try:
        load_data(DataConfig(**{**cfg.__dict__, "on_malformed": "error"}), tokenizer, seq_len=32, seed=0)
    except MalformedDataError as e:
        assert e.where.startswith(f"{path}:"), e.where  # file and line
        skipped = data.train_stats.skipped + data.eval_stats.skipped
        assert skipped[e.reason] >= 1, (e.reason, dict(skipped))  # the same row is a counted skip under "skip"
        if e.reason in ("missing_field", "wrong_type", "empty_text", "bad_ranks", "bad_role"):
            assert e.field and f"field '{e.field}'" in str(e)


def test_identical_comparisons_and_invalid_ranks_are_named(tmp_path, tokenizer):
    path = tmp_path / "ranked.jsonl"
    lines = [{"prompt": "Hi", "responses": ["a", "b"], "ranks": [1, 2]},
             {"prompt": "Hi", "responses": ["same", "same"], "ranks": [1, 2]},  # filtered, counted
             {"prompt": "Hi", "responses": ["a", "b", "c"], "ranks": [1, 4, 2]}]  # malformed
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    data = load_data(DataConfig(source=str(path), format="ranking", on_malformed="skip"), tokenizer, seq_len=32)
    assert dict(data.train_stats.skipped) == {"identical_pair": 1, "bad_ranks": 1} and data.train_stats.kept == 1
    with pytest.raises(MalformedDataError, match=r"ranked.jsonl:3: field 'ranks': ranks must be integers in 1..3"):
        load_data(DataConfig(source=str(path), format="ranking"), tokenizer, seq_len=32)


# ----------------------------------------------------------------------------- the config loader
RM_CONFIG = load_experiment(str(REPO / "experiments" / "tiny_rm.py"))
FIELDS = sorted(f"{section}.{name}" for section, fields in to_dict(Config()).items() if isinstance(fields, dict)
                for name, v in fields.items() if not isinstance(v, dict))
raw_values = st.one_of(st.sampled_from(["0", "-1", "1", "3", "1e-3", "nan", "inf", "-inf", "true", "maybe", "",
                                        "[1, 2]", '[["batch", "nope"]]', '[["batch"]]', '[[1, 2, 3]]', "{}",
                                        '"x"', "none", "a,b", "64", "100000"]),
                       st.text(max_size=8))


@FUZZ
@given(overrides=st.lists(st.tuples(st.one_of(st.sampled_from(FIELDS), st.sampled_from(["train", "nope.x",
                                                                                        "model.nope", "x"])),
                                    raw_values), min_size=1, max_size=4),
       num_devices=st.sampled_from([None, 1, 3, 8]))
def test_random_overrides_give_a_config_error_or_a_valid_config(overrides, num_devices):
    cfg = copy.deepcopy(RM_CONFIG)
    try:
        apply_overrides(cfg, [f"{k}={v}" for k, v in overrides])
        validate(cfg, num_devices=num_devices)
    except ConfigError as e:
        assert e.field and str(e).startswith(f"config field '{e.field}'")


json_values = st.recursive(st.one_of(st.none(), st.integers(-2, 3), st.sampled_from(["batch", "data", "fsdp", "x"])),
                           lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@FUZZ
@given(rules=st.lists(json_values, max_size=3))
def test_random_mesh_rules_are_config_errors_or_valid(rules):
    cfg = copy.deepcopy(RM_CONFIG)
    try:
        apply_overrides(cfg, ["mesh.rules=" + json.dumps(rules)])
        validate(cfg, num_devices=8)
    except ConfigError as e:
        assert e.field.startswith(("mesh", "train.global_batch_size", "train.seq_len")), e.field


@FUZZ
@given(sizes=st.lists(st.sampled_from([-1, -2, 0, 1, 2, 3, 4, 8, 16]), min_size=4, max_size=4),
       dcn=st.sampled_from([1, 2, -1]), num_devices=st.sampled_from([1, 2, 4, 6, 8, 16]))
def test_meshes_that_do_not_fit_the_devices_name_the_mesh_field(sizes, dcn, num_devices):
    cfg = copy.deepcopy(RM_CONFIG)
    cfg.mesh = MeshConfig(data=sizes[0], fsdp=sizes[1], sequence=sizes[2], tensor=sizes[3], dcn_data=dcn)
    try:
        validate(cfg, num_devices=num_devices)
    except ConfigError as e:
        assert e.field.startswith(("mesh", "train.global_batch_size", "train.seq_len")), e.field
        return
    from instruct_jax.parallel.mesh import resolve_mesh_shape

    shape = resolve_mesh_shape(cfg.mesh, num_devices)
    assert all(s > 0 for s in shape.values()) and eval("*".join(map(str, shape.values()))) == num_devices


BROKEN_EXPERIMENTS = {
    "syntax": "def get_config(arg=None)\n    return 1\n",
    "raises": "def get_config(arg=None):\n    raise ValueError('bad arg')\n",
    "wrong_type": "def get_config(arg=None):\n    return {'model': {}}\n",
    "no_get_config": "CONFIG = 1\n",
    "import_error": "import instruct_jax_no_such_module\n",
    "bad_section": ("from instruct_jax.config import Config\n"
                   "def get_config(arg=None):\n    c = Config()\n    c.model = 5\n    return c\n"),
    "nan_value": ("from instruct_jax.config import Config\n"
                  "def get_config(arg=None):\n    c = Config()\n    c.optim.learning_rate = float('nan')\n    return c\n"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_EXPERIMENTS))
def test_broken_experiment_files_are_config_errors(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(BROKEN_EXPERIMENTS[name])
    with pytest.raises(ConfigError) as e:
        validate(load_experiment(str(path)))
    assert e.value.field in ("experiment", "model", "optim.learning_rate")
    with pytest.raises(ConfigError, match="experiment"):
        load_experiment(str(tmp_path / "missing.py"))


# ----------------------------------------------------------------------------- through the CLI
def test_cli_names_the_bad_row_the_small_vocabulary_and_the_mesh_without_a_traceback(tmp_path, tokenizer, capsys):
    """The CLI's entry point, in this process (the same code path as `python -m instruct_jax`)."""
    from instruct_jax.__main__ import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Hi", "response": "Hello"}\n{"prompt": "Hi"}\n')
    common = ["--experiment", str(REPO / "experiments" / "tiny_cpu.py:sft"), "--workdir", str(tmp_path / "run"),
              "--set", f"data.tokenizer={tokenizer.path}", "model.vocab_size=400", "logging.tensorboard=false",
              "compilation_cache=false"]
    cases = [(["data.source=" + str(bad), "data.prompt_field=prompt", "data.input_field=",
               "data.response_field=response"], f"{bad}:2: field 'response': missing"),
             (["model.vocab_size=300"], "config field 'model.vocab_size': must be >= the tokenizer's vocabulary 400"),
             (["mesh.data=3"], "config field 'mesh."),
             (["optim.learning_rate=nan"], "config field 'optim.learning_rate': expected a finite number"),
             ([f"data.source={tmp_path / 'nowhere.jsonl'}"], "nowhere.jsonl' does not exist")]
    for extra, message in cases:
        assert main(["sft", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
