"""The one training loop (train/loop.py) with a phase small enough to follow by hand: the state is a running sum.

Step i adds values[i] to the sum; a NaN value is a non-finite step (the sum is kept, the guard counts it).
Each test states what the loop must do and checks it against numbers computed here independently.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax.config import Config
from instruct_jax.train.guards import GuardState, TrainingDiverged
from instruct_jax.train.loop import Phase, run_phase


class SumPhase(Phase):
    name = "sum"

    def __init__(self, values, eval_every=0, stop_above=None, defer=False, in_flight=True):
        self.values, self.eval_every, self.stop_above = list(values), eval_every, stop_above
        self.defer_last, self.guard_in_flight = defer, in_flight
        self.calls, self.restored_meta, self.exported, self.sum = [], None, None, 0.0

    def fresh_state(self):
        return {"x": jnp.zeros((), jnp.float32), "guard": GuardState.zeros()}

    def restore(self, state, meta):
        self.restored_meta = meta
        self.sum = float(state["x"])
        return state

    def meta(self, done):
        return {"data_step": done, "sum": self.sum}

    def begin(self, start):
        self.calls.append(("begin", start))

    def step(self, state, index):
        v = self.values[index]
        finite = not math.isnan(v)
        g = state["guard"]
        in_a_row = jnp.where(g.nonfinite_in_a_row >= 2, g.nonfinite_in_a_row,  # latched at 2 (the test's limit)
                             0 if finite else g.nonfinite_in_a_row + 1)
        x = state["x"] + (v if finite else 0.0)
        self.sum = float(x)
        state = {"x": x, "guard": g.replace(nonfinite_in_a_row=jnp.asarray(in_a_row, jnp.int32))}
        return state, {"loss": x, "nonfinite_in_a_row": state["guard"].nonfinite_in_a_row}

    def eval_due(self, done):
        return self.eval_every > 0 and done % self.eval_every == 0

    def row(self, done, state, out, evaluate):
        row = super().row(done, state, out, evaluate)
        if evaluate:
            row["eval_loss"] = -row["loss"]
        return row

    def stop_early(self):
        return "above" if self.stop_above is not None and self.sum > self.stop_above else None

    def finish(self, state, done, last, writer):
        if not self.defer_last:
            return last, {}
        final = {"final_sum": float(state["x"]), "loss": float(state["x"])}
        writer.write(done, final)
        return {"step": done, **final}, {"finished": True}

    def export(self, state):
        self.exported = float(state["x"])

    def close(self):
        self.calls.append(("close",))


def config(steps, log_every=1, every_steps=0):
    cfg = Config()
    cfg.train.steps, cfg.train.max_nonfinite_in_a_row = steps, 2
    cfg.logging.log_every, cfg.logging.tensorboard, cfg.logging.progress_bar = log_every, False, False
    cfg.checkpoint.every_steps, cfg.checkpoint.keep, cfg.checkpoint.async_save = every_steps, 3, False
    return cfg


def rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def sharded_abstract():
    """The state's ShapeDtypeStructs on one device (what the checkpoint restores into)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: {"x": jnp.zeros((), jnp.float32), "guard": GuardState.zeros()})
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def test_cadence_rows_and_export(tmp_path):
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    phase = SumPhase(values, eval_every=2)
    result = run_phase(phase, config(7, log_every=3), str(tmp_path), sharded_abstract())
    got = rows(tmp_path)
    # rows: every 3rd step, every evaluation (2, 4, 6), the last step
    assert [r["step"] for r in got] == [2, 3, 4, 6, 7]
    assert [r["loss"] for r in got] == [float(np.cumsum(values)[s - 1]) for s in (2, 3, 4, 6, 7)]
    assert [("eval_loss" in r) for r in got] == [True, False, True, True, False]
    assert all("step_time" in r and "mfu" not in r for r in got)  # no FLOPs counted: the step time only
    assert result["step"] == 7 and result["loss"] == 28.0 and phase.exported == 28.0
    assert phase.calls == [("begin", 0), ("close",)]


def test_resume_continues_exactly_and_hands_back_the_meta(tmp_path):
    values = [0.5, 1.5, -2.0, 4.0, 0.25, 8.0]
    straight = tmp_path / "straight"
    run_phase(SumPhase(values), config(6), str(straight), sharded_abstract())
    split = tmp_path / "split"
    run_phase(SumPhase(values), config(4, every_steps=1), str(split), sharded_abstract())
    second = SumPhase(values)
    result = run_phase(second, config(6, every_steps=1), str(split), sharded_abstract())
    assert second.calls[0] == ("begin", 4)
    assert second.restored_meta["data_step"] == 4 and second.restored_meta["sum"] == 4.0
    def untimed(workdir):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in rows(workdir)]

    assert untimed(split) == untimed(straight)
    assert result["loss"] == float(np.sum(values))


