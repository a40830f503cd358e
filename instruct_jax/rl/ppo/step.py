"""PPO's jitted pieces, all on the training mesh: sample, experience, update.

    sample(policy_params, prompt, rng) -> SampleOutput                     sampling.make_sampler (KV cache)
    experience(policy_params, ref_params, value_params, reward_params,
               prompt, sample, kl_coef) -> (Experience, stats)             rollout.make_experience
    update(state, experience, rng[, ptx_batch]) -> (state, stats)          epochs x minibatches, state donated

Each has explicit in/out shardings and is traced inside the mesh and its logical rules
(`in_mesh_context`), so the policy samples with the weights it trains, where they are, and the
four parameter trees (policy, reference, value, reward) stay sharded as the rules say.

The update is one jitted function: a lax.scan over epochs x minibatches. Epoch e visits the rows
in the order permutation(fold_in(rng, e)); minibatch m of it takes rows [m * b, (m + 1) * b) of
that order. Each minibatch step computes

    loss = policy_loss + value_loss - entropy_coef * entropy + ptx_coef * ptx_nll

and updates the policy TrainState (gradients of every term but the value loss) and the value
TrainState (gradients of value_loss) with their own optimizers, then the policy EMA. The value loss
has no coefficient: with its own Adam, one would only rescale gradients that Adam normalizes;
ppo.value_learning_rate sets how fast the value model moves.
Stats come back per minibatch ([E * M] arrays); the trainer reduces them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from instruct_jax.config import PPOConfig
from instruct_jax.inference.logprobs import policy_outputs
from instruct_jax.inference.sampling import SampleOutput, SamplingConfig, make_sampler
from instruct_jax.model.heads import RewardModel
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.context import in_mesh_context, logical_constraint
from instruct_jax.parallel.sharding import logical_to_spec, replicated
from instruct_jax.rl.advantages import masked_mean
from instruct_jax.rl.ppo.losses import policy_loss, ptx_loss, value_loss
from instruct_jax.train.step import lm_loss_sum
from instruct_jax.rl.rewards import RewardFn
from instruct_jax.rl.rollout import Experience, make_experience, value_outputs
from instruct_jax.train.guards import GuardConfig, guard_decision, guarded_apply
from instruct_jax.train.state import TrainState

PTX_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@flax.struct.dataclass
class PPOState:
    """Everything PPO trains, as one pytree (the checkpoint's `state` item)."""

    policy: TrainState  # params, Adam state, optimizer step, base rng (iteration i uses fold_in(rng, i))
    value: TrainState  # value model {"trunk", "head"}: params, Adam state
    ema: Any  # EMA of the policy params ({} when ppo.ema_decay = 0)


def constrain_rows(x: jax.Array) -> jax.Array:
    """Pin a [B, ...] array's rows to the batch mesh axes (a gathered minibatch stays spread out)."""
    return logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def minibatch_order(rng: jax.Array, batch: int, epochs: int, minibatches: int) -> jax.Array:
    """Row indices [E * M, B / M]: epoch e's rows in the order permutation(fold_in(rng, e)), cut into M."""
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(rng, e), batch))(jnp.arange(epochs))
    return perms.reshape(epochs * minibatches, batch // minibatches)


def ppo_loss(policy_model: Transformer, value_model: RewardModel, hp: PPOConfig, policy_params, value_params,
             mb: Experience, ptx: dict | None):
    """(loss, stats) of one minibatch; grads w.r.t. (policy_params, value_params) give both updates."""
    t = mb.inputs.tokens.shape[1] - mb.response.shape[1]
    n = mb.response.shape[1]
    logprobs, entropy = policy_outputs(policy_model, policy_params, mb.inputs, mb.response, t, hp.temperature)
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, hp.clip_ratio)
    values = value_outputs(value_model, value_params, mb.inputs, t, n)
    vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.mask, hp.value_clip)
    entropy_mean = masked_mean(entropy, mb.mask)
    loss = pg_loss + vf_loss - hp.entropy_coef * entropy_mean  # vf_loss reaches the value params only
    stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "update_entropy": entropy_mean, **pg_stats, **vf_stats}
    if ptx is not None:
        ptx_nll = ptx_loss(*lm_loss_sum(policy_model, policy_params, ptx))
        loss = loss + hp.ptx_coef * ptx_nll
        stats["ptx_loss"] = ptx_nll
    stats["loss"] = loss
    return loss, stats


