"""The one training loop: every phase (SFT / pretraining, the reward model, PPO) runs on `run_phase`.

A phase supplies its state, its step and its rows (a `Phase`); the loop owns everything between them:

    restore the newest intact checkpoint (guards re-armed, phase meta handed back) or start fresh
    truncate metrics.jsonl after the restored step (a resumed run rewrites exactly the rows after it)
    per step: dispatch -> divergence verdict -> timing -> row when due -> preemption exit -> early stop
              -> checkpoint -> fault injection
    finish (the phase's last work, e.g. the reward model's normalization) -> final checkpoint -> export

Between two logging steps the loop fetches nothing from the devices (a phase whose step leaves its metrics
there, `guard_in_flight`): it keeps two steps in flight by waiting for the previous step's outputs (a wait, no
transfer) and reads the guard's verdict (train/guards.py) only at *check* steps: logging, evaluation,
checkpoint and the last step. That is safe because a latched guard freezes: every update after it is skipped,
so the state a late check saves is the last good one. PPO, which fetches its rollout statistics every
iteration anyway, reads the verdict every iteration. A latched guard saves the last good state and raises
TrainingDiverged. SIGTERM (TPU preemption) saves a checkpoint and returns cleanly; with several processes the
"did anyone get it" collective runs at check steps and every `checkpoint.preemption_check_every` steps.
Device-to-host reads belong inside `fetch_allowed()` sections: a run under
`jax.transfer_guard_device_to_host("disallow")` on an accelerator fails on any other, and on CPU (where the
guard does not see reads) tests/test_loop.py fails on any array read outside them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Optional

import jax

from instruct_jax.checkpoint import CheckpointManager, PreemptionGuard
from instruct_jax.config import Config
from instruct_jax.metrics import MetricsWriter, Profiler, StepTimer, log, measure_peak_flops, progress
from instruct_jax.train.guards import GuardState, TrainingDiverged, diverged_message, rearm


# Fault injection for tests: SIGKILL this process right after the given step (and its
# checkpoint save, if one was due) to prove that nothing is lost.
KILL_AT_STEP_ENV = "INSTRUCT_JAX_KILL_AT_STEP"
LAST_ROW = "last_train_row"  # the final checkpoint's meta keeps the last row: a finished run re-run returns it


def maybe_kill(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


_FETCH = threading.local()  # whether this thread may read from the devices now (see `fetch_allowed`)


@contextlib.contextmanager
def _fetch_policy(allowed: bool):
    previous = getattr(_FETCH, "allowed", True)
    _FETCH.allowed = allowed
    try:
        with jax.transfer_guard_device_to_host("allow") if allowed else contextlib.nullcontext():
            yield
    finally:
        _FETCH.allowed = previous


def fetch_allowed():
    """Where the loop reads from the devices: rows, verdicts, checkpoints, the preemption collective."""
    return _fetch_policy(True)


def between_checks():
    """A loop step outside its check sections: nothing should be read from the devices here."""
    return _fetch_policy(False)


def fetches_allowed_here() -> bool:
    """False inside a step between check sections (tests/test_loop.py turns this into an error on any fetch;
    on accelerators `jax.transfer_guard_device_to_host("disallow")` around a run does the same)."""
    return getattr(_FETCH, "allowed", True)


def rearm_guards(state: Any, limit: int) -> Any:
    """Every GuardState in `state` (one per TrainState) re-armed for train.max_nonfinite_in_a_row."""
    return jax.tree.map(lambda node: rearm(node, limit) if isinstance(node, GuardState) else node, state,
                        is_leaf=lambda node: isinstance(node, GuardState))


class Phase:
    """What a training phase gives the loop. Subclasses set the attributes and override the hooks;
    the defaults fit a phase without evaluation, early stopping, extra meta or a last act."""

    name = "train"  # progress bar, log lines, the divergence message
    unit = "step"  # what one loop step is called in log lines ("iteration" for PPO)
    guard_in_flight = True  # metrics stay on the device: two steps in flight, the verdict read at check steps
    defer_last = False  # the last step's row and checkpoint come from finish() (the reward model's normalization)
    tokens_per_step = 0  # tokens one step processes over all hosts (0: the row gets the step time only)
    flops_per_token = 0.0  # model FLOPs per token for MFU (0: no tokens/s or MFU)

    # ---- state
    def fresh_state(self) -> Any:
        """A fresh run's state (from train.init_from, the reward model, or a seeded init)."""
        raise NotImplementedError

    def restore(self, state: Any, meta: dict) -> Any:
        """Take back what the phase keeps in a checkpoint's meta (the KL controller, the plateau); may
        adjust the restored state."""
        return state

    def restored_note(self) -> str:
        """Appended to the "resumed from checkpoint" log line (e.g. " (kl_coef 0.05)")."""
        return ""

    def meta(self, done: int) -> dict:
        """What the phase keeps in the checkpoint meta after `done` steps."""
        return {"data_step": done}

    # ---- steps
    def begin(self, start: int) -> None:
        """Open the batch iterators at `start` and trim the phase's own side files."""

    def step(self, state: Any, index: int) -> tuple[Any, Any]:
        """Dispatch step `index`: (state, out). `out` holds "nonfinite_in_a_row" (see nonfinite)."""
        raise NotImplementedError

    def nonfinite(self, out: Any) -> int:
        return int(out["nonfinite_in_a_row"])

    def eval_due(self, done: int) -> bool:
        return False

    def row(self, done: int, state: Any, out: Any, evaluate: bool) -> dict:
        """The metrics row after `done` steps (fetches `out`; runs the evaluation when `evaluate`)."""
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def postfix(self, row: dict) -> dict:
        """The progress bar's postfix."""
        return {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}

    def stop_early(self) -> Optional[str]:
        """A message when the phase has reached its own end before train.steps (a plateau), else None."""
        return None

    def after_save(self, done: int, state: Any) -> None:
        """After the step's checkpoint (snapshots for evaluating along the way)."""

    def close(self) -> None:
        """Close the batch iterators (preemption, divergence and the end all call it)."""

    # ---- the end
    def finish(self, state: Any, done: int, last: dict, writer: MetricsWriter) -> tuple[dict, dict]:
        """After the last step, before the final checkpoint: (result, extra meta for the final checkpoint)."""
        return last, {}

    def export(self, state: Any) -> None:
        """Write the phase's exports (params, reward model, value model) after the final checkpoint."""

    def summary(self, result: dict) -> None:
        """Log the closing lines (data report, final numbers)."""


