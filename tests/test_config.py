"""Experiment files, overrides and validation errors."""

import glob
import math
import os

import jax
import pytest

from instruct_jax.config import Config, apply_overrides, load_experiment, validate
from instruct_jax.errors import ConfigError
from instruct_jax.parallel.mesh import make_abstract_mesh
from instruct_jax.train.lm.build import abstract_lm_state

from conftest import REPO

EXPERIMENTS = sorted(glob.glob(str(REPO / "experiments" / "*.py")))


def tiny() -> Config:
    return load_experiment(str(REPO / "experiments" / "tiny_cpu.py") + ":sft")


def experiment_specs():
    """Every experiment file, with each arg its get_config accepts (from an ARGS tuple, if any)."""
    specs = []
    for path in EXPERIMENTS:
        text = open(path).read()
        args = [None]
        for line in text.splitlines():
            if line.startswith("ARGS = "):
                args = list(eval(line.split("=", 1)[1]))  # a literal tuple of strings
        specs += [path if a is None else f"{path}:{a}" for a in args]
    return specs


@pytest.mark.parametrize("spec", experiment_specs(), ids=lambda s: os.path.basename(s))
def test_experiment_resolves_validates_and_shards_abstractly(spec):
    cfg = load_experiment(spec)
    n = cfg.mesh.num_devices or jax.device_count()
    validate(cfg, num_devices=n)
    mesh = make_abstract_mesh(cfg.mesh, n, cfg.mesh.num_slices)
    abstract, shardings = abstract_lm_state(cfg, mesh)
    leaves = jax.tree.leaves(abstract.params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing was allocated
    # Every parameter's per-device shard is its global size / product of its sharded mesh axes.
    for leaf in leaves:
        shard = leaf.sharding.shard_shape(leaf.shape)
        assert math.prod(shard) * math.prod(
            mesh.shape[a] for spec in leaf.sharding.spec if spec for a in ((spec,) if isinstance(spec, str) else spec)
        ) == math.prod(leaf.shape)


def test_llama3_8b_experiment_on_its_64_chip_mesh():
    cfg = load_experiment(str(REPO / "experiments" / "llama3_8b_sft_v5p128.py"))
    mesh = make_abstract_mesh(cfg.mesh, cfg.mesh.num_devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "sequence": 1, "tensor": 1}
    abstract, _ = abstract_lm_state(cfg, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    assert abs(n_params - 8.03e9) / 8.03e9 < 0.01  # Llama-3-8B has 8.03B parameters
    q = abstract.params["layers"]["attn"]["q"]  # [L, D, N, H] = [32, 4096, 32, 128]
    assert q.sharding.shard_shape(q.shape) == (32, 4096 // 64, 32, 128)
    mu = abstract.opt_state[1][0].mu["layers"]["mlp"]["gate"]
    assert mu.sharding.spec == abstract.params["layers"]["mlp"]["gate"].sharding.spec


def test_overrides_parse_types_and_name_bad_keys():
    cfg = apply_overrides(Config(), ["train.steps=7", "optim.learning_rate=1e-3", "model.tie_embeddings=true",
                                     "mesh.fsdp=-1", "data.tokenizer_train_files=a.txt,b.txt", 'mesh.rules=[["mlp", null]]'])
    assert cfg.train.steps == 7 and cfg.optim.learning_rate == 1e-3 and cfg.model.tie_embeddings is True
    assert cfg.data.tokenizer_train_files == ("a.txt", "b.txt")
    assert cfg.mesh.rules == (("mlp", None),)
    with pytest.raises(ConfigError, match="'train.stepz'.*unknown key"):
        apply_overrides(Config(), ["train.stepz=3"])
    with pytest.raises(ConfigError, match="'train.steps'.*expected an integer"):
        apply_overrides(Config(), ["train.steps=many"])
    with pytest.raises(ConfigError, match="'model.tie_embeddings'.*boolean"):
        apply_overrides(Config(), ["model.tie_embeddings=maybe"])
    with pytest.raises(ConfigError, match="'model'.*is a section"):
        apply_overrides(Config(), ["model=3"])


def test_removed_vf_coef_fails_early_naming_the_field_and_value_learning_rate(tmp_path, capsys):
    """ppo.vf_coef is gone (separate Adam optimizers made it almost inert): --set, an experiment file that
    still passes it, and the CLI each stop with a ConfigError naming it and the knob to use instead."""
    from instruct_jax.__main__ import main

    old = tmp_path / "old_ppo.py"
    old.write_text("from instruct_jax.config import Config, PPOConfig\n\n"
                   "def get_config(arg=None):\n    return Config(ppo=PPOConfig(vf_coef=0.1))\n")
    for load in (lambda: apply_overrides(Config(), ["ppo.vf_coef=0.5"]), lambda: load_experiment(str(old))):
        with pytest.raises(ConfigError) as err:
            load()
        assert err.value.field == "ppo.vf_coef" and "ppo.value_learning_rate" in str(err.value)
    assert main(["ppo", "--experiment", str(REPO / "experiments" / "tiny_ppo.py:toy"), "--workdir",
                 str(tmp_path / "run"), "--set", "ppo.vf_coef=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config field 'ppo.vf_coef': removed") and "ppo.value_learning_rate" in err
    assert not (tmp_path / "run").exists()  # failed before anything was written


@pytest.mark.parametrize("override, field", [
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.rope_type=wild", "model.rope_type"),
    ("model.remat=sometimes", "model.remat"),
    ("model.dtype=float16", "model.dtype"),
    ("train.seq_len=4096", "train.seq_len"),
    ("train.microbatches=3", "train.microbatches"),
    ("optim.decay=step", "optim.decay"),
    ("data.on_malformed=ignore", "data.on_malformed"),
    ("checkpoint.keep=0", "checkpoint.keep"),
])
def test_bad_values_name_the_field(override, field):
    cfg = apply_overrides(tiny(), [override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.field == field


def test_wrong_type_set_in_python_names_the_field():
    cfg = tiny()
    cfg.train.steps = "10"
    with pytest.raises(ConfigError, match="'train.steps': expected int"):
        validate(cfg)


def test_impossible_mesh_names_the_axes():
    cfg = apply_overrides(tiny(), ["mesh.data=3", "mesh.fsdp=1"])
    with pytest.raises(ConfigError, match="mesh.*multiply to 3.*8"):
        validate(cfg, num_devices=8)


def test_missing_experiment_file_and_get_config():
    with pytest.raises(ConfigError, match="no experiment file"):
        load_experiment("experiments/nope.py")


def test_a_runs_saved_config_json_is_an_experiment(tmp_path):
    """`--experiment <workdir>/config.json` repeats a run exactly: every experiment file round-trips."""
    import json

    from instruct_jax.config import ConfigError, load_experiment, to_dict

    for spec in ("tiny_cpu.py", "tiny_cpu.py:sft", "tiny_ppo.py:toy", "llama3_8b_sft_v5p128.py"):
        cfg = load_experiment(str(REPO / "experiments" / spec))
        path = tmp_path / "config.json"
        path.write_text(json.dumps(to_dict(cfg), default=str))
        assert load_experiment(str(path)) == cfg, spec
    saved = to_dict(cfg)
    saved["train"]["stepz"] = 3
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="train.stepz"):
        load_experiment(str(path))
