"""Scalar heads on the trunk's hidden states, and the reward model built from them.

The reward model is the same `Transformer` trunk as the policy (run with compute_logits=False)
plus one linear map D -> 1, read at the end-of-turn token that closes each response:

    hidden = Transformer(cfg)(inputs, compute_logits=False).hidden     # [B, T, D]
    reward = ScalarHead()(hidden[b, eos_index[b]])                     # [B]  float32

Parameters are one plain tree {"trunk": <the LM's params without lm_head>, "head": {"kernel", "bias"}},
so a trunk loads directly from an SFT or pretraining export.

The head's initialisation follows OpenAI's lm-human-preferences (`reward_head` in
lm_human_preferences/language/model.py): weight ~ N(0, 1 / (d_model + 1)), i.e. std
1/sqrt(d_model + 1), bias 0, so initial rewards are O(1) whatever the width.

Only logical axis names appear here; no mesh axis is named.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from instruct_jax.model.config import ModelConfig
from instruct_jax.model.layers import _param
from instruct_jax.model.transformer import ModelInput, Transformer, for_init


def head_init_std(d_model: int) -> float:
    """1/sqrt(d_model + 1): lm-human-preferences' reward head init scale."""
    return 1.0 / math.sqrt(d_model + 1)


class ScalarHead(nn.Module):
    """hidden [..., D] -> [...] float32: one scalar per position (reward, or later a value)."""

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        d = hidden.shape[-1]
        kernel = _param(self, "kernel", (d,), ("embed",), nn.initializers.normal(head_init_std(d)))
        bias = _param(self, "bias", (), (), nn.initializers.zeros)
        # float32 regardless of the compute dtype: reward differences of a few 1e-3 matter in the loss.
        return jnp.einsum("...D,D->...", hidden.astype(jnp.float32), kernel) + bias


def gather_positions(hidden: jax.Array, index: jax.Array) -> jax.Array:
    """hidden [B, T, D] at per-row positions: index [B] -> [B, D]; index [B, N] -> [B, N, D].

    Indices are clipped into [0, T - 1] (an empty ranking slot has length 0, so index -1; its
    score is garbage by design and masked by the loss). Worked example, T = 4:
        index [3, 1] -> [hidden[0, 3], hidden[1, 1]]
        index [[1, 3]] (two packed sequences ending at 1 and 3) -> [[hidden[0, 1], hidden[0, 3]]]
    """
    b, t, d = hidden.shape
    flat = jnp.clip(index.reshape(b, -1), 0, t - 1)  # [B, N]
    picked = jnp.take_along_axis(hidden, flat[:, :, None], axis=1)  # [B, N, D]
    return picked.reshape(index.shape + (d,))


class RewardModel(nn.Module):
    """Trunk + scalar head: (ModelInput [B, T], eos_index [B] or [B, N]) -> raw rewards [B] or [B, N].

    eos_index is where each sequence's final end-of-turn token sits: lengths - 1 for right-padded
    rows, T - 1 for left-padded rows, each segment's last position for packed rows. The mask
    comes from the input's positions and segment ids, so the reward of a sequence does not
    depend on how much padding surrounds it, on which side, or on what it is packed with.
    Normalization (gain, bias) is applied by the caller, inference/scorer.py's `reward_scores`, or folded
    into the head (`fold_normalization`: PPO's value model).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: ModelInput, eos_index: jax.Array) -> jax.Array:
        hidden = Transformer(self.cfg, name="trunk")(inputs, compute_logits=False).hidden  # [B, T, D]
        return ScalarHead(name="head")(gather_positions(hidden, eos_index))


def init_reward_params_boxed(model: RewardModel, rng, seq_len: int = 8):
    """Reward-model params with nn.Partitioned boxes (logical axes), for state.py's sharded init."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return for_init(model).init(rng, ModelInput.unpacked(tokens), jnp.zeros((1,), jnp.int32))["params"]
