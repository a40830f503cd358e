"""The PPO phase (InstructGPT step 3), top to bottom: Mesh -> Model -> Shard -> Update -> Input -> Reward
-> the one loop (train/loop.py: Checkpoint -> Train -> Export).

    python -m instruct_jax ppo --experiment experiments/tiny_ppo.py --workdir runs/tiny-ppo

Per iteration i (rng_i = fold_in(policy rng, i), prompts = the prompt loader's batch i):

    sample     = steps.sample(policy, prompts, fold_in(rng_i, 0))           KV-cache rollout, in the mesh
    exp, stats = steps.experience(policy, reference, value, reward, ...)    one forward per model, rewards, GAE
    state, u   = steps.update(state, exp, fold_in(rng_i, 1)[, ptx batch i])  epochs x minibatches
    beta       = KL controller update with this rollout's KL                 (fixed, or Ziegler et al.'s)

Resumable bit for bit: the checkpoint's state holds both TrainStates (params, Adam, steps, base rng)
and the policy EMA; its meta holds the iteration, the KL controller's beta, and the prompt and ptx
loaders' steps. The reference and the reward model are frozen, so they are re-read from their
exports (or, for a fresh policy, re-initialised from the seed) rather than checkpointed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instruct_jax import files
from instruct_jax.checkpoint import export_params, load_params, resolve_params_dir
from instruct_jax.config import Config, save_config, validate
from instruct_jax.data.build import build_chat_template, build_tokenizer, load_data, load_stored_data, make_loader
from instruct_jax.data.chat import ChatTemplate
from instruct_jax.data.config import DataConfigError, validate_data_config
from instruct_jax.data.examples import encode_prompt
from instruct_jax.data.images import ImageLayout
from instruct_jax.data.loader import Loader
from instruct_jax.data.sources import local_files
from instruct_jax.data.stats import DataStats
from instruct_jax.data.synthetic_prefs import PROMPTS
from instruct_jax.data.tokenizer import Tokenizer, check_tokenizer_fits
from instruct_jax.errors import ConfigError
from instruct_jax.inference.sampling import WEIGHT_LAYOUTS, SamplingConfig
from instruct_jax.inference.scorer import fold_normalization, put_global
from instruct_jax.metrics import log
from instruct_jax.model.heads import RewardModel, init_reward_params_boxed
from instruct_jax.model.lora import base_is_reference, merged_for_export
from instruct_jax.model.transformer import Transformer, init_params_boxed
from instruct_jax.parallel.context import mesh_and_rules
from instruct_jax.parallel.mesh import batch_shards, make_mesh, resolve_mesh_shape
from instruct_jax.parallel.sharding import batch_sharding, param_shardings_for, unbox
from instruct_jax.train.optimizer import freeze_base
from instruct_jax.rl.ppo.optimizer import make_ppo_optimizer
from instruct_jax.rl.advantages import GROUP_ALGORITHMS, LOSS_AGGREGATIONS
from instruct_jax.rl.ppo.step import PPOState, PPOSteps, has_critic, make_ppo_steps, value_params_of
from instruct_jax.rl.rollout import prompt_input
from instruct_jax.rl.rewards import (KL_ESTIMATORS, MISSING_EOS_MODES, KLController, RewardFn, host_scores_reward,
                                     implicit_reward, reward_model_reward, token_count_reward)
from instruct_jax.train.guards import GuardConfig, guard_metrics
from instruct_jax.train.loop import Phase, run_phase
from instruct_jax.train.state import create_train_state, state_shardings_for

SAMPLES_FILE = "samples.jsonl"
REWARDS = ("model", "dpo", "count", "host")
ALGORITHMS = ("ppo",) + GROUP_ALGORITHMS  # ppo.algorithm
KL_PLACEMENTS = ("reward", "loss")  # ppo.kl_in
# A host reward: (prompt token ids, one array per row; decoded responses) -> scores [B]. Deterministic, so that
# every process of a multi-host run computes the same scores.
HostReward = Callable[[Sequence[np.ndarray], Sequence[str]], np.ndarray]


# ----------------------------------------------------------------------------- validation
def prompt_len(cfg: Config) -> int:
    """T: tokens per left-padded prompt, the one rule for PPO, the pipeline and evaluation: data.max_prompt_len,
    else the part of train.seq_len that the response (ppo.response_len) leaves."""
    return cfg.data.max_prompt_len or cfg.train.seq_len - cfg.ppo.response_len


def _is_hub_source(source: str) -> bool:
    try:
        return local_files(source) is None
    except FileNotFoundError:
        return False  # a missing local file: the data checks name it


def validate_ppo(cfg: Config, num_devices: Optional[int] = None) -> None:
    """The PPO phase's own checks (config.validate knows nothing about them); ConfigError names the field."""
    p = cfg.ppo
    for key, value, allowed in (("ppo.algorithm", p.algorithm, ALGORITHMS), ("ppo.kl_in", p.kl_in, KL_PLACEMENTS),
                                ("ppo.loss_aggregation", p.loss_aggregation, LOSS_AGGREGATIONS),
                                ("ppo.reward", p.reward, REWARDS), ("ppo.kl_estimator", p.kl_estimator, KL_ESTIMATORS),
                                ("ppo.missing_eos", p.missing_eos, MISSING_EOS_MODES),
                                ("ppo.rollout_weights", p.rollout_weights, WEIGHT_LAYOUTS)):
        if value not in allowed:
            raise ConfigError(key, f"expected one of {list(allowed)}, got {value!r}")
    validate_algorithm(cfg)
    if p.reward == "model" and not p.reward_model:
        raise ConfigError("ppo.reward_model", "empty; name the reward model's workdir (or set ppo.reward=count)")
    if p.reward == "dpo" and not p.reward_model:
        raise ConfigError("ppo.reward_model", "empty; ppo.reward='dpo' needs the DPO policy's workdir or export")
    if p.reward == "dpo" and not (p.implicit_reference or cfg.train.init_from):
        raise ConfigError("ppo.implicit_reference", "empty, and so is train.init_from: ppo.reward='dpo' needs the "
                          "DPO run's reference policy")
    if p.implicit_reference and p.reward != "dpo":
        raise ConfigError("ppo.implicit_reference", f"{p.implicit_reference!r} would be ignored: only "
                          f"ppo.reward='dpo' reads it, got ppo.reward={p.reward!r}")
    # A setting that another one makes inert is an error naming both, never silently ignored.
    if p.reward == "host" and p.reward_model:
        raise ConfigError("ppo.reward_model", f"{p.reward_model!r} would be ignored: ppo.reward='host' scores "
                          "responses with a Python function; clear one of the two")
    if p.reward == "count" and p.reward_model:
        raise ConfigError("ppo.reward_model", f"{p.reward_model!r} would be ignored: ppo.reward='count' scores "
                          "responses by a token count; clear one of the two")
    if p.synthetic_prompts and cfg.data.source:
        raise ConfigError("ppo.synthetic_prompts", f"{p.synthetic_prompts} generated prompts would replace "
                          f"data.source={cfg.data.source!r}; set one of the two (ppo.synthetic_prompts=0 reads data.source)")
    if p.ptx.source and not p.ptx_coef > 0:
        raise ConfigError("ppo.ptx.source", f"{p.ptx.source!r} would be ignored: PPO-ptx is off (ppo.ptx_coef="
                          f"{p.ptx_coef}); set ppo.ptx_coef > 0 or clear ppo.ptx.source")
    if p.ptx_coef > 0 and p.ptx.source and not p.ptx.max_rows and _is_hub_source(p.ptx.source):
        raise ConfigError("ppo.ptx.max_rows", f"the pretraining mix {p.ptx.source!r} is a Hub dataset with no row "
                          "cap: every host would read and tokenise all of it before the first step. Set "
                          "ppo.ptx.max_rows to what the run consumes (~ steps x ptx_batch_size x epochs x "
                          "minibatches sequences of train.seq_len tokens)")
    for name in ("response_len", "temperature", "epochs", "minibatches", "kl_target", "kl_horizon", "ptx_batch_size"):
        if getattr(p, name) <= 0:
            raise ConfigError(f"ppo.{name}", f"must be > 0, got {getattr(p, name)}")
    for name in ("kl_coef", "entropy_coef", "ptx_coef", "clip_ratio", "value_clip", "value_learning_rate",
                 "synthetic_prompts"):
        if getattr(p, name) < 0:
            raise ConfigError(f"ppo.{name}", f"must be >= 0, got {getattr(p, name)}")
    if cfg.train.loss_spike_factor:
        raise ConfigError("train.loss_spike_factor", "must be 0 for PPO: its loss (a surrogate objective near 0, "
                          "of either sign) has no scale to compare spikes against; non-finite steps are still skipped")
    if p.export_every < 0:
        raise ConfigError("ppo.export_every", f"must be >= 0, got {p.export_every}")
    if not 0 <= p.ema_decay < 1:
        raise ConfigError("ppo.ema_decay", f"must be in [0, 1), got {p.ema_decay}")
    if not (0 <= p.gamma <= 1 and 0 <= p.lam <= 1):
        raise ConfigError("ppo.gamma" if not 0 <= p.gamma <= 1 else "ppo.lam", "must be in [0, 1]")
    if prompt_len(cfg) <= 0:
        raise ConfigError("ppo.response_len", f"{p.response_len} leaves no room for the prompt in train.seq_len="
                          f"{cfg.train.seq_len}; set data.max_prompt_len or a shorter response")
    total = prompt_len(cfg) + p.response_len + 1  # + 1: the end-of-turn slot appended for scoring
    if total > cfg.model.max_seq_len:
        raise ConfigError("ppo.response_len", f"prompt {prompt_len(cfg)} + response {p.response_len} + 1 exceeds "
                          f"model.max_seq_len={cfg.model.max_seq_len}")
    b = cfg.train.global_batch_size
    if b % p.minibatches:
        raise ConfigError("ppo.minibatches", f"must divide train.global_batch_size={b}, got {p.minibatches}")
    if p.ptx_coef > 0:
        if p.ptx.format not in ("text", "sft"):
            raise ConfigError("ppo.ptx.format", f"PPO-ptx reads pretraining or SFT data (text | sft), got "
                              f"{p.ptx.format!r}")
        try:
            validate_data_config(p.ptx)
        except DataConfigError as e:
            raise ConfigError("ppo.ptx." + e.field.split(".", 1)[-1], str(e).split(": ", 1)[1]) from None
    if num_devices is not None:
        shards = batch_shards(resolve_mesh_shape(cfg.mesh, num_devices), cfg.mesh.logical_rules())
        if (b // p.group_size) % shards:
            raise ConfigError("ppo.group_size", f"the {b // p.group_size} prompts per rollout (train.global_batch_size="
                              f"{b} rows / {p.group_size} samples each) must divide over the {shards} batch shards")
        if (b // p.minibatches) % shards:
            raise ConfigError("ppo.minibatches", f"each minibatch ({b} / {p.minibatches} rows) must divide over the "
                              f"{shards} batch shards")
        if p.ptx_coef > 0 and p.ptx_batch_size % shards:
            raise ConfigError("ppo.ptx_batch_size",
                              f"must divide over the {shards} batch shards, got {p.ptx_batch_size}")


def validate_algorithm(cfg: Config) -> None:
    """ppo.algorithm's own rules: a group of k >= 2 samples per prompt for rloo / grpo, dividing the rollout; no
    setting that only a value model or the adaptive controller reads left on where it would be ignored."""
    p = cfg.ppo
    b = cfg.train.global_batch_size
    if p.group_size < 1:
        raise ConfigError("ppo.group_size", f"must be >= 1, got {p.group_size}")
    if b % p.group_size:
        raise ConfigError("ppo.group_size", f"must divide train.global_batch_size={b} (rows per rollout, "
                          f"{p.group_size} per prompt), got {p.group_size}")
    if p.kl_in == "loss" and p.adaptive_kl:
        raise ConfigError("ppo.adaptive_kl", "the adaptive controller moves the KL coefficient of the reward; with "
                          "ppo.kl_in='loss' the loss term uses a fixed ppo.kl_coef: clear one of the two")
    if p.algorithm in GROUP_ALGORITHMS:
        if p.group_size < 2:
            raise ConfigError("ppo.group_size", f"{p.algorithm} compares each response with the other samples of "
                              f"its prompt: needs >= 2, got {p.group_size}")
        for name, default in (("value_learning_rate", 0.0), ("whiten_rewards", False), ("value_clip", 0.2)):
            if getattr(p, name) != default:
                raise ConfigError(f"ppo.{name}", f"{getattr(p, name)!r} would be ignored: ppo.algorithm="
                                  f"{p.algorithm!r} has no value model and no GAE; leave it at {default!r}")
    elif not p.group_std_normalize:
        raise ConfigError("ppo.group_std_normalize", "only grpo normalises by its group's std; ppo.algorithm="
                          f"{p.algorithm!r} would ignore it")


# ----------------------------------------------------------------------------- setup
@dataclasses.dataclass
class PPOSetup:
    cfg: Config
    mesh: jax.sharding.Mesh
    rules: tuple
    policy_model: Transformer
    value_model: RewardModel
    policy_tx: optax.GradientTransformation
    value_tx: optax.GradientTransformation
    policy_init: Callable  # rng -> boxed policy params
    value_init: Callable  # rng -> boxed value params
    abstract_state: PPOState  # ShapeDtypeStructs with target shardings (for restore)
    shardings: PPOState
    sampling: SamplingConfig
    steps: PPOSteps

    def fresh_policy_params(self):
        """The params a fresh run's policy starts from without train.init_from (seeded as create_train_state)."""
        init_rng, _ = jax.random.split(jax.random.PRNGKey(self.cfg.seed))
        with mesh_and_rules(self.mesh, self.rules):
            return jax.jit(lambda: unbox(self.policy_init(init_rng)), out_shardings=self.shardings.policy.params)()

    def copy(self, tree, shardings):
        """A distinct copy of params (the update donates the policy; the reference must not alias it)."""
        with mesh_and_rules(self.mesh, self.rules):
            copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), in_shardings=(shardings,), out_shardings=shardings)
            return copy(tree)

    def init_state(self, policy_params, value_params) -> PPOState:
        cfg = self.cfg
        policy = create_train_state(self.policy_init, self.policy_tx, self.mesh, self.rules, cfg.seed,
                                    params=self.copy(policy_params, self.shardings.policy.params))
        value = {} if not has_critic(cfg.ppo) else create_train_state(
            self.value_init, self.value_tx, self.mesh, self.rules, cfg.seed,
            params=self.copy(value_params, self.shardings.value.params))
        ema = self.copy(policy_params, self.shardings.policy.params) if cfg.ppo.ema_decay > 0 else {}
        return PPOState(policy=policy, value=value, ema=ema)


