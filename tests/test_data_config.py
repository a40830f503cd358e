"""DataConfig: documented fields, CLI-style overrides, and validation errors that name the field."""

import ast
import dataclasses
import inspect

import pytest

from instruct_jax.config import Config, apply_overrides
from instruct_jax.data import config as data_config
from instruct_jax.data.config import DataConfig, DataConfigError, validate_data_config


def test_every_field_is_typed_for_overrides_and_documented():
    source = inspect.getsource(DataConfig).splitlines()
    for f in dataclasses.fields(DataConfig):
        assert f.type in ("int", "float", "str", "bool", "tuple"), f.name
        line = next(s for s in source if s.strip().startswith(f"{f.name}:"))
        assert "  # " in line, f"field {f.name} needs a one-line comment"


def test_overrides_reach_the_data_section():
    cfg = apply_overrides(Config(), ["data.format=ranking", "data.on_malformed=skip", "data.packing=false",
                                     "data.tokenizer_train_files=a.txt,b.txt", "data.eval_fraction=0.05"])
    assert (cfg.data.format, cfg.data.on_malformed, cfg.data.packing) == ("ranking", "skip", False)
    assert cfg.data.tokenizer_train_files == ("a.txt", "b.txt") and cfg.data.eval_fraction == 0.05
    validate_data_config(cfg)  # accepts the whole Config
    validate_data_config(Config())  # the defaults are valid (a run may hand in examples instead of a source)


@pytest.mark.parametrize("changes,field", [
    ({"on_malformed": "ignore"}, "data.on_malformed"),
    ({"format": "chat"}, "data.format"),
    ({"on_overlength": "wrap"}, "data.on_overlength"),
    ({"eval_fraction": 1.5}, "data.eval_fraction"),
    ({"eval_fraction": 0.1, "eval_source": "x.jsonl"}, "data.eval_fraction"),
    ({"max_responses": 12}, "data.max_responses"),
    ({"prefetch": -1}, "data.prefetch"),
    ({"format": "text", "text_field": ""}, "data.text_field"),
    ({"format": "sft", "source": "x.jsonl", "tokenizer_train_files": ()}, "data.tokenizer_train_files"),
    ({"vocab_size": 100}, "data.vocab_size"),
    ({"chat_template": "no/such/file.jinja"}, "data.chat_template"),
])
def test_validation_names_the_field(changes, field):
    cfg = DataConfig(**{"tokenizer_train_files": ("corpus.txt",), **changes})
    with pytest.raises(DataConfigError) as info:
        validate_data_config(cfg)
    assert info.value.field == field and str(info.value).startswith(f"config field '{field}': ")
    assert isinstance(info.value, ValueError)


def test_on_malformed_message_lists_the_choices():
    with pytest.raises(DataConfigError, match=r"config field 'data.on_malformed': expected one of \['error', 'skip'\]"):
        validate_data_config(DataConfig(on_malformed="x", tokenizer_train_files=("a",)))


def test_data_config_imports_nothing_from_instruct_jax():
    tree = ast.parse(inspect.getsource(data_config))
    modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in modules if m and m.startswith("instruct_jax")]


def test_data_package_does_not_import_model_train_or_ppo():
    import pathlib

    for path in pathlib.Path(data_config.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        bad = [m for m in modules if m.split(".")[:2] in (["instruct_jax", "model"], ["instruct_jax", "train"],
                                                          ["instruct_jax", "ppo"])]
        assert not bad, f"{path.name} imports {bad}"
