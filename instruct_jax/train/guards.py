"""Numerical guards for every jitted update: skip non-finite (and optionally spiking) steps.

One bad batch (a NaN from an overflow, an inf from a log of zero) must not poison the weights or
Adam's moments for the rest of a run. Every train step (SFT / pretraining, reward model, each PPO
minibatch) ends with `guarded_apply`: the update is applied only if the loss and the gradient norm
are finite (and, with `train.loss_spike_factor`, the loss is not a spike over its running mean).
A skipped update leaves params and optimizer state bitwise unchanged; the step counter still
advances, so the bad batch is consumed, not retried, and the data order (a function of the step)
stays the same as in a run without the skip. The optimizer's own count (learning-rate schedule,
Adam bias correction) only counts applied updates.

The decision is a select inside the jitted step, fused into the optimizer update (no host round
trip, no extra pass over the weights). Its counters live in `TrainState.guard`, so they are checkpointed with the weights and a
resumed run continues them bit for bit. After `train.max_nonfinite_in_a_row` non-finite steps in a
row the guard latches: later steps are skipped too, until the trainer notices (at its next check step),
saves a checkpoint (which therefore holds the last good params and optimizer state) and stops with
`TrainingDiverged`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good state is in the named checkpoint."""


@flax.struct.dataclass
class GuardState:
    """Counters of the guard (int32 / float32 scalars, replicated); checkpointed in TrainState.guard."""

    nonfinite_in_a_row: jax.Array  # consecutive steps with a non-finite loss or gradient
    skipped_nonfinite: jax.Array  # all steps skipped for a non-finite loss or gradient
    skipped_spike: jax.Array  # all steps skipped as loss spikes
    loss_mean: jax.Array  # running mean of the finite losses (exact over the first `window`, then EMA)
    loss_count: jax.Array  # finite losses seen

    @classmethod
    def zeros(cls) -> "GuardState":
        i = jnp.zeros((), jnp.int32)
        return cls(nonfinite_in_a_row=i, skipped_nonfinite=i, skipped_spike=i,
                   loss_mean=jnp.zeros((), jnp.float32), loss_count=i)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """Static (trace-time) settings, from TrainConfig."""

    max_nonfinite_in_a_row: int = 10  # latch (skip everything) once this many non-finite steps came in a row
    loss_spike_factor: float = 0.0  # skip a step whose loss > factor * running mean; 0 = off
    loss_spike_window: int = 50  # running-mean horizon, and finite steps seen before spikes are tested

    @classmethod
    def from_train(cls, train: Any) -> "GuardConfig":
        return cls(train.max_nonfinite_in_a_row, train.loss_spike_factor, train.loss_spike_window)


def guard_decision(guard: GuardState, loss: jax.Array, grad_norm: jax.Array, cfg: GuardConfig):
    """(apply?, new GuardState) for one step. Pure; the worked cases are in tests/test_guards.py.

    finite = loss and grad norm finite; spike = finite and the window is full and loss > factor *
    mean; latched = nonfinite_in_a_row >= max (frozen until the trainer re-arms it on restart).
    apply = finite and not spike and not latched. The running mean takes every finite loss, spikes
    included, so a real shift of the loss level is followed instead of being skipped forever.
    """
    loss = loss.astype(jnp.float32)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    latched = guard.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row
    spike = jnp.asarray(False)
    if cfg.loss_spike_factor > 0:
        warm = guard.loss_count >= cfg.loss_spike_window
        spike = finite & warm & (loss > cfg.loss_spike_factor * guard.loss_mean)
    apply = finite & ~spike & ~latched
    count = guard.loss_count + finite.astype(jnp.int32)
    rate = 1.0 / jnp.minimum(count, cfg.loss_spike_window).astype(jnp.float32)
    mean = jnp.where(finite, guard.loss_mean + (jnp.where(finite, loss, 0.0) - guard.loss_mean) * rate,
                     guard.loss_mean)
    in_a_row = jnp.where(latched, guard.nonfinite_in_a_row,
                         jnp.where(finite, 0, guard.nonfinite_in_a_row + 1))
    new = GuardState(nonfinite_in_a_row=in_a_row,
                     skipped_nonfinite=guard.skipped_nonfinite + (~finite).astype(jnp.int32),
                     skipped_spike=guard.skipped_spike + (spike & ~latched).astype(jnp.int32),
                     loss_mean=mean, loss_count=count)
    return apply, new


def guarded_apply(apply: jax.Array, update: Callable[[], Any], keep: Any) -> Any:
    """`update()` where `apply`, else `keep` (the same pytree structure), leaf by leaf.

    A select rather than a lax.cond: XLA fuses it into the optimizer's elementwise update (one pass
    over params and moments either way), and on GPU a conditional reads its predicate back on the
    host every step. A select never mixes values: NaNs computed from bad gradients are discarded.
    """
    return jax.tree.map(lambda new, old: jnp.where(apply, new, old), update(), keep)


def guard_metrics(guard: GuardState) -> dict:
    """The counters as float metrics (cumulative, so any logged row tells the whole story)."""
    return {"skipped_nonfinite": guard.skipped_nonfinite.astype(jnp.float32),
            "skipped_spike": guard.skipped_spike.astype(jnp.float32),
            "nonfinite_in_a_row": guard.nonfinite_in_a_row.astype(jnp.float32)}


# ----------------------------------------------------------------------------- host side (trainers)
def rearm(guard: GuardState, limit: int) -> GuardState:
    """A restored guard that had latched starts counting again (the user restarted on purpose,
    typically with a lower learning rate or fixed data); any other guard is returned unchanged."""
    if int(jax.device_get(guard.nonfinite_in_a_row)) < limit:
        return guard
    zero = jax.device_put(jnp.zeros((), jnp.int32), guard.nonfinite_in_a_row.sharding)
    return guard.replace(nonfinite_in_a_row=zero)


def diverged_message(phase: str, step: int, limit: int, ckpt_dir: str) -> str:
    return (f"{phase}: stopped at step {step}: the loss or gradients were non-finite for {limit} steps in a row "
            f"(train.max_nonfinite_in_a_row). The checkpoint saved at step {step} in {ckpt_dir} holds the last "
            f"good params and optimizer state; lower the learning rate or check the data, then re-run the same "
            f"command to resume from it.")
