"""Numerical guards (train/guards.py): a non-finite step changes nothing but the step and the counters;
N in a row stop the run with a checkpoint of the last good state; optional loss-spike skip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from instruct_jax.checkpoint import CheckpointManager
from instruct_jax.config import apply_overrides, load_experiment, validate
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig
from ppo_toy import random_prompts, toy_config, toy_setup
from instruct_jax.rl.ppo.trainer import validate_ppo
from instruct_jax.train.guards import GuardConfig, GuardState, TrainingDiverged, guard_decision
from instruct_jax.train.rm.ranking import RANKING_KEYS

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

NAN = float("nan")
TINY = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                   max_seq_len=16)


def decide(guard, loss, grad_norm=1.0, **cfg):
    apply, new = guard_decision(guard, jnp.float32(loss), jnp.float32(grad_norm), GuardConfig(**cfg))
    return bool(apply), jax.tree.map(lambda x: x.item(), new)


# ----------------------------------------------------------------------------- the decision (pure)
def test_guard_decision_counts_skips_latches_and_tracks_the_mean():
    g = GuardState.zeros()
    ok, g = decide(g, 2.0, max_nonfinite_in_a_row=2)
    assert ok and g.loss_mean == 2.0 and g.loss_count == 1 and g.skipped_nonfinite == 0
    ok, g = decide(g, NAN, max_nonfinite_in_a_row=2)
    assert not ok and g.nonfinite_in_a_row == 1 and g.skipped_nonfinite == 1 and g.loss_mean == 2.0
    ok, g = decide(g, 4.0, grad_norm=float("inf"), max_nonfinite_in_a_row=2)  # a finite loss, inf gradients
    assert not ok and g.nonfinite_in_a_row == 2 and g.skipped_nonfinite == 2
    ok, g = decide(g, 4.0, max_nonfinite_in_a_row=2)  # latched: even a finite step is skipped, the count frozen
    assert not ok and g.nonfinite_in_a_row == 2 and g.skipped_nonfinite == 2
    ok, g = decide(GuardState.zeros(), NAN, max_nonfinite_in_a_row=5)
    ok, g = decide(g, 1.0, max_nonfinite_in_a_row=5)  # a finite step resets the run of non-finite ones
    assert ok and g.nonfinite_in_a_row == 0 and g.skipped_nonfinite == 1


def test_loss_spike_skip_after_the_window_and_the_mean_follows():
    g, cfg = GuardState.zeros(), dict(loss_spike_factor=2.0, loss_spike_window=3)
    for loss in (4.0, 2.0, 3.0):  # the window fills: exact mean 3
        ok, g = decide(g, loss, **cfg)
        assert ok
    assert g.loss_mean == 3.0
    ok, g = decide(g, 7.0, **cfg)  # 7 > 2 * 3: skipped, but the mean moves by (7 - 3) / 3
    assert not ok and g.skipped_spike == 1 and g.skipped_nonfinite == 0
    np.testing.assert_allclose(g.loss_mean, 3.0 + 4.0 / 3, rtol=1e-6)
    ok, _ = decide(g, 8.0, **cfg)  # 8 <= 2 * 4.33
    assert ok
    ok, _ = decide(GuardState.zeros(), 100.0, **cfg)  # before the window is full nothing is a spike
    assert ok


def test_guard_fields_are_validated():
    cfg = load_experiment(str(REPO / "experiments" / "tiny_cpu.py:sft"))
    for override, field in (("train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row"),
                            ("train.loss_spike_factor=0.5", "train.loss_spike_factor"),
                            ("train.loss_spike_window=0", "train.loss_spike_window")):
        bad = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_cpu.py:sft")), [override])
        with pytest.raises(ConfigError) as e:
            validate(bad)
        assert e.value.field == field
    ppo = toy_config()
    ppo.train.loss_spike_factor = 3.0
    with pytest.raises(ConfigError, match="train.loss_spike_factor"):
        validate_ppo(ppo)
    validate(cfg)


# ----------------------------------------------------------------------------- the steps
def lm_batch(seed, bad=False):
    rng = np.random.default_rng(seed)
    seq = rng.integers(3, 64, (8, 17)).astype(np.int32)
    mask = np.ones((8, 16), np.float32)
    if bad:
        mask[3, 5] = NAN  # one poisoned weight makes the loss and every gradient NaN
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
            "segment_ids": np.ones((8, 16), np.int32)}


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_lm_step_skips_a_nan_batch_bitwise_and_the_run_continues_as_without_it():
    from instruct_jax.train.lm.build import build_lm

    cfg = load_experiment(str(REPO / "experiments" / "tiny_cpu.py:sft"))
    cfg.model, cfg.train.seq_len, cfg.train.global_batch_size = TINY, 16, 8
    setup = build_lm(cfg)
    run = {}
    for name, batches in (("with_bad", [lm_batch(0), lm_batch(1, bad=True), lm_batch(2)]),
                          ("without", [lm_batch(0), lm_batch(2)])):
        state, rows = setup.init_state(), []
        for b in batches:
            before = jax.device_get(state)
            state, m = setup.train_step(state, b)
            rows.append((before, jax.device_get(state), jax.device_get(m)))
        run[name] = (state, rows)
    before, after, m = run["with_bad"][1][1]
    assert np.isnan(m["loss"]) and m["skipped_nonfinite"] == 1 and m["nonfinite_in_a_row"] == 1
    assert_trees_equal(after.params, before.params)
    assert_trees_equal(after.opt_state, before.opt_state)
    assert after.step == before.step + 1  # the bad batch is consumed, not retried
    last = run["with_bad"][1][2][2]
    assert last["skipped_nonfinite"] == 1 and last["nonfinite_in_a_row"] == 0
    # Adam's count and the schedule only saw applied updates: the same params as never seeing the bad batch.
    assert_trees_equal(run["with_bad"][0].params, run["without"][0].params)
    # The logged learning rate is the one each applied update used (the schedule's count, not the step):
    # after the skipped batch it is the without-run's second rate, not the schedule's value at step 2.
    lrs = [r[2]["lr"] for r in run["with_bad"][1]]
    assert lrs[2] == lrs[1] == run["without"][1][1][2]["lr"] != setup.schedule(2)


def test_reward_step_skips_non_finite_params():
    from instruct_jax.train.rm.trainer import build_rm

    cfg = load_experiment(str(REPO / "experiments" / "tiny_rm.py"))
    cfg.model, cfg.train.seq_len, cfg.train.global_batch_size = TINY, 16, 8
    setup = build_rm(cfg)
    state = setup.init_state()
    head = state.params["head"]
    poisoned = jax.tree.map(lambda x: x * jnp.float32(NAN), head)  # same shardings
    state = state.replace(params={**state.params, "head": poisoned})
    before = jax.device_get(state)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(3, 64, (8, 2, 16)).astype(np.int32),
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 2, 16)).copy(),
             "segment_ids": np.ones((8, 2, 16), np.int32), "ranks": np.tile(np.int32([1, 2]), (8, 1)),
             "lengths": np.full((8, 2), 16, np.int32)}
    assert set(batch) == set(RANKING_KEYS)
    new, m = setup.train_step(state, batch)
    m = jax.device_get(m)
    assert np.isnan(m["loss"]) and m["skipped_nonfinite"] == 1
    assert_trees_equal(new.params, before.params)
    assert_trees_equal(new.opt_state, before.opt_state)


def test_ppo_minibatches_with_a_nan_value_model_update_nothing():
    cfg = toy_config(mesh=MeshConfig(fsdp=-1), batch=8, epochs=2, minibatches=2, ema_decay=0.9)
    setup, state, ref = toy_setup(cfg, devices=jax.devices()[:1])
    from instruct_jax.rl.rollout import sample_from_tokens
    from ppo_toy import EOS, PAD

    tokens = np.random.default_rng(5).integers(3, 64, (8, 12)).astype(np.int32)
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, {}, random_prompts(8),
                                    sample_from_tokens(jnp.asarray(tokens), (EOS,), PAD), np.float32(0.05))
    head = jax.tree.map(lambda x: x * jnp.float32(NAN), state.value.params["head"])
    state = state.replace(value=state.value.replace(params={**state.value.params, "head": head}))
    before = jax.device_get(state)
    new, stats = setup.steps.update(state, exp, jax.random.PRNGKey(1))
    new, stats = jax.device_get(new), jax.device_get(stats)
    np.testing.assert_array_equal(stats["skipped"], [1, 1, 1, 1])
    for part in ("params", "opt_state"):
        assert_trees_equal(getattr(new.policy, part), getattr(before.policy, part))
        assert_trees_equal(getattr(new.value, part), getattr(before.value, part))
    assert_trees_equal(new.ema, before.ema)
    assert new.policy.guard.skipped_nonfinite == 4 and new.policy.step == before.policy.step + 4


# ----------------------------------------------------------------------------- the loop stops
def test_divergent_run_stops_after_n_in_a_row_with_a_checkpoint_of_the_last_good_state(tmp_path, capsys):
    """A learning rate of 1e30 blows the weights up: the first update still comes out finite, every
    later loss is NaN. With max 3 in a row the run stops, and its checkpoint holds finite params."""
    from instruct_jax.train.lm.build import build_lm
    from instruct_jax.train.lm.trainer import run_lm

    cfg = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_cpu.py:pretrain")), [
        "data.max_rows=2000", "train.steps=20", "train.seq_len=16", "train.global_batch_size=8", "checkpoint.every_steps=0",
        "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false", "train.eval_every=0",
        "logging.peak_flops_per_device=1e9", "optim.learning_rate=1e30", "optim.warmup_steps=0",
        "train.max_nonfinite_in_a_row=3", "checkpoint.async_save=false"])
    cfg.model = ModelConfig(**{**TINY.__dict__, "vocab_size": 1024})
    with pytest.raises(TrainingDiverged, match="non-finite for 3 steps in a row"):
        run_lm(cfg, str(tmp_path), phase="pretrain")
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    skipped = [r["skipped_nonfinite"] for r in rows]
    assert skipped == sorted(skipped) and skipped[-1] >= 3
    first_bad = next(i for i, r in enumerate(rows) if not np.isfinite(r["loss"]))
    assert all(np.isfinite(r["loss"]) for r in rows[:first_bad])
    stop = rows[-1]["step"]
    # Every step logs here, so every step is a check step: the loop notices right at the third non-finite step
    # (with log_every > 1, at the next check step; the latched guard skips every update until then).
    assert stop == rows[first_bad]["step"] + 2
    ckpt = CheckpointManager(tmp_path / "checkpoints", every_steps=0, keep=1)
    setup = build_lm(cfg)
    step, state, _ = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert step == stop and int(state.guard.nonfinite_in_a_row) == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert "lower the learning rate" in capsys.readouterr().out
