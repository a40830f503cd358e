"""The redesign's intended behaviour changes: a setting another one makes inert is an error naming both,
one prompt-length rule for PPO / the pipeline / evaluation, one batch-shard count."""

import dataclasses

import pytest

from conftest import REPO
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.errors import ConfigError
from instruct_jax.instructgpt.pipeline import Paths, prompt_len as pipeline_prompt_len, stage_config
from instruct_jax.parallel.mesh import MeshConfig, batch_axes, batch_shards, make_mesh, resolve_mesh_shape
from instruct_jax.rl.ppo.trainer import prompt_len, validate_ppo
from instruct_jax.train.rm.trainer import validate_reward

EXPERIMENTS = REPO / "experiments"


def _error(fn, *args) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args)
    return info.value


def test_rm_data_source_with_synthetic_rankings_is_an_error_naming_both():
    cfg = load_experiment(str(EXPERIMENTS / "tiny_rm.py"))
    validate_reward(cfg)  # as shipped: synthetic rankings, no source
    err = _error(validate_reward, apply_overrides(cfg, ["data.source=pairs.jsonl"]))
    assert err.field == "reward.synthetic" and "data.source='pairs.jsonl'" in str(err)
    validate_reward(apply_overrides(cfg, ["data.source=pairs.jsonl", "reward.synthetic=0"]))


@pytest.mark.parametrize("overrides, field, names", [
    (["ppo.reward_model=runs/rm"], "ppo.reward_model", "ppo.reward='count'"),
    (["data.source=prompts.jsonl"], "ppo.synthetic_prompts", "data.source='prompts.jsonl'"),
    (["ppo.ptx.source=corpus.txt"], "ppo.ptx.source", "ppo.ptx_coef"),
])
def test_ppo_inert_settings_are_errors_naming_both(overrides, field, names):
    cfg = load_experiment(str(EXPERIMENTS / "tiny_ppo.py") + ":toy")
    validate_ppo(cfg)
    err = _error(validate_ppo, apply_overrides(cfg, overrides))
    assert err.field == field and names in str(err)


def test_one_prompt_length_rule():
    cfg = load_experiment(str(EXPERIMENTS / "tiny_ppo.py") + ":toy")
    assert prompt_len(cfg) == cfg.data.max_prompt_len == 24
    cfg.data.max_prompt_len = 0  # the default: what the response leaves of the sequence
    assert prompt_len(cfg) == cfg.train.seq_len - cfg.ppo.response_len == 32
    pipe = load_experiment(str(EXPERIMENTS / "tiny_cpu.py"))
    stage = stage_config(pipe, "ppo", Paths("unused", pipe.data.vocab_size))
    # The pipeline's PPO stage, its evaluation and PPO's own rule agree.
    assert stage.data.max_prompt_len == pipeline_prompt_len(pipe)
    assert pipeline_prompt_len(pipe) == prompt_len(dataclasses.replace(stage, data=dataclasses.replace(
        stage.data, max_prompt_len=0)))


def test_batch_shards_counts_the_batch_axes_of_a_real_mesh():
    mesh_cfg = MeshConfig(data=2, fsdp=-1)
    mesh = make_mesh(mesh_cfg)  # 2 x 4 on the 8 emulated devices
    rules = mesh_cfg.logical_rules()
    assert batch_axes(rules) == ("data", "fsdp")
    assert batch_shards(mesh.shape, rules) == 8 == batch_shards(resolve_mesh_shape(mesh_cfg, 8), rules)
    data_only = MeshConfig(data=2, fsdp=-1, rules=(("batch", "data"),)).logical_rules()
    assert batch_axes(data_only) == ("data",) and batch_shards(mesh.shape, data_only) == 2
    replicated = MeshConfig(rules=(("batch", None),)).logical_rules()
    assert batch_shards(mesh.shape, replicated) == 1
