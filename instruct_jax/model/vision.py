"""Image inputs (issue 29, item 1): a SigLIP-style vision tower and a projector into the decoder's embeddings.

The PaliGemma / LLaVA recipe. An image [H, W, C] (already resized and normalised) is cut into P = (H / p)(W / p)
patches of p x p pixels; each patch is a linear embedding plus a learned position embedding (no class token); a
stack of pre-norm transformer blocks (LayerNorm, bidirectional multi-head attention, GELU MLP, all with biases)
and a final LayerNorm give P vectors of `vision.d_model`; the projector (`linear`, or LLaVA's two-layer `mlp`
with a GELU) maps them to the decoder's d_model: P image tokens per image.

A LLaVA checkpoint (interop/llava.py) feeds the projector an earlier block's output instead, without the final
LayerNorm (`vision.feature_layer` < 0: only the blocks up to it run), and may drop the first token
(`vision.feature_select` = "default"); `vision.tokens_per_image` is then P - 1.

Placement (`place_images`) is static-shaped: the chat template writes `vision.tokens_per_image` (P, or P - 1)
copies of `vision.image_token_id` per image; the k-th such token of a row takes the row's k-th image-token
embedding (images in slot order, slot j's tokens after slot j - 1's). A row with fewer images than `vision.max_images`
slots never reaches the unused slots' embeddings; the data path checks that placeholders and images agree
(tokens_per_image x images per row).

Every weight carries logical axes of the decoder's rules ("embed" for the tower's width, "heads" / "head_dim",
"mlp", "layers" for the scanned stack), so the tower shards with the same mesh rules as the decoder.
`vision.freeze` stops the gradient at the tower's output (the projector still trains).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from instruct_jax.model.attention.masks import reference_attention
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.model.layers import _param, constrain


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H / p) * (W / p), p * p * C]: patches in row-major order, each flattened (row, col,
    channel) — the order a [p, p, C, D] convolution kernel reshaped to [p * p * C, D] reads them."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), patch * patch * c)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", (d,), ("norm",), nn.initializers.ones)
        bias = _param(self, "bias", (d,), ("norm",), nn.initializers.zeros)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(self.dtype)


class VisionBlock(nn.Module):
    """x + attn(ln1(x)); then + mlp(ln2(.)). Bidirectional: every patch sees every patch of its image."""

    cfg: VisionConfig
    dtype: jnp.dtype
    init_std: float

    @nn.compact
    def __call__(self, x, _=None):
        c, dtype = self.cfg, self.dtype
        d, n, h = c.d_model, c.num_heads, c.d_model // c.num_heads
        init, zeros = nn.initializers.normal(self.init_std), nn.initializers.zeros
        y = LayerNorm(c.norm_eps, dtype, name="attn_norm")(x)
        qkv = []
        for name in ("q", "k", "v"):
            w = _param(self, name, (d, n, h), ("embed", "heads", "head_dim"), init)
            b = _param(self, name + "_bias", (n, h), ("heads", "head_dim"), zeros)
            qkv.append(jnp.einsum("BTD,DNH->BTNH", y, w.astype(dtype)) + b.astype(dtype))
        everywhere = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        attn = reference_attention(*qkv, everywhere)
        wo = _param(self, "o", (n, h, d), ("heads", "head_dim", "embed"), init)
        x = x + jnp.einsum("BTNH,NHD->BTD", attn, wo.astype(dtype)) + _param(
            self, "o_bias", (d,), ("norm",), zeros).astype(dtype)
        y = LayerNorm(c.norm_eps, dtype, name="mlp_norm")(x)
        w1 = _param(self, "fc1", (d, c.mlp_dim), ("embed", "mlp"), init)
        b1 = _param(self, "fc1_bias", (c.mlp_dim,), ("mlp",), zeros)
        w2 = _param(self, "fc2", (c.mlp_dim, d), ("mlp", "embed"), init)
        b2 = _param(self, "fc2_bias", (d,), ("norm",), zeros)
        hidden = jax.nn.gelu(jnp.einsum("BTD,DF->BTF", y, w1.astype(dtype)) + b1.astype(dtype), approximate=True)
        x = x + jnp.einsum("BTF,FD->BTD", hidden, w2.astype(dtype)) + b2.astype(dtype)
        return constrain(x, ("batch", None, "act_embed")), None


class VisionTower(nn.Module):
    """Images [N, H, W, C] -> image-token embeddings [N, vision.tokens_per_image, decoder d_model]: the encoder
    (its first `vision.depth` blocks), the feature selection, then the projector."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        v, dtype = self.cfg.vision, jnp.dtype(self.cfg.dtype)
        init, zeros = nn.initializers.normal(self.cfg.init_std), nn.initializers.zeros
        patches = patchify(images.astype(jnp.float32), v.patch_size).astype(dtype)
        w = _param(self, "patch_embedding", (patches.shape[-1], v.d_model), (None, "embed"), init)
        b = _param(self, "patch_bias", (v.d_model,), ("norm",), zeros)
        pos = _param(self, "position_embedding", (v.num_patches, v.d_model), (None, "embed"), init)
        x = jnp.einsum("NPC,CD->NPD", patches, w.astype(dtype)) + b.astype(dtype) + pos.astype(dtype)[None]
        blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=v.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(v, dtype, self.cfg.init_std, name="layers")(x, None)
        if v.feature_layer == 0:  # the native tower; an earlier layer's features (LLaVA) skip the final norm
            x = LayerNorm(v.norm_eps, dtype, name="post_norm")(x)
        if v.feature_select == "default":  # LLaVA drops the first token (CLIP's class token)
            x = x[:, 1:]
        if v.freeze:
            x = jax.lax.stop_gradient(x)
        d = self.cfg.d_model
        w1 = _param(self, "projector_1", (v.d_model, d), (None, "embed"), init)
        b1 = _param(self, "projector_1_bias", (d,), ("norm",), zeros)
        x = jnp.einsum("NPE,ED->NPD", x, w1.astype(dtype)) + b1.astype(dtype)
        if v.projector == "mlp":
            w2 = _param(self, "projector_2", (d, d), (None, "embed"), init)
            b2 = _param(self, "projector_2_bias", (d,), ("norm",), zeros)
            x = jnp.einsum("NPE,ED->NPD", jax.nn.gelu(x, approximate=False), w2.astype(dtype)) + b2.astype(dtype)
        return x


