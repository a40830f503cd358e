"""The jitted DPO steps: train (policy gradient through the preference loss, the reference frozen) and eval
(implicit rewards of held-out rankings). Same shape as the reward model's steps (train/rm/ranking.py): K
responses of a prompt forwarded as one [B * K, T] batch, microbatches accumulated by a scan, the guarded optimizer
update, state donated, explicit in/out shardings."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from instruct_jax.model.lora import base_is_reference, base_only, freeze_base_grads, has_adapters
from instruct_jax.parallel.context import in_mesh_context
from instruct_jax.parallel.sharding import logical_to_spec, replicated
from instruct_jax.train.dpo.losses import preference_loss_sum, sequence_logprobs
from instruct_jax.train.guards import GuardConfig
from instruct_jax.train.optimizer import applied_updates
from instruct_jax.train.rm.ranking import ranking_shardings, split_ranking_microbatches
from instruct_jax.train.state import TrainState
from instruct_jax.train.step import guarded_optimizer_step

DPO_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask", "ranks", "lengths")


def dpo_shardings(mesh, rules) -> dict:
    """A ranking batch's shardings plus its targets and loss mask ([B, K, T] like the tokens)."""
    out = ranking_shardings(mesh, rules)
    seq = NamedSharding(mesh, logical_to_spec(("batch", None, "length"), rules))
    return {**out, "targets": seq, "loss_mask": seq}


def reference_of(params, reference):
    """The reference's params: `reference`, or with LoRA ({} passed: model/lora.py base_is_reference) the policy's
    own base (adapters off), so the frozen base doubles as the reference and no second copy is held."""
    return base_only(params) if isinstance(reference, dict) and not reference and has_adapters(params) else reference


def dpo_loss_and_grads(model, params, reference, batch: dict, num_micro: int, rules, grad_shardings, beta: float,
                       loss: str):
    """(loss, grads, stats): loss = sum of per-prompt losses / prompts with a pair, over all microbatches; stats
    are per-pair means (accuracy, chosen / rejected implicit rewards, their margin) and counts."""

    def loss_sum(p, micro):
        policy = sequence_logprobs(model, p, micro)
        ref = jax.lax.stop_gradient(sequence_logprobs(model, reference_of(p, reference), micro))
        total, prompts, stats = preference_loss_sum(policy, ref, micro["ranks"], beta, loss)
        return total, (prompts, stats)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    names = ("correct", "pairs", "chosen", "rejected")

    def accumulate(carry, micro):
        grads_acc, total, prompts, sums = carry
        (s, (n, stats)), g = grad_fn(params, micro)
        g = freeze_base_grads(g, model.cfg.lora_train)  # LoRA: adapters (+ head) only
        grads_acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads_acc, g), grad_shardings)
        return (grads_acc, total + s, prompts + n, tuple(a + stats[k] for a, k in zip(sums, names))), None

    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), grad_shardings)
    micro = split_ranking_microbatches({k: batch[k] for k in DPO_KEYS}, num_micro, rules)
    start = (zeros, 0.0, 0.0, (0.0,) * len(names))
    (grads, total, prompts, sums), _ = jax.lax.scan(accumulate, start, micro)
    sums = dict(zip(names, sums))
    denom, pairs = jnp.maximum(prompts, 1.0), jnp.maximum(sums["pairs"], 1.0)
    stats = {"accuracy": sums["correct"] / pairs, "chosen_reward": sums["chosen"] / pairs,
             "rejected_reward": sums["rejected"] / pairs, "margin": (sums["chosen"] - sums["rejected"]) / pairs,
             "pairs": sums["pairs"], "prompts": prompts}
    return total / denom, jax.tree.map(lambda g: g / denom, grads), stats


def make_dpo_train_step(model, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh, rules,
                        state_shardings: TrainState, num_micro: int, beta: float, loss: str,
                        guard: GuardConfig = GuardConfig()) -> Callable:
    """step(state, reference params, batch) -> (state, metrics). State donated; the reference is only read."""

    def step(state: TrainState, reference, batch: dict):
        value, grads, stats = dpo_loss_and_grads(model, state.params, reference, batch, num_micro, rules,
                                                 state_shardings.params, beta, loss)
        new, guard_stats = guarded_optimizer_step(tx, state, grads, value, guard)
        return new, {"loss": value, "lr": schedule(applied_updates(state.opt_state)), **stats, **guard_stats}

    ref_shardings = {} if base_is_reference(model.cfg) else state_shardings.params
    jitted = jax.jit(step, in_shardings=(state_shardings, ref_shardings, dpo_shardings(mesh, rules)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))
    return _select_keys(in_mesh_context(jitted, mesh, rules), batch_arg=2)


def make_dpo_eval_step(model, mesh, rules, param_shardings, beta: float) -> Callable:
    """eval(params, reference params, batch) -> implicit rewards [B, K], replicated (host-side metrics)."""

    def rewards(params, reference, batch):
        return beta * (sequence_logprobs(model, params, batch)
                       - sequence_logprobs(model, reference_of(params, reference), batch))

    ref_shardings = {} if base_is_reference(model.cfg) else param_shardings
    jitted = jax.jit(rewards, in_shardings=(param_shardings, ref_shardings, dpo_shardings(mesh, rules)),
                     out_shardings=replicated(mesh))
    return _select_keys(in_mesh_context(jitted, mesh, rules), batch_arg=2)


def _select_keys(fn: Callable, batch_arg: int) -> Callable:
    def select(args):
        return [({k: a[k] for k in DPO_KEYS} if i == batch_arg else a) for i, a in enumerate(args)]

    def wrapped(*args):
        return fn(*select(args))

    wrapped.lower = lambda *args: fn.lower(*select(args))  # plan compiles the step ahead of time
    return wrapped
