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
from instruct_jax.model.lora import base_is_reference, base_only, freeze_base_grads
from instruct_jax.model.transformer import Transformer
from instruct_jax.parallel.context import in_mesh_context, logical_constraint
from instruct_jax.parallel.sharding import logical_to_spec, replicated
from instruct_jax.rl.advantages import GROUP_ALGORITHMS, masked_mean
from instruct_jax.rl.ppo.losses import kl_loss, policy_loss, ptx_loss, value_loss
from instruct_jax.train.step import lm_loss_sum
from instruct_jax.rl.rewards import RewardFn
from instruct_jax.rl.rollout import Experience, make_experience, prompt_shardings, value_outputs
from instruct_jax.train.guards import GuardConfig, guard_decision, guarded_apply
from instruct_jax.train.state import TrainState

PTX_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


@flax.struct.dataclass
class PPOState:
    """Everything PPO trains, as one pytree (the checkpoint's `state` item)."""

    policy: TrainState  # params, Adam state, optimizer step, base rng (iteration i uses fold_in(rng, i))
    value: Any  # value model {"trunk", "head"}: params, Adam state (a TrainState); {} for rloo / grpo
    ema: Any  # EMA of the policy params ({} when ppo.ema_decay = 0)


def has_critic(hp: PPOConfig) -> bool:
    """PPO trains a value model for GAE; rloo and grpo (a group baseline) have none: PPOState.value is {}."""
    return hp.algorithm not in GROUP_ALGORITHMS


def value_params_of(state: PPOState):
    """The value model's params, or {} for a critic-free algorithm."""
    return state.value.params if isinstance(state.value, TrainState) else {}


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
    pg_loss, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, hp.clip_ratio,
                                    hp.loss_aggregation)
    entropy_mean = masked_mean(entropy, mb.mask)
    loss = pg_loss - hp.entropy_coef * entropy_mean
    stats = {"policy_loss": pg_loss, "update_entropy": entropy_mean, **pg_stats}
    if has_critic(hp):
        values = value_outputs(value_model, value_params, mb.inputs, t, n)
        vf_loss, vf_stats = value_loss(values, mb.values, mb.returns, mb.mask, hp.value_clip)
        loss = loss + vf_loss  # vf_loss reaches the value params only
        stats.update({"value_loss": vf_loss, **vf_stats})
    if hp.kl_in == "loss":
        kl_term = kl_loss(logprobs, mb.ref_logprobs, mb.mask, hp.loss_aggregation)
        loss = loss + hp.kl_coef * kl_term
        stats["kl_loss"] = kl_term
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
    critic = has_critic(hp)
    grad_fn = jax.value_and_grad(
        lambda pp, vp, mb, x: ppo_loss(policy_model, value_model, hp, pp, vp, mb, x), argnums=(0, 1), has_aux=True)

    def one_minibatch(state: PPOState, xs):
        rows, ptx_mb = xs
        mb = jax.tree.map(lambda x: constrain_rows(jnp.take(x, rows, axis=0)), exp)  # [B / M, ...]
        (_, stats), (g_policy, g_value) = grad_fn(state.policy.params, value_params_of(state), mb, ptx_mb)
        g_policy = freeze_base_grads(g_policy, policy_model.cfg.lora_train)  # LoRA: adapters (+ head) only
        g_value = freeze_base_grads(g_value, value_model.cfg.lora_train)
        g_policy = jax.lax.with_sharding_constraint(g_policy, shardings.policy.params)
        stats["policy_grad_norm"] = optax.tree.norm(g_policy)
        trained = [(state.policy, g_policy, policy_tx)]
        grad_norm = stats["policy_grad_norm"]
        if critic:
            g_value = jax.lax.with_sharding_constraint(g_value, shardings.value.params)
            stats["value_grad_norm"] = optax.tree.norm(g_value)
            trained.append((state.value, g_value, value_tx))
            grad_norm = grad_norm + stats["value_grad_norm"]
        # One guard decision for both models (the loss is shared): a non-finite minibatch updates neither.
        apply, guard = guard_decision(state.policy.guard, stats["loss"], grad_norm, guard_cfg)
        stats["skipped"] = (~apply).astype(jnp.float32)

        def update():
            new = []
            for ts, grads, tx in trained:
                updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
                new.append((optax.apply_updates(ts.params, updates), opt_state))
            ema = ema_update(state.ema, new[0][0], hp.ema_decay) if hp.ema_decay > 0 else state.ema
            return new, ema

        keep = ([(ts.params, ts.opt_state) for ts, _, _ in trained], state.ema)
        new, ema = guarded_apply(apply, update, keep)
        updated = [ts.replace(step=ts.step + 1, params=p, opt_state=o, guard=guard)
                   for (ts, _, _), (p, o) in zip(trained, new)]
        return PPOState(policy=updated[0], value=updated[1] if critic else state.value, ema=ema), stats

    return jax.lax.scan(one_minibatch, state, (order, ptx))


# ----------------------------------------------------------------------------- jitted entry points
@dataclasses.dataclass
class PPOSteps:
    sample: Callable  # (policy_params, prompt ModelInput [B, T], rng) -> SampleOutput
    experience: Callable  # (policy, ref, value, reward params, prompt, sample, kl_coef) -> (Experience, stats)
    update: Callable  # (PPOState, Experience, rng[, ptx batch]) -> (PPOState, stats [E * M])
    expand: Callable  # prompt batch {key: [B / k, ...]} -> each row repeated k = ppo.group_size times [B, ...]


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
    images = policy_model.cfg.vision.enabled
    prefix = images and policy_model.cfg.vision.prefix_lm
    prompt_sh = prompt_shardings(mesh, rules, images, prefix)
    sample_sh = SampleOutput(rows_2d, rows_2d, rows, rows)
    exp_sh = Experience.shardings(mesh, rules, images, prefix)
    pol = shardings.policy.params
    val = shardings.value.params if has_critic(hp) else {}

    sampler = make_sampler(policy_model, sampling, mesh, rules, pol, weights=hp.rollout_weights)

    lora = base_is_reference(policy_model.cfg)  # the reference is the policy's frozen base: ref_params = {}

    def experience(policy_params, ref_params, value_params, reward_params, prompt, sample, kl_coef):
        ref_params = base_only(policy_params) if lora else ref_params
        return make_experience(policy_model, value_model, reward_fn, hp, eot_id, policy_params, ref_params,
                               value_params, reward_params, prompt, sample, kl_coef)

    experience_jit = jax.jit(experience, in_shardings=(pol, {} if lora else pol, val, reward_shardings, prompt_sh, sample_sh,
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
    k = hp.group_size
    expand = in_mesh_context(jax.jit(lambda batch: {key: constrain_rows(jnp.repeat(x, k, axis=0))
                                                    for key, x in batch.items()}), mesh, rules)
    return PPOSteps(sample=sampler.sample, experience=in_mesh_context(experience_jit, mesh, rules),
                    update=update_call, expand=expand if k > 1 else (lambda batch: batch))