def place_images(x: jax.Array, tokens: jax.Array, image_embeds: jax.Array, image_token_id: int) -> jax.Array:
    """x [B, T, D] token embeddings with row b's k-th `image_token_id` token replaced by image_embeds[b, k]
    (image_embeds [B, M * P, D], slot-major). Static shapes: a gather and a select, no data-dependent sizes.

    Worked example, image token 9, P = 2, two slots: tokens [[5, 9, 9, 6, 9, 9]] -> positions 1, 2 take image
    tokens 0, 1 (slot 0), positions 4, 5 take 2, 3 (slot 1); positions 0 and 3 keep their text embeddings.
    """
    is_image = tokens == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, image_embeds.shape[1] - 1)  # [B, T]
    picked = jnp.take_along_axis(image_embeds, index[:, :, None], axis=1).astype(x.dtype)  # [B, T, D]
    return jnp.where(is_image[:, :, None], picked, x)


def validate_vision(cfg: ModelConfig) -> None:
    """Named errors for a vision section that cannot work (VisionConfig.enabled only)."""
    from instruct_jax.errors import ConfigError

    v = cfg.vision
    if not v.enabled:
        return
    for name in ("patch_size", "d_model", "num_heads", "num_layers", "mlp_dim", "max_images", "channels"):
        if getattr(v, name) < 1:
            raise ConfigError(f"model.vision.{name}", f"must be >= 1, got {getattr(v, name)}")
    if v.image_size % v.patch_size:
        raise ConfigError("model.vision.patch_size", f"must divide image_size={v.image_size}, got {v.patch_size}")
    if v.d_model % v.num_heads:
        raise ConfigError("model.vision.num_heads", f"must divide d_model={v.d_model}, got {v.num_heads}")
    if v.projector not in ("linear", "mlp"):
        raise ConfigError("model.vision.projector", f"expected 'linear' or 'mlp', got {v.projector!r}")
    if not -v.num_layers <= v.feature_layer <= 0:
        raise ConfigError("model.vision.feature_layer", f"expected 0 (every block, then the final norm) or an "
                          f"earlier block's output -k, 1 <= k <= num_layers={v.num_layers}, got {v.feature_layer}")
    if v.feature_select not in ("full", "default"):
        raise ConfigError("model.vision.feature_select", f"expected 'full' (every patch) or 'default' (drop the "
                          f"first), got {v.feature_select!r}")
    if v.tokens_per_image < 1:
        raise ConfigError("model.vision.feature_select", f"'default' drops the only patch of a "
                          f"{v.image_size}px image with patch_size={v.patch_size}")
    if not 0 <= v.image_token_id < cfg.vocab_size:
        raise ConfigError("model.vision.image_token_id", f"must be a token id below vocab_size={cfg.vocab_size}, "
                          f"got {v.image_token_id}")