def sampling_config(cfg: Config, stop_tokens: Sequence[int], pad_id: int) -> SamplingConfig:
    s = SamplingConfig(max_new_tokens=cfg.ppo.response_len, temperature=cfg.ppo.temperature,
                       stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))
    s.require_exact("PPO rollouts")
    return s


@dataclasses.dataclass
class PPOTrees:
    """PPO's models, their init functions and optimizers, and the abstract sharded state of the trained trees."""

    policy_model: Transformer
    value_model: RewardModel
    policy_init: Callable  # rng -> boxed policy params
    value_init: Callable  # rng -> boxed value params (the reward model's shape: one initialises the other)
    policy_tx: optax.GradientTransformation
    value_tx: optax.GradientTransformation
    abstract_state: PPOState  # ShapeDtypeStructs with target shardings
    shardings: PPOState


def ppo_trees(cfg: Config, mesh) -> PPOTrees:
    """Model and Shard for PPO, without allocating or compiling; `mesh` may be an AbstractMesh (tests size the
    trees on an experiment's full mesh with it)."""
    rules = cfg.mesh.logical_rules()
    # ---- Model: one model code; the value model is the reward model's trunk + scalar head
    policy_model, value_model = Transformer(cfg.model), RewardModel(cfg.model)
    policy_init = functools.partial(init_params_boxed, policy_model)
    value_init = functools.partial(init_reward_params_boxed, value_model)
    # ---- Shard
    p = cfg.ppo
    opt_steps = cfg.train.steps * p.epochs * p.minibatches
    policy_tx = freeze_base(make_ppo_optimizer(cfg.optim, opt_steps, p.tf_adam_eps), cfg.model)
    value_tx = freeze_base(make_ppo_optimizer(cfg.optim, opt_steps, p.tf_adam_eps,
                                                 learning_rate=p.value_learning_rate), cfg.model)
    abstract_policy, policy_sh = state_shardings_for(policy_init, policy_tx, mesh, rules)
    abstract_value, value_sh = state_shardings_for(value_init, value_tx, mesh, rules) if has_critic(p) else ({}, {})
    ema_on = p.ema_decay > 0
    abstract = PPOState(abstract_policy, abstract_value, abstract_policy.params if ema_on else {})
    shardings = PPOState(policy_sh, value_sh, policy_sh.params if ema_on else {})
    return PPOTrees(policy_model, value_model, policy_init, value_init, policy_tx, value_tx, abstract, shardings)


