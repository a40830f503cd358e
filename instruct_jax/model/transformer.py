"""Decoder-only Llama-family transformer: embeddings -> scanned blocks -> norm -> logits.

One model code serves every role in the InstructGPT recipe: the policy, the frozen
reference, the value model and the reward model are separate parameter trees passed to
this module (heads on the final hidden states are added by the reward/value code).

Decoding passes a KVCache (kv_cache.py) and a write index: the new tokens' keys/values
are written into the cache, the queries attend over everything the cache holds, and the
updated cache comes back in ModelOutput.cache. Without a cache the call is the training
forward pass, and the parameter tree is the same either way.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from instruct_jax.model.config import ModelConfig
from instruct_jax.model.kv_cache import KVCache
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
    # [B, M, H, W, C] float32: M image slots per row (model.vision), placed at the image tokens; None: text only
    images: jax.Array | None = None
    # [B, T] int32: 1 where a token is in its example's bidirectional prefix (vision.prefix_lm: the image tokens
    # and the prompt), 0 elsewhere; None: causal everywhere
    prefix: jax.Array | None = None

    @classmethod
    def from_batch(cls, batch) -> "ModelInput":
        """A batch dict's tokens, positions, segment_ids and, when present, its images and prefix."""
        return cls(batch["tokens"], batch["positions"], batch["segment_ids"], batch.get("images"),
                   batch.get("prefix"))

    @classmethod
    def unpacked(cls, tokens, lengths=None) -> "ModelInput":
        """Right-padded rows (one example each) of the given lengths; all real if lengths is None."""
        t = tokens.shape[1]
        idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), tokens.shape)
        valid = jnp.ones_like(tokens, bool) if lengths is None else idx < lengths[:, None]
        return cls(tokens, jnp.where(valid, idx, 0), valid.astype(jnp.int32))

    @classmethod
    def left_padded(cls, tokens, lengths) -> "ModelInput":
        """Left-padded rows (one example each, its real tokens at the end) of the given lengths.

        Positions count real tokens only (cumsum(valid) - 1), so a prompt gets the same
        positions, and so the same logits, whatever padding precedes it:
            tokens = [[p, p, 7, 8, 9]], lengths = [3]
            -> positions [[0, 0, 0, 1, 2]], segment_ids [[0, 0, 1, 1, 1]]
        """
        t = tokens.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)[None, :]  # [1, T]
        valid = idx >= t - jnp.asarray(lengths, jnp.int32)[:, None]  # [B, T]
        positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
        return cls(jnp.asarray(tokens, jnp.int32), positions, valid.astype(jnp.int32))


def output_kernel(cfg: ModelConfig, params) -> jax.Array:
    """The output projection of `params` as [V, D] in the compute dtype: the tied embedding table,
    or lm_head transposed. logits = hidden @ output_kernel.T, for losses that project hidden states
    themselves (train/losses.py `fused_masked_loss_sum`)."""
    kernel = params["embedding"] if cfg.tie_embeddings else params["lm_head"].T
    return kernel.astype(jnp.dtype(cfg.dtype))


