"""What every training phase's loop shares: resume from the newest checkpoint, fault injection, the divergence stop.

The LM, reward-model and PPO loops (train/lm/trainer.py, train/rm/trainer.py, rl/ppo/trainer.py) call
these; the one-loop redesign (docs/ARCHITECTURE.md) grows this module into the loop itself.
"""

from __future__ import annotations

import os
import signal

from instruct_jax.checkpoint import CheckpointManager
from instruct_jax.metrics import MetricsWriter, log
from instruct_jax.train.guards import TrainingDiverged, diverged_message, rearm


# Fault injection for tests: SIGKILL this process right after the given step (and its
# checkpoint save, if one was due) to prove that nothing is lost.
KILL_AT_STEP_ENV = "INSTRUCT_JAX_KILL_AT_STEP"


def maybe_kill(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def stop_diverged(phase: str, done: int, state, meta: dict, limit: int, ckpt: CheckpointManager,
                  writer: MetricsWriter):
    """The guard latched (train/guards.py): checkpoint the state (its params and optimizer state are
    the last good ones: every later update was skipped), close up and raise TrainingDiverged."""
    ckpt.save(done, state, meta, force=True)
    ckpt.wait()
    ckpt.close()
    writer.close()
    message = diverged_message(phase, done, limit, str(ckpt.directory))
    log(message)
    raise TrainingDiverged(message)


def resume_latest(ckpt: CheckpointManager, setup):
    """(state, step, meta) of the newest intact checkpoint, its guard re-armed for train.max_nonfinite_in_a_row;
    None when there is none (the phase then starts fresh or from train.init_from). `setup`: a PhaseSetup."""
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is None:
        return None
    step, state, meta = restored
    log(f"resumed from checkpoint at step {step}")
    return state.replace(guard=rearm(state.guard, setup.cfg.train.max_nonfinite_in_a_row)), step, meta