def build_ppo(cfg: Config, *, stop_tokens: Sequence[int], pad_id: int, eot_id: int, reward_fn: RewardFn,
              reward_shardings: Any = None, devices: Optional[Sequence] = None) -> PPOSetup:
    """Mesh, models, optimizers, shardings and the jitted steps. `reward_shardings`: the reward params'
    NamedShardings ({} / None for a parameter-free reward function)."""
    devices = list(devices if devices is not None else jax.devices())
    validate(cfg, num_devices=len(devices))
    validate_ppo(cfg, num_devices=len(devices))
    # ---- Mesh
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.logical_rules()
    # ---- Model, Shard
    t = ppo_trees(cfg, mesh)
    # ---- Update
    p = cfg.ppo
    sampling = sampling_config(cfg, stop_tokens, pad_id)
    steps = make_ppo_steps(t.policy_model, t.value_model, reward_fn, p, sampling, eot_id, t.policy_tx, t.value_tx,
                           mesh, rules, t.shardings, reward_shardings if reward_shardings is not None else {},
                           ptx=p.ptx_coef > 0, guard=GuardConfig.from_train(cfg.train))
    return PPOSetup(cfg, mesh, rules, t.policy_model, t.value_model, t.policy_tx, t.value_tx, t.policy_init,
                    t.value_init, t.abstract_state, t.shardings, sampling, steps)