@flax.struct.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] float32 ([B, K, V] with logits_at [B, K]), or None when not requested
    hidden: jax.Array  # [B, T, D] final (normed) hidden states in the compute dtype
    cache: KVCache | None = None  # the updated cache when one was passed in


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs: ModelInput, compute_logits: bool = True, cache: KVCache | None = None,
                 write_index=None, logits_at=None) -> ModelOutput:
        """Forward pass over inputs [B, T].

        cache, write_index: decode with a KV cache; row b's T tokens go to cache slots
            write_index[b] .. write_index[b] + T - 1 (write_index [B] int32, or a scalar for
            every row) and attend to every visible slot. The caller keeps them in range.
        logits_at: [B] or [B, K] int32, compute logits only at these indices of each row
            ([B, 1, V] or [B, K, V]): prefill needs one row of logits, PPO's scoring and update
            the N response positions, not a [B, T, V] tensor (the vocabulary projection is the
            model's largest matmul, and its logits its largest activation).

        inputs.prefix (prefix-LM, attention/masks.py) is applied whenever it is given, whatever
        model.vision.prefix_lm says: that switch tells the data path to fill it. None: causal,
        and the same program as before prefixes existed. With a cache, a prefix must be
        prefilled in one call (kv_cache.py); decode steps pass none.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        embedding = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                           nn.initializers.normal(cfg.init_std))
        # Gather the FSDP-sharded table's model dimension before the lookup (as FSDP does for
        # every weight at use): a lookup from a table split on D would yield activations split
        # on D, which the partitioner can only turn into batch-split ones by replicating them.
        table = constrain(embedding, ("vocab", None))
        x = jnp.take(table, inputs.tokens, axis=0).astype(dtype)  # [B, T, D]
        if cfg.vision.enabled and (inputs.images is not None or self.is_initializing()):
            x = self.with_images(x, inputs)
        x = constrain(x, ("batch", "length", "act_embed"))

        block = Block
        if cfg.remat != "none":
            # prevent_cse=False is safe (and faster) inside scan, per the jax.checkpoint docs.
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            # positions, segment ids, cache slots, prefix: the same for every layer; kv: one layer's slice.
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        if cache is None or self.is_initializing():
            x, _ = blocks(x, inputs.positions, inputs.segment_ids, None, None, inputs.prefix)
        else:
            if write_index is None:
                raise ValueError("decoding with a cache needs write_index (the slot of each row's first token)")
            # Record the new tokens' positions / segments first: every layer's queries must see them.
            cache = cache.write_slots(inputs.positions, inputs.segment_ids, write_index)
            x, cache = self.cached_layers(x, inputs, cache, cache.slots(write_index, inputs.prefix))
        hidden = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(x)

        if not compute_logits:
            return ModelOutput(None, hidden, cache)
        picked = hidden
        if logits_at is not None:
            index = jnp.asarray(logits_at, jnp.int32)
            index = index.reshape(index.shape[0], -1)  # [B, K]; K = 1 for a [B] index
            picked = jnp.take_along_axis(hidden, index[:, :, None], axis=1)  # [B, K, D]
        if cfg.tie_embeddings:
            logits = jnp.einsum("BTD,VD->BTV", picked, embedding.astype(dtype), preferred_element_type=jnp.float32)
        else:
            head = _param(self, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                          nn.initializers.normal(cfg.init_std))
            logits = jnp.einsum("BTD,DV->BTV", picked, head.astype(dtype), preferred_element_type=jnp.float32)
        return ModelOutput(constrain(logits, ("batch", "length", "act_vocab")), hidden, cache)

    def with_images(self, x, inputs: ModelInput) -> jax.Array:
        """x with each row's image tokens replaced by its images' embeddings (model/vision.py). At init without
        images, the tower runs on one blank image so its params exist; x is returned unchanged."""
        from instruct_jax.model.vision import VisionTower, place_images

        v = self.cfg.vision
        tower = VisionTower(self.cfg, name="vision")
        if inputs.images is None:
            tower(jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32))
            return x
        b, m = inputs.images.shape[:2]
        embeds = tower(inputs.images.reshape((b * m,) + inputs.images.shape[2:]))  # [B * M, P, D]
        return place_images(x, inputs.tokens, embeds.reshape(b, m * v.tokens_per_image, -1), v.image_token_id)

    def cached_layers(self, x, inputs: ModelInput, cache: KVCache, slots) -> tuple[jax.Array, KVCache]:
        """The blocks one after another (unrolled, not scanned) over the KV cache: decoding's layer loop.

        The same Block and the same parameters as the scan: layer i runs with slice i of the stacked
        "layers" params, or with entry i when the caller passed them split (`split_layers`). Why not
        the scan: inside it, each layer's weights and cache are dynamic slices of the stacked arrays,
        and XLA's CPU backend copies every such slice before its matmul, so a decode step wrote a
        second copy of all weights and of the whole cache (27% of decode time at batch 8:
        docs/BENCHMARKS.md, docs/profile_generate_scan_before.json). Unrolled, with the weights split once per sampling call and the
        cache held per layer (`KVCache.per_layer`), each layer reads its own buffers in place and
        writes only the new tokens' keys / values.
        """
        layers = self.variables["params"]["layers"]
        keys, values = [], []
        for i in range(self.cfg.num_layers):
            params_i = layers[i] if isinstance(layers, (tuple, list)) else jax.tree.map(lambda p: p[i], layers)
            x, (k, v) = Block(self.cfg, parent=None).apply({"params": params_i}, x, inputs.positions,
                                                           inputs.segment_ids, (cache.k[i], cache.v[i]), slots,
                                                           inputs.prefix)
            keys.append(k)
            values.append(v)
        if cache.is_per_layer:
            return x, cache.replace(k=tuple(keys), v=tuple(values)).constrain()
        return x, cache.replace(k=jnp.stack(keys), v=jnp.stack(values)).constrain()


def split_layers(params) -> dict:
    """params with the stacked "layers" subtree ([L, ...] leaves) split into a tuple of L per-layer
    subtrees: separate buffers, which `Transformer.cached_layers` uses without slicing. One copy of
    the weights, made once per sampling call, outside the decode loop."""
    stacked = params["layers"]
    if isinstance(stacked, (tuple, list)):
        return params
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda p: p[i], stacked) for i in range(num_layers))}


def compute_dtype_weights(cfg: ModelConfig, params):
    """params with every weight but the norm scales cast to the compute dtype.

    The model casts each weight at use (`w.astype(dtype)`); on a bfloat16 model a decode loop would
    then read float32 weights, twice the bytes, every step. Cast once before the loop, those casts
    are no-ops and the logits are bit-identical: RMSNorm multiplies by its float32 `scale` in float32,
    so the scales are left alone.
    """
    dtype = jnp.dtype(cfg.dtype)

    def cast(path, p):
        is_scale = getattr(path[-1], "key", None) == "scale"
        return p if is_scale or not jnp.issubdtype(p.dtype, jnp.floating) else p.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, params)


def for_init(model: nn.Module) -> nn.Module:
    """The module to initialise params with: attention kernels hold no params, and the init call may run outside
    the mesh a vendor kernel needs (a TPU plan initialises on the CPU), so it traces the einsum reference."""
    return model.clone(cfg=dataclasses.replace(model.cfg, attention="reference"))


def init_params_boxed(model: nn.Module, rng, seq_len: int = 8):
    """Model params with nn.Partitioned boxes (logical axis metadata)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return for_init(model).init(rng, ModelInput.unpacked(tokens))["params"]
