"""A toy PPO task with no tokenizer, data or reward model: random prompts, score = count of one token.

Tests and docs/PPO.md's measurement use it to check that the whole pipeline learns: a fresh tiny
policy (vocabulary 64) emits the rewarded token about N / 64 times per response at first; PPO with
a KL penalty should raise that by a large margin within a few dozen iterations while the KL to the
(initial) reference stays finite.

    setup, state, ref = toy_setup(toy_config())
    history = run_toy(setup, state, ref, iterations=30)     # list of per-iteration stats dicts
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from instruct_jax.config import Config, OptimConfig, PPOConfig, TrainConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.rl.ppo.step import value_params_of
from instruct_jax.rl.ppo.trainer import PPOSetup, build_ppo, initial_params, reduce_update_stats
from instruct_jax.rl.rewards import token_count_reward

TOY_MODEL = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                        max_seq_len=64)
EOS, PAD, REWARDED = 2, 0, 7  # ids: stop token, padding (never a stop), the token the toy reward counts


def toy_config(mesh: Optional[MeshConfig] = None, steps: int = 30, batch: int = 16, **ppo) -> Config:
    """A Config for the toy task: 16 prompts of <= 8 tokens, 12-token responses, lr 1e-3 constant."""
    defaults = dict(reward="count", count_token=REWARDED, response_len=12, epochs=2, minibatches=2, kl_coef=0.05,
                    missing_eos="none")
    return Config(name="ppo-toy", model=TOY_MODEL, mesh=mesh or MeshConfig(data=2, fsdp=-1),
                  optim=OptimConfig(learning_rate=1e-3, warmup_steps=0, decay="constant", b2=0.999),
                  train=TrainConfig(steps=steps, global_batch_size=batch, seq_len=16),
                  ppo=PPOConfig(**{**defaults, **ppo}))


def random_prompts(batch: int, prompt_len: int = 8, vocab: int = 64, seed: int = 0) -> ModelInput:
    """Left-padded prompts [B, T] of random lengths 2..T over ids 3..vocab-1 (never EOS or PAD)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, prompt_len + 1, batch)
    tokens = np.where(np.arange(prompt_len)[None] >= prompt_len - lengths[:, None],
                      rng.integers(3, vocab, (batch, prompt_len)), PAD)
    return ModelInput.left_padded(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths))


def toy_setup(cfg: Config, devices: Optional[Sequence] = None):
    """(setup, initial PPOState, reference params) for the toy task on `devices` (default: all)."""
    reward = token_count_reward(cfg.ppo.count_token)
    setup = build_ppo(cfg, stop_tokens=(EOS,), pad_id=PAD, eot_id=EOS, reward_fn=reward,
                      reward_shardings={}, devices=devices)
    policy, value = initial_params(setup, {})
    state = setup.init_state(policy, value)
    return setup, state, setup.copy(policy, setup.shardings.policy.params)


def run_toy(setup: PPOSetup, state, ref, iterations: int, prompt: Optional[ModelInput] = None,
            kl_coef: Optional[float] = None) -> tuple[object, list[dict]]:
    """`iterations` PPO iterations on fixed prompts (the trainer's loop without data, checkpoints, logging);
    returns (final state, per-iteration rows of rollout + reduced update stats)."""
    cfg = setup.cfg
    k = cfg.ppo.group_size  # rloo / grpo: B / k prompts, each sampled k times
    prompt = prompt if prompt is not None else random_prompts(cfg.train.global_batch_size // k)
    prompt = ModelInput(**setup.steps.expand(dict(tokens=prompt.tokens, positions=prompt.positions,
                                                  segment_ids=prompt.segment_ids)))
    kl_coef = cfg.ppo.kl_coef if kl_coef is None else kl_coef
    history = []
    for it in range(iterations):
        rng = jax.random.fold_in(state.policy.rng, it)
        sample = setup.steps.sample(state.policy.params, prompt, jax.random.fold_in(rng, 0))
        exp, stats = setup.steps.experience(state.policy.params, ref, value_params_of(state), {}, prompt, sample,
                                            np.float32(kl_coef))
        state, update_stats = setup.steps.update(state, exp, jax.random.fold_in(rng, 1))
        history.append({**{k: float(v) for k, v in jax.device_get(stats).items()},
                        **reduce_update_stats(jax.device_get(update_stats))})
    return state, history


__all__ = ["EOS", "PAD", "REWARDED", "TOY_MODEL", "random_prompts", "run_toy", "toy_config", "toy_setup"]