# ----------------------------------------------------------------------------- reward
def count_token_id(cfg: Config, tokenizer: Tokenizer) -> int:
    if cfg.ppo.count_token >= 0:
        return cfg.ppo.count_token
    ids = tokenizer.encode(cfg.ppo.count_text)
    if len(ids) != 1:
        raise ConfigError("ppo.count_text", f"{cfg.ppo.count_text!r} encodes to {len(ids)} tokens {ids}; "
                          "pick text that is one token, or set ppo.count_token")
    return ids[0]


def load_reward(cfg: Config, tokenizer: Tokenizer, mesh, rules) -> tuple[RewardFn, Any, Any]:
    """(reward_fn, reward_params, their shardings): the reward model export, the toy token count, or the
    host's scores (reward_params then come per iteration: PPOPhase.host_scores)."""
    if cfg.ppo.reward == "count":
        return token_count_reward(count_token_id(cfg, tokenizer)), {}, {}
    if cfg.ppo.reward == "host":
        return host_scores_reward(), {}, {"scores": batch_sharding(mesh, rules, ndim=1)}
    if cfg.ppo.reward == "dpo":
        return load_implicit_reward(cfg, mesh, rules)
    from instruct_jax.inference.scorer import load_reward_model

    params, norm = load_reward_model(cfg.ppo.reward_model, cfg.model, mesh, rules)
    reward_params = {"params": params, "norm": norm}
    return reward_model_reward(cfg.model), reward_params, jax.tree.map(lambda x: x.sharding, reward_params)


