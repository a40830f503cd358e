"""Plan = train: `plan` compiles the very programs the trainers run. For tiny SFT, reward-model and PPO
configs, each program `plan` compiles is lowered again from the setup that run_lm / run_rm / run_ppo
actually built (captured as they build it), with the same abstract arguments; the two texts must match."""

import dataclasses
import functools

import jax
import pytest

from conftest import REPO
from instruct_jax import plan
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.rl.ppo import trainer as ppo_trainer
from instruct_jax.train.lm import trainer as lm_trainer
from instruct_jax.train.rm import trainer as rm_trainer

EXPERIMENTS = REPO / "experiments"
SMALL = ["model.num_layers=1", "model.d_model=32", "model.mlp_dim=64", "model.head_dim=8", "model.num_heads=2",
         "model.num_kv_heads=1"]


class Built(Exception):
    """Raised by the capturing builder: the trainer got as far as building its programs."""


def capture(monkeypatch, module, name):
    """Wrap module.name (a builder the trainer calls) so that its result is kept and the run stops there."""
    built = {}
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        built["setup"], built["kwargs"] = original(*args, **kwargs), kwargs
        raise Built

    monkeypatch.setattr(module, name, wrapper)
    return built


def planned_programs(monkeypatch, planner, cfg):
    """(name, fn, args) of every program the planner compiles (it still compiles them: a tiny config)."""
    seen = []
    real = plan.compile_piece

    def recording(name, fn, args, *rest, **kw):
        seen.append((name, fn, tuple(args)))
        return real(name, fn, args, *rest, **kw)

    monkeypatch.setattr(plan, "compile_piece", recording)
    planner(cfg, jax.devices())
    monkeypatch.setattr(plan, "compile_piece", real)
    return seen


def assert_same_programs(planned, trained_fns):
    assert [name for name, _, _ in planned] == list(trained_fns)
    for name, fn, args in planned:
        want = fn.lower(*args).as_text()
        got = trained_fns[name].lower(*args).as_text()
        assert got == want, f"{name}: the trainer's program differs from the planned one"


def test_sft_plan_compiles_the_trainers_step(monkeypatch, tmp_path):
    cfg = apply_overrides(load_experiment(str(EXPERIMENTS / "tiny_cpu.py") + ":sft"), SMALL)
    built = capture(monkeypatch, lm_trainer, "build_lm")
    with pytest.raises(Built):
        lm_trainer.run_lm(cfg, str(tmp_path / "sft"), phase="sft")
    monkeypatch.undo()  # plan calls the real builder
    planned = planned_programs(monkeypatch, plan.plan_sft, cfg)
    assert_same_programs(planned, {"train_step": built["setup"].train_step})


def test_rm_plan_compiles_the_trainers_step_with_its_guards(monkeypatch, tmp_path):
    cfg = apply_overrides(load_experiment(str(EXPERIMENTS / "tiny_rm.py")),
                          SMALL + ["train.max_nonfinite_in_a_row=2", "train.loss_spike_factor=4"])
    built = capture(monkeypatch, rm_trainer, "build_rm")
    with pytest.raises(Built):
        rm_trainer.run_rm(cfg, str(tmp_path / "rm"))
    monkeypatch.undo()  # plan calls the real builder
    planned = planned_programs(monkeypatch, plan.plan_rm, cfg)
    assert_same_programs(planned, {"train_step": built["setup"].train_step})
    # The check has teeth: a step built with other guard settings lowers to another program.
    other = rm_trainer.build_rm(apply_overrides(cfg, ["train.loss_spike_factor=0"]))
    _, fn, args = planned[0]
    assert other.train_step.lower(*args).as_text() != fn.lower(*args).as_text()


def test_ppo_plan_compiles_the_trainers_sample_experience_and_update(monkeypatch, tmp_path):
    rm_cfg = apply_overrides(load_experiment(str(EXPERIMENTS / "tiny_rm.py")), ["model.max_seq_len=64"])
    # A reward-model export of tiny_ppo's architecture for run_ppo to load (fresh params: only shapes matter).
    ppo_cfg = load_experiment(str(EXPERIMENTS / "tiny_ppo.py"))
    rm_cfg = dataclasses.replace(rm_cfg, model=ppo_cfg.model, mesh=ppo_cfg.mesh)
    setup = rm_trainer.build_rm(rm_cfg)
    rm_trainer.export_reward_model(str(tmp_path / "rm"), setup.init_state().params, {"gain": 1.0, "bias": 0.0})
    cfg = apply_overrides(ppo_cfg, [f"ppo.reward_model={tmp_path / 'rm'}", "train.init_from="])
    built = capture(monkeypatch, ppo_trainer, "build_ppo")
    with pytest.raises(Built):
        ppo_trainer.run_ppo(cfg, str(tmp_path / "ppo"))
    monkeypatch.undo()  # plan calls the real builder
    # plan does not load the tokenizer: it is handed the run's stop set, pad and end-of-turn ids.
    tokens = {k: built["kwargs"][k] for k in ("stop_tokens", "pad_id", "eot_id")}
    planned = planned_programs(monkeypatch, functools.partial(plan.plan_ppo, tokens=tokens), cfg)
    steps = built["setup"].steps
    assert_same_programs(planned, {"sample": steps.sample, "experience": steps.experience, "update": steps.update})