def ppo_update(policy_model: Transformer, value_model: RewardModel, policy_tx: optax.GradientTransformation,
               value_tx: optax.GradientTransformation, hp: PPOConfig, shardings: PPOState, rules,
               state: PPOState, exp: Experience, rng: jax.Array, ptx: dict | None = None,
               guard_cfg: GuardConfig = GuardConfig()):
    """Epochs x minibatches of PPO on one rollout batch; returns (state, per-minibatch stats [E * M]).

    Each minibatch goes through the numerical guard (train/guards.py): a non-finite loss or gradient
    leaves the policy, the value model and the EMA unchanged (stats["skipped"] = 1 for it)."""
    b = exp.mask.shape[0]
    steps = hp.epochs * hp.minibatches
    order = minibatch_order(rng, b, hp.epochs, hp.minibatches)  # [E * M, B / M]
    if ptx is not None:  # [E * M * P, T] -> [E * M, P, T]: one fresh pretraining slice per minibatch
        ptx = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
            x.reshape(steps, x.shape[0] // steps, *x.shape[1:]), logical_to_spec((None, "batch", "length"), rules)),
            ptx)
    grad_fn = jax.value_and_grad(
        lambda pp, vp, mb, x: ppo_loss(policy_model, value_model, hp, pp, vp, mb, x), argnums=(0, 1), has_aux=True)

    def one_minibatch(state: PPOState, xs):
        rows, ptx_mb = xs
        mb = jax.tree.map(lambda x: constrain_rows(jnp.take(x, rows, axis=0)), exp)  # [B / M, ...]
        (_, stats), (g_policy, g_value) = grad_fn(state.policy.params, state.value.params, mb, ptx_mb)
        g_policy = jax.lax.with_sharding_constraint(g_policy, shardings.policy.params)
        g_value = jax.lax.with_sharding_constraint(g_value, shardings.value.params)
        stats["policy_grad_norm"] = optax.tree.norm(g_policy)
        stats["value_grad_norm"] = optax.tree.norm(g_value)
        # One guard decision for both models (the loss is shared): a non-finite minibatch updates neither.
        apply, guard = guard_decision(state.policy.guard, stats["loss"],
                                      stats["policy_grad_norm"] + stats["value_grad_norm"], guard_cfg)
        stats["skipped"] = (~apply).astype(jnp.float32)

        def update():
            new = []
            for ts, grads, tx in ((state.policy, g_policy, policy_tx), (state.value, g_value, value_tx)):
                updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
                new.append((optax.apply_updates(ts.params, updates), opt_state))
            ema = ema_update(state.ema, new[0][0], hp.ema_decay) if hp.ema_decay > 0 else state.ema
            return new, ema

        keep = ([(state.policy.params, state.policy.opt_state), (state.value.params, state.value.opt_state)], state.ema)
        new, ema = guarded_apply(apply, update, keep)
        policy, value = (ts.replace(step=ts.step + 1, params=p, opt_state=o, guard=guard)
                         for ts, (p, o) in zip((state.policy, state.value), new))
        return PPOState(policy=policy, value=value, ema=ema), stats

    return jax.lax.scan(one_minibatch, state, (order, ptx))


# ----------------------------------------------------------------------------- jitted entry points
@dataclasses.dataclass
class PPOSteps:
    sample: Callable  # (policy_params, prompt ModelInput [B, T], rng) -> SampleOutput
    experience: Callable  # (policy, ref, value, reward params, prompt, sample, kl_coef) -> (Experience, stats)
    update: Callable  # (PPOState, Experience, rng[, ptx batch]) -> (PPOState, stats [E * M])


def make_ppo_steps(policy_model: Transformer, value_model: RewardModel, reward_fn: RewardFn, hp: PPOConfig,
                   sampling: SamplingConfig, eot_id: int, policy_tx, value_tx, mesh, rules,
                   shardings: PPOState, reward_shardings: Any, ptx: bool = False,
                   guard: GuardConfig = GuardConfig()) -> PPOSteps:
    """Jit the three pieces for this mesh; `shardings` is the PPOState sharding tree, `reward_shardings`
    the reward params' (any pytree of NamedShardings; {} for a parameter-free reward)."""
    sampling.require_exact()
    if sampling.temperature != hp.temperature:
        raise ValueError(f"sampling temperature {sampling.temperature} != ppo.temperature {hp.temperature}")
    rows_2d = NamedSharding(mesh, logical_to_spec(("batch", None), rules))
    rows = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    prompt_sh = ModelInput(rows_2d, rows_2d, rows_2d)
    sample_sh = SampleOutput(rows_2d, rows_2d, rows, rows)
    exp_sh = Experience.shardings(mesh, rules)
    pol, val = shardings.policy.params, shardings.value.params

    sampler = make_sampler(policy_model, sampling, mesh, rules, pol, weights=hp.rollout_weights)

    def experience(policy_params, ref_params, value_params, reward_params, prompt, sample, kl_coef):
        return make_experience(policy_model, value_model, reward_fn, hp, eot_id, policy_params, ref_params,
                               value_params, reward_params, prompt, sample, kl_coef)

    experience_jit = jax.jit(experience, in_shardings=(pol, pol, val, reward_shardings, prompt_sh, sample_sh,
                                                       replicated(mesh)),
                             out_shardings=(exp_sh, replicated(mesh)))

    def update(state, exp, rng, ptx_batch=None):
        return ppo_update(policy_model, value_model, policy_tx, value_tx, hp, shardings, rules, state, exp, rng,
                          ptx_batch, guard)

    in_sh = (shardings, exp_sh, replicated(mesh))
    if ptx:
        ptx_sh = {k: NamedSharding(mesh, logical_to_spec(("batch", "length"), rules)) for k in PTX_KEYS}
        update_jit = jax.jit(update, in_shardings=in_sh + (ptx_sh,), out_shardings=(shardings, replicated(mesh)),
                             donate_argnums=(0,))
        update_fn = in_mesh_context(update_jit, mesh, rules)

        def ptx_only(ptx_batch):
            return {k: ptx_batch[k] for k in PTX_KEYS}

        def update_with_ptx(state, exp, rng, ptx_batch):
            return update_fn(state, exp, rng, ptx_only(ptx_batch))

        # Ahead-of-time compiles (`plan`) lower the step like any jitted function.
        update_with_ptx.lower = lambda state, exp, rng, ptx_batch: update_fn.lower(state, exp, rng, ptx_only(ptx_batch))
        update_call = update_with_ptx
    else:
        update_call = in_mesh_context(jax.jit(lambda s, e, r: update(s, e, r), in_shardings=in_sh,
                                              out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,)),
                                      mesh, rules)
    return PPOSteps(sample=sampler.sample, experience=in_mesh_context(experience_jit, mesh, rules),
                    update=update_call)