def load_implicit_reward(cfg: Config, mesh, rules) -> tuple[RewardFn, Any, Any]:
    """ppo.reward = "dpo": the DPO export at ppo.reward_model and its reference (ppo.implicit_reference, else
    train.init_from, the policy's own start, which is the DPO run's when both started from one SFT export), read as
    plain models (no adapters), scored with dpo.beta, the beta the DPO run trained with."""
    model_cfg = dataclasses.replace(cfg.model, lora_rank=0)
    abstract, _ = param_shardings_for(functools.partial(init_params_boxed, Transformer(model_cfg)), mesh, rules)
    reference = cfg.ppo.implicit_reference or cfg.train.init_from
    params = {"policy": load_params(resolve_params_dir(cfg.ppo.reward_model), abstract),
              "reference": load_params(resolve_params_dir(reference), abstract)}
    log(f"reward: implicit reward {cfg.dpo.beta} * (log pi(y|x) - log pi_ref(y|x)) of the DPO policy "
        f"{cfg.ppo.reward_model} against {reference}")
    return implicit_reward(model_cfg, cfg.dpo.beta), params, jax.tree.map(lambda x: x.sharding, params)


# ----------------------------------------------------------------------------- input
def synthetic_prompt_messages(n: int, seed: int) -> list[list[dict]]:
    """n numbered one-turn prompts from the synthetic preference task's requests (data/synthetic_prefs.py)."""
    rng = np.random.default_rng([seed, 7])
    return [[{"role": "user", "content": f"{PROMPTS[int(rng.integers(len(PROMPTS)))]} (#{i})"}] for i in range(n)]


def build_prompt_loader(cfg: Config, tokenizer: Tokenizer, template: ChatTemplate) -> tuple[Loader, DataStats]:
    """Left-padded prompt batches [B / k, T] (+ lengths), k = ppo.group_size (each prompt is then sampled k times:
    PPOSteps.expand); batch i is a pure function of (seed, i)."""
    t = prompt_len(cfg)
    images = ImageLayout.of(cfg.model.vision)
    if images and (cfg.ppo.synthetic_prompts or cfg.data.store):
        raise ConfigError("ppo.synthetic_prompts" if cfg.ppo.synthetic_prompts else "data.store",
                          "a policy with images (model.vision) reads its prompts and their images from data.source "
                          "in memory: leave it empty")
    if cfg.ppo.synthetic_prompts:
        stats = DataStats(name="prompts")
        stats.rows = cfg.ppo.synthetic_prompts
        examples = [encode_prompt(m, template, t, "truncate", stats, f"synthetic:{i}")
                    for i, m in enumerate(synthetic_prompt_messages(cfg.ppo.synthetic_prompts, cfg.seed))]
        stats.kept = len(examples)
    else:
        if cfg.data.format != "prompt":
            raise ConfigError("data.format", f"PPO reads prompts (format 'prompt'), got {cfg.data.format!r}")
        if not cfg.data.source:
            raise ConfigError("data.source", "empty; name the prompts (or set ppo.synthetic_prompts)")
        if cfg.data.store:
            data = load_stored_data(cfg.data, tokenizer, template, seq_len=cfg.train.seq_len, seed=cfg.seed)
        else:
            data = load_data(cfg.data, tokenizer, template, seq_len=cfg.train.seq_len, seed=cfg.seed, images=images)
        examples, stats = data.train, data.train_stats
    loader = Loader(examples, cfg.train.global_batch_size // cfg.ppo.group_size, cfg.train.seq_len, cfg.seed, pad_id=tokenizer.pad_id,
                    packing=False, prompt_len=t, padding_side="left", prefetch=cfg.data.prefetch, images=images)
    return loader, stats