@pytest.mark.parametrize("in_flight, log_every, stop_at", [(True, 1, 4), (False, 1, 4), (True, 3, 6), (False, 3, 4)])
def test_divergence_stops_where_the_verdict_is_read(tmp_path, in_flight, log_every, stop_at):
    # steps 3 and 4 (1-based) are non-finite: the guard reaches the limit 2 after step 4. A phase that fetches
    # every step (PPO: in_flight False) reads the verdict every step and stops at 4; one whose metrics stay on
    # the device reads it at check steps only (logging, evaluation, checkpoint, last): at 4 when every step
    # logs, at 6 with log_every=3 (the latched guard froze the state meanwhile).
    values = [1.0, 1.0, float("nan"), float("nan"), float("nan"), 1.0, 1.0]
    phase = SumPhase(values, in_flight=in_flight)
    with pytest.raises(TrainingDiverged, match=f"stopped at step {stop_at}"):
        run_phase(phase, config(7, log_every=log_every), str(tmp_path), sharded_abstract())
    assert rows(tmp_path)[-1]["step"] == stop_at and rows(tmp_path)[-1]["nonfinite_in_a_row"] == 2.0
    assert ("close",) in phase.calls
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [stop_at]


def test_deferred_last_row_is_written_once_by_finish_and_once_again_on_rerun(tmp_path):
    values = [1.0, 2.0, 3.0]
    result = run_phase(SumPhase(values, defer=True), config(3), str(tmp_path), sharded_abstract())
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]
    assert rows(tmp_path)[-1]["final_sum"] == 6.0 and result == {"step": 3, "final_sum": 6.0, "loss": 6.0}
    again = SumPhase(values, defer=True)
    assert run_phase(again, config(3), str(tmp_path), sharded_abstract()) == result
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]  # the final row replaced, not repeated
    assert again.restored_meta["finished"] is True


def test_early_stop_and_a_stopped_run_started_again_is_done(tmp_path):
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    result = run_phase(SumPhase(values, stop_above=2.5), config(6), str(tmp_path), sharded_abstract())
    assert result["step"] == 3 and result["stopped_early"] == 1.0
    again = SumPhase(values, stop_above=2.5)
    assert run_phase(again, config(6), str(tmp_path), sharded_abstract())["step"] == 3
    assert [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


class QuietSumPhase(SumPhase):
    """SumPhase without its per-step host read: what an SFT or reward-model step is to the loop."""

    def step(self, state, index):
        g = state["guard"]
        return {"x": state["x"] + self.values[index], "guard": g}, {"loss": state["x"] + self.values[index],
                                                                      "nonfinite_in_a_row": g.nonfinite_in_a_row}

    def meta(self, done):
        return {"data_step": done}


@pytest.fixture
def no_fetch_between_checks(monkeypatch):
    """Any read of an array's value on the main thread outside the loop's `fetch_allowed` sections raises.
    (On CPU `jax.transfer_guard` does not see such reads; every read of a jax.Array - np.asarray, float,
    item, device_get - goes through ArrayImpl._value.)"""
    import threading

    from jax._src.array import ArrayImpl

    from instruct_jax.train import loop

    value = ArrayImpl._value

    def guarded(self):
        if threading.current_thread() is threading.main_thread() and not loop.fetches_allowed_here():
            raise AssertionError("read from the devices between the loop's check steps")
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(guarded))


def test_nothing_is_fetched_from_the_devices_between_check_steps(tmp_path, no_fetch_between_checks):
    """The loop reads the devices only at logging, evaluation and checkpoint steps; a phase that reads them
    every step fails under the same check, so the check is really on."""
    values = [1.0] * 8
    result = run_phase(QuietSumPhase(values), config(8, log_every=4, every_steps=4), str(tmp_path / "quiet"),
                       sharded_abstract())
    assert [r["step"] for r in rows(tmp_path / "quiet")] == [4, 8] and result["loss"] == 8.0
    with pytest.raises(AssertionError, match="between the loop's check steps"):
        run_phase(SumPhase(values), config(8, log_every=4), str(tmp_path / "chatty"), sharded_abstract())


def test_an_sft_run_fetches_nothing_between_logging_steps(tmp_path, no_fetch_between_checks):
    """The real SFT phase (loader, jitted step, checkpoints) under the same check: 8 steps, rows at 4 and 8."""
    from instruct_jax.config import apply_overrides, load_experiment
    from instruct_jax.train.lm.trainer import run_lm
    from conftest import REPO

    cfg = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_cpu.py") + ":sft"), [
        "train.steps=8", "logging.log_every=4", "train.eval_every=0", "checkpoint.every_steps=4",
        "logging.progress_bar=false", "logging.tensorboard=false", "train.seq_len=64", "model.max_seq_len=64",
        "logging.peak_flops_per_device=1e9"])
    run_lm(cfg, str(tmp_path), phase="sft")
    assert [r["step"] for r in rows(tmp_path)] == [4, 8]
