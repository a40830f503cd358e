"""Decoder-only Llama-family transformer: embeddings -> scanned blocks -> norm -> logits.

One model code serves every role in the InstructGPT recipe: the policy, the frozen
reference, the value model and the reward model are separate parameter trees passed to
this module (heads on the final hidden states are added by the reward/value code).
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from instruct_jax.config import ModelConfig
from instruct_jax.model.layers import Block, RMSNorm, _param, constrain

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


@flax.struct.dataclass
class ModelInput:
    """Everything the trunk needs, as one struct. All [B, T] int32.

    tokens: token ids; positions: position of each token within its own sequence
    (restarting at 0 for every packed example, counting only real tokens under left
    padding); segment_ids: 1, 2, ... per packed example, 0 for padding.
    """

    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array

    @classmethod
    def from_batch(cls, batch) -> "ModelInput":
        return cls(batch["tokens"], batch["positions"], batch["segment_ids"])

    @classmethod
    def unpacked(cls, tokens, lengths=None) -> "ModelInput":
        """Right-padded rows (one example each) of the given lengths; all real if lengths is None."""
        t = tokens.shape[1]
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        valid = jnp.ones_like(tokens, bool) if lengths is None else idx < lengths[:, None]
        return cls(tokens, jnp.where(valid, idx, 0), valid.astype(jnp.int32))


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] float32, or None when not requested
    hidden: jax.Array  # [B, T, D] final (normed) hidden states in the compute dtype


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: ModelInput, compute_logits: bool = True) -> ModelOutput:
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        embedding = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           nn.initializers.normal(cfg.init_std))
        x = jnp.take(embedding, inputs.tokens, axis=0).astype(dtype)  # [B, T, D]
        x = constrain(x, ("batch", "length", "act_embed"))

        block = Block
        if cfg.remat != "none":
            # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        x, _ = blocks(x, inputs.positions, inputs.segment_ids)
        hidden = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)

        if not compute_logits:
            return ModelOutput(None, hidden)
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", hidden, embedding.astype(dtype), preferred_element_type=jnp.float32)
        else:
            head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(cfg.init_std))
            logits = jnp.einsum("BTD,DV->BTV", hidden, head.astype(dtype), preferred_element_type=jnp.float32)
        return ModelOutput(constrain(logits, ("batch", "length", "act_vocab")), hidden)