def build_ptx_loader(cfg: Config, tokenizer: Tokenizer) -> Optional[Loader]:
    """Pretraining / SFT batches for PPO-ptx: ptx_batch_size rows per optimizer step, so one loader step
    (= one PPO iteration) holds epochs x minibatches x ptx_batch_size rows."""
    p = cfg.ppo
    if p.ptx_coef <= 0:
        return None
    if not p.ptx.source:
        raise ConfigError("ppo.ptx.source", "empty; PPO-ptx (ppo.ptx_coef > 0) needs pretraining or SFT data")
    load = load_stored_data if p.ptx.store else load_data
    data = load(p.ptx, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.seed)
    return make_loader(data.train, p.ptx, tokenizer, global_batch_size=p.ptx_batch_size * p.epochs * p.minibatches,
                       seq_len=cfg.train.seq_len, seed=cfg.seed)


# ----------------------------------------------------------------------------- initial params
def initial_params(setup: PPOSetup, reward_params: Any) -> tuple[Any, Any]:
    """(policy params, value params) a fresh run starts from.

    Policy: train.init_from (the SFT export), else a seeded fresh init (toy runs). Value: the reward
    model's params (trunk + head) when there is one, with its normalization folded into the head, so
    that V at a response's end-of-turn token starts at the normalized score PPO's rewards use; else
    the policy's trunk with a fresh head.
    """
    cfg = setup.cfg
    if cfg.train.init_from:
        policy = load_params(resolve_params_dir(cfg.train.init_from), setup.abstract_state.policy.params, cfg.seed)
    else:
        policy = setup.fresh_policy_params()
    if not has_critic(cfg.ppo):
        return policy, None
    if cfg.ppo.reward == "model":
        rm = reward_params["params"]
        with mesh_and_rules(setup.mesh, setup.rules):  # the head alone: the trunk is not copied
            head = jax.jit(fold_normalization, out_shardings=setup.shardings.value.params["head"])(
                rm["head"], reward_params["norm"])
        value = {"trunk": rm["trunk"], "head": head}
    else:
        init_rng, _ = jax.random.split(jax.random.PRNGKey(cfg.seed))
        with mesh_and_rules(setup.mesh, setup.rules):
            head = jax.jit(lambda: unbox(setup.value_init(init_rng))["head"],
                           out_shardings=setup.shardings.value.params["head"])()
        value = {"trunk": {k: v for k, v in policy.items() if k != "lm_head"}, "head": head}
    return policy, value


def reference_params(setup: PPOSetup):
    """The frozen reference: the same params the policy started from (re-read on resume); with LoRA none ({}): the
    policy's own frozen base is the reference (rl/ppo/step.py), one copy of the weights."""
    cfg = setup.cfg
    if base_is_reference(cfg.model):
        return {}
    if cfg.train.init_from:
        return load_params(resolve_params_dir(cfg.train.init_from), setup.abstract_state.policy.params, cfg.seed)
    return setup.fresh_policy_params()


# ----------------------------------------------------------------------------- metrics
def reduce_update_stats(stats: dict) -> dict:
    """Per-minibatch update stats [E * M] -> one row: means, but max for max_ratio, and the first
    minibatch's approx_kl / clipfrac (0 by construction: pi == pi_old there) for checking."""
    out = {}
    for k, v in stats.items():
        v = np.asarray(v, np.float64)
        out[k] = float(v.max()) if k == "max_ratio" else float(v.mean())
    out["approx_kl_first"] = float(np.asarray(stats["approx_kl"])[0])
    return out