def stop_diverged(phase: Phase, done: int, state, meta: dict, limit: int, ckpt: CheckpointManager,
                  writer: MetricsWriter):
    """The guard latched (train/guards.py): checkpoint the state (its params and optimizer state are
    the last good ones: every later update was skipped), close up and raise TrainingDiverged."""
    phase.close()
    ckpt.save(done, state, meta, force=True)
    ckpt.wait()
    ckpt.close()
    writer.close()
    message = diverged_message(phase.name, done, limit, str(ckpt.directory))
    log(message)
    raise TrainingDiverged(message)


def checkpoint_manager(cfg: Config, workdir: str) -> CheckpointManager:
    c = cfg.checkpoint
    return CheckpointManager(os.path.join(workdir, "checkpoints"), every_steps=c.every_steps, keep=c.keep,
                             keep_every=c.keep_every, async_save=c.async_save)


def run_phase(phase: Phase, cfg: Config, workdir: str, abstract_state: Any) -> dict:
    """Run `phase` for cfg.train.steps steps (resuming from the newest checkpoint); the last row, or
    what phase.finish returns. `abstract_state`: ShapeDtypeStructs with the target shardings (restore)."""
    limit, total = cfg.train.max_nonfinite_in_a_row, cfg.train.steps

    # ---- Checkpoint: resume or start
    ckpt = checkpoint_manager(cfg, workdir)
    restored = ckpt.restore_latest(abstract_state)
    if restored is not None:
        start, state, meta = restored
        state = phase.restore(rearm_guards(state, limit), meta)
        log(f"resumed from checkpoint at {phase.unit} {start}{phase.restored_note()}")
    else:
        state, start, meta = phase.fresh_state(), 0, {}
    writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard)
    # A resumed run rewrites exactly the rows after its checkpoint; a finished deferring one, its final row.
    writer.truncate_after(start - 1 if phase.defer_last and start == total else start)
    last = dict(meta.get(LAST_ROW, {}))

    # ---- Train
    peak = (cfg.logging.peak_flops_per_device or measure_peak_flops()) if phase.flops_per_token else 1.0
    timer = StepTimer(phase.flops_per_token, jax.device_count(), peak)
    profiler = Profiler(workdir, cfg.logging.profile_start, cfg.logging.profile_steps)
    stop_at = start if phase.stop_early() else total  # a run that stopped early and is started again: done
    bar = progress(total, initial=start, desc=phase.name,
                   enabled=cfg.logging.progress_bar and jax.process_index() == 0)
    phase.begin(start)
    in_flight = None
    preempt_every = 1 if jax.process_count() == 1 else max(1, cfg.checkpoint.preemption_check_every)
    with PreemptionGuard() as guard:
        for step in range(start, stop_at):
            with between_checks():
                profiler.step(step, block_on=state)
                state, out = phase.step(state, step)
                done = step + 1
                # A check step reads from the devices; between them nothing is fetched (module docstring).
                check = (done % cfg.logging.log_every == 0 or done == total or phase.eval_due(done)
                         or ckpt.should_save(done) or not phase.guard_in_flight)
                # At most two steps in flight: dispatch overlaps host work with the device, and on emulated
                # CPU devices an unbounded queue of collective programs can exhaust XLA's thread pool and
                # deadlock in its rendezvous. So wait for the previous step (a wait, not a transfer).
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                in_flight = out if phase.guard_in_flight else None
                timer.add(phase.tokens_per_step)
                bar.update(1)
                if done == start + 1:
                    jax.block_until_ready(out)
                    timer.reset()  # the first step includes compilation: keep it out of the timing
                with fetch_allowed() if check else contextlib.nullcontext():
                    diverged = check and phase.nonfinite(out) >= limit
                    evaluate = phase.eval_due(done) and not diverged
                    deferred = phase.defer_last and done == total and not diverged
                    if diverged or evaluate or done % cfg.logging.log_every == 0 or done == total:
                        row = phase.row(done, state, out, evaluate)
                        row.update(timing(timer.lap(), phase.flops_per_token))
                        if evaluate:
                            timer.reset()  # the evaluation is not training time
                        if not deferred:
                            writer.write(done, row)
                        bar.set_postfix(**phase.postfix(row))
                        last = {"step": done, **row}
                    if diverged:
                        stop_diverged(phase, done, state, phase.meta(done), limit, ckpt, writer)
                if check or done % preempt_every == 0:
                    with fetch_allowed():
                        stop = guard.should_stop()
                    if stop:
                        with fetch_allowed():
                            ckpt.save(done, state, phase.meta(done), force=True)
                            ckpt.close()
                        phase.close()
                        log(f"preemption signal received: saved checkpoint at {phase.unit} {done}, "
                            "exiting cleanly")
                        writer.close()
                        return last
                message = phase.stop_early()
                if message:
                    log(f"early stop at {phase.unit} {done}: {message}")
                    last["stopped_early"] = 1.0
                    stop_at = done
                    break
                if not deferred:
                    with fetch_allowed() if check else contextlib.nullcontext():  # a save step is a check step
                        ckpt.save(done, state, phase.meta(done))
                        phase.after_save(done, state)
                maybe_kill(done)
    bar.close()
    profiler.stop()
    phase.close()

    # ---- The phase's last act, the final checkpoint, the exports
    result, extra = phase.finish(state, stop_at, last, writer)
    ckpt.save(stop_at, state, {**phase.meta(stop_at), **extra, LAST_ROW: last}, force=True)
    ckpt.wait()
    ckpt.close()
    phase.export(state)
    writer.close()
    phase.summary(result)
    return result


def timing(lap: dict, flops_per_token: float) -> dict:
    """The timer's lap for a row: tokens/s and MFU only for phases that count model FLOPs."""
    return lap if flops_per_token else {"step_time": lap["step_time"]}