def host_rows(x: jax.Array, count: int) -> np.ndarray:
    """The first `count` rows of a batch-sharded global array, on every host (gathered when multi-host)."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))[:count]


def decoded_samples(tokenizer: Tokenizer, prompt: dict, exp, count: int) -> list[dict]:
    """The first `count` rows as text: prompt, response (up to its stop token) and score."""
    if count <= 0:
        return []
    tokens, segments = (host_rows(prompt[k], count) for k in ("tokens", "segment_ids"))
    response, lengths, scores = (host_rows(x, count) for x in (exp.response, exp.lengths, exp.scores))
    return [{"prompt": tokenizer.decode(tokens[i][segments[i] > 0]),
             "response": tokenizer.decode(response[i][:lengths[i]]),
             "length": int(lengths[i]), "score": float(scores[i])} for i in range(len(tokens))]


def truncate_samples(path: str, step: int) -> None:
    """Drop samples.jsonl rows with step > `step` (a resumed run writes them again)."""
    if jax.process_index() != 0 or not files.exists(path):
        return
    kept = []
    for line in files.read_text(path).splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    files.write_text(path, "".join(kept))


# ----------------------------------------------------------------------------- the phase
class PPOPhase(Phase):
    """PPO on the one loop (train/loop.py). One loop step is one iteration: rollout, experience, update, and
    the KL controller's next beta, which needs this rollout's KL on the host, so the guard's verdict is
    read synchronously. The checkpoint meta holds the KL controller and the loaders' steps."""

    name, unit, guard_in_flight = "ppo", "iteration", False

    def __init__(self, setup: PPOSetup, workdir: str, tokenizer: Tokenizer, prompts: Loader,
                 ptx_loader: Optional[Loader], prompt_stats: DataStats, reward_params: Any,
                 host_reward: Optional[HostReward] = None, score_sharding: Any = None):
        cfg = setup.cfg
        self.host_reward, self.score_sharding = host_reward, score_sharding
        self.setup, self.cfg, self.workdir, self.tokenizer = setup, cfg, workdir, tokenizer
        self.prompts, self.ptx_loader, self.prompt_stats = prompts, ptx_loader, prompt_stats
        self.reward_params, self.ref = reward_params, None
        self.kl_ctl = KLController(cfg.ppo.kl_coef, cfg.ppo.adaptive_kl, cfg.ppo.kl_target, cfg.ppo.kl_horizon)
        self.sharding = batch_sharding(setup.mesh, setup.rules)
        self.prompt_step = self.ptx_step = 0
        self.prompt_batches = self.ptx_batches = None

    def fresh_state(self):
        policy, value = initial_params(self.setup, self.reward_params)
        return self.setup.init_state(policy, value)

    def restore(self, state, meta: dict):
        self.kl_ctl.load_state_dict(meta["kl_controller"])
        self.prompt_step, self.ptx_step = int(meta["prompt_step"]), int(meta["ptx_step"])
        return state

    def restored_note(self) -> str:
        return f" (kl_coef {self.kl_ctl.kl_coef:.6g})"

    def meta(self, done: int) -> dict:
        return {"iteration": done, "kl_controller": self.kl_ctl.state_dict(), "prompt_step": done,
                "ptx_step": done if self.ptx_loader is not None else 0}

    def begin(self, start: int) -> None:
        self.ref = reference_params(self.setup)
        truncate_samples(os.path.join(self.workdir, SAMPLES_FILE), start)
        self.prompt_batches = self.prompts.iterate(self.prompt_step, self.sharding)
        if self.ptx_loader is not None:
            self.ptx_batches = self.ptx_loader.iterate(self.ptx_step, self.sharding)

    def step(self, state, index: int):
        steps = self.setup.steps
        rng = jax.random.fold_in(state.policy.rng, index)
        batch = steps.expand(next(self.prompt_batches))  # ppo.group_size samples of each prompt
        prompt = prompt_input(batch)
        sample = steps.sample(state.policy.params, prompt, jax.random.fold_in(rng, 0))
        beta = self.kl_ctl.kl_coef  # this rollout's coefficient; the controller then sets the next one
        reward_params = self.reward_params if self.host_reward is None else self.host_scores(batch, sample)
        exp, stats = steps.experience(state.policy.params, self.ref, value_params_of(state), reward_params, prompt,
                                      sample, np.float32(beta))
        args = (state, exp, jax.random.fold_in(rng, 1)) + ((next(self.ptx_batches),) if self.ptx_batches else ())
        state, update_stats = steps.update(*args)
        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
        stats.update({k: float(v) for k, v in jax.device_get(guard_metrics(state.policy.guard)).items()})
        self.kl_ctl.update(stats["kl"], self.cfg.train.global_batch_size)  # beta for the next rollout
        return state, {"stats": stats, "update_stats": update_stats, "beta": beta, "batch": batch, "exp": exp}

    def host_scores(self, batch: dict, sample) -> dict:
        """ppo.reward = "host": the rollout on the host (every process gathers all rows), scored by the caller's
        function, back on the devices as reward_params {"scores": [B]}."""
        b = self.cfg.train.global_batch_size
        tokens, segments = (host_rows(batch[k], b) for k in ("tokens", "segment_ids"))
        response, lengths = host_rows(sample.tokens, b), host_rows(sample.lengths, b)
        prompts = [tokens[i][segments[i] > 0] for i in range(b)]
        texts = [self.tokenizer.decode(response[i][:lengths[i]]) for i in range(b)]
        scores = np.asarray(self.host_reward(prompts, texts), np.float32)
        if scores.shape != (b,) or not np.all(np.isfinite(scores)):
            raise ValueError(f"the host reward returned {scores.shape} scores (finite: "
                             f"{bool(np.all(np.isfinite(scores)))}); expected {b} finite scores")
        return {"scores": put_global(scores, self.score_sharding)}

    def nonfinite(self, out) -> int:
        return int(out["stats"]["nonfinite_in_a_row"])

    def row(self, done: int, state, out, evaluate: bool) -> dict:
        row = {**out["stats"], **reduce_update_stats(jax.device_get(out["update_stats"])), "kl_coef": out["beta"],
               "kl_coef_next": self.kl_ctl.kl_coef}
        samples = decoded_samples(self.tokenizer, out["batch"], out["exp"], self.cfg.ppo.log_samples)
        if jax.process_index() == 0 and samples:
            files.append_text(os.path.join(self.workdir, SAMPLES_FILE),
                              "".join(json.dumps({"step": done, **s}) + "\n" for s in samples))
        return row

    def postfix(self, row: dict) -> dict:
        return {"score": f"{row['score']:.3f}", "kl": f"{row['kl']:.3f}"}

    def after_save(self, done: int, state) -> None:
        every = self.cfg.ppo.export_every
        if every and done % every == 0 and done != self.cfg.train.steps:
            # Snapshots for evaluating the policy along the way (rewritten identically on resume).
            export_params(os.path.join(self.workdir, "snapshots", str(done)),
                          merged_for_export(state.policy.params, self.cfg.model))

    def close(self) -> None:
        for batches in (self.prompt_batches, self.ptx_batches):
            if batches is not None:
                batches.close()

    def export(self, state) -> None:
        """The policy (an LM export, like SFT's), its EMA, the value model."""
        m = self.cfg.model
        export_params(os.path.join(self.workdir, "params"), merged_for_export(state.policy.params, m))
        if self.cfg.ppo.ema_decay > 0:
            export_params(os.path.join(self.workdir, "ema_params"), merged_for_export(state.ema, m))
        if has_critic(self.cfg.ppo):
            export_params(os.path.join(self.workdir, "value_params"), merged_for_export(state.value.params, m))

    def summary(self, result: dict) -> None:
        log(self.prompt_stats.report())
        if result:
            log(f"done: iteration {result['step']} score {result['score']:.4f} kl {result['kl']:.4f} "
                f"kl_coef {result['kl_coef']:.4g}")


def run_ppo(cfg: Config, workdir: str, host_reward: Optional[HostReward] = None) -> dict:
    """Train the policy with PPO; returns the last logged metrics row. `host_reward`: the scoring function of
    ppo.reward = "host" (the pipeline's oracle run passes the gold judge)."""
    validate(cfg)
    validate_ppo(cfg)
    if (cfg.ppo.reward == "host") != (host_reward is not None):
        raise ConfigError("ppo.reward", "'host' scores with a Python function passed to run_ppo (the pipeline's "
                          "oracle stage does); the ppo command has none: use 'model' or 'count'"
                          if host_reward is None else f"{cfg.ppo.reward!r} ignores the host reward function passed")
    save_config(cfg, workdir)

    # ---- Input (first: the tokenizer decides the stop set, pad and vocabulary)
    tokenizer = build_tokenizer(cfg.data, workdir)
    check_tokenizer_fits(tokenizer, cfg.model)
    template = build_chat_template(cfg.data, tokenizer, ImageLayout.of(cfg.model.vision))
    prompts, prompt_stats = build_prompt_loader(cfg, tokenizer, template)
    ptx_loader = build_ptx_loader(cfg, tokenizer)
    stop = tuple(sorted({tokenizer.eos_id, tokenizer.eot_id}))

    # ---- Mesh, Model, Shard, Update, Reward
    mesh = make_mesh(cfg.mesh, jax.devices())
    reward_fn, reward_params, reward_sh = load_reward(cfg, tokenizer, mesh, cfg.mesh.logical_rules())
    setup = build_ppo(cfg, stop_tokens=stop, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id, reward_fn=reward_fn,
                      reward_shardings=reward_sh)
    log(f"mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices; "
        f"{len(prompts.examples)} prompts, T = {prompt_len(cfg)}, N = {cfg.ppo.response_len}, reward {cfg.ppo.reward}")

    # ---- Checkpoint, Train, Export: the one loop
    phase = PPOPhase(setup, workdir, tokenizer, prompts, ptx_loader, prompt_stats, reward_params, host_reward,
                     reward_sh.get("scores"))
    return run_phase(phase, cfg, workdir, setup.abstract_state)
