"""Model presets from 125M to PaLM-540B, each a published architecture with its published parameter count.

    preset       shape of                                      published parameters
    125m         MobileLLM-125M (Liu et al. 2024)              124.6M   (30 layers, d 576, GQA 9/3, tied)
    1b           Llama-3.2-1B                                  1.236B   (16 layers, d 2048, GQA 32/8, tied)
    8b           Llama-3-8B                                    8.030B   (32 layers, d 4096, GQA 32/8)
    palm-62b     PaLM 62B (Chowdhery et al. 2022, table 1)     62.50B   (64 layers, d 8192, 32 heads)
    palm-540b    PaLM 540B (same table)                        540.35B  (118 layers, d 18432, 48 heads)

Vision towers (`model.vision`, model/vision.py), set on a decoder preset with `vision_preset`:

    siglip-so400m-224   SigLIP So400m/14 (Alabdulmohsin et al. 2023) at 224 px, without its attention-pooling
                        head (as PaliGemma uses it): 27 layers, width 1152, 16 heads, MLP 4304, 14 px patches,
                        256 image tokens per image; 412.4M tower params + the projector into the decoder

PaLM presets use PaLM's block: attention and the SwiGLU MLP in parallel off one shared pre-norm,
multi-query attention (one key/value head of width 256), a 4 x d_model MLP, a 256k vocabulary
shared between input and output embeddings, RoPE, and no biases. (PaLM normalises with a
scale-only LayerNorm; this codebase's RMSNorm has the same parameters and costs the same.)

`param_count` counts a config's parameters from abstract shapes (jax.eval_shape), so a 540B
model is counted on a laptop without allocating a byte of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax

from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig, VisionConfig

_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_factor=8.0, rope_original_max_len=8192)

PRESETS: dict[str, ModelConfig] = {
    "125m": ModelConfig(vocab_size=32000, d_model=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                        mlp_dim=1536, max_seq_len=2048, tie_embeddings=True),
    "1b": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                      mlp_dim=8192, max_seq_len=8192, tie_embeddings=True, loss_chunk=64,
                      **{**_LLAMA3_ROPE, "rope_factor": 32.0}),
    "8b": ModelConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      mlp_dim=14336, max_seq_len=8192, **_LLAMA3_ROPE, loss_chunk=64),
    "palm-62b": ModelConfig(vocab_size=256000, d_model=8192, num_layers=64, num_heads=32, num_kv_heads=1,
                            head_dim=256, mlp_dim=4 * 8192, max_seq_len=2048, tie_embeddings=True,
                            parallel_block=True, norm_eps=1e-6, loss_chunk=64),
    "palm-540b": ModelConfig(vocab_size=256000, d_model=18432, num_layers=118, num_heads=48, num_kv_heads=1,
                             head_dim=256, mlp_dim=4 * 18432, max_seq_len=2048, tie_embeddings=True,
                             parallel_block=True, norm_eps=1e-6, loss_chunk=64),
}

# What the model's authors report (PaLM table 1; Llama 3 / 3.2 model cards; MobileLLM table 9).
PUBLISHED_PARAMS: dict[str, float] = {
    "125m": 124.6e6,
    "1b": 1.23581e9,
    "8b": 8.03e9,
    "palm-62b": 62.50e9,
    "palm-540b": 540.35e9,
}


VISION_PRESETS: dict[str, VisionConfig] = {
    "siglip-so400m-224": VisionConfig(image_size=224, patch_size=14, d_model=1152, num_layers=27, num_heads=16,
                                      mlp_dim=4304, norm_eps=1e-6, projector="mlp"),
}

# Llama 3's <|reserved_special_token_6|> (<|reserved_special_token_3|> in the Llama 3.1 / 3.2 tokenizers): a
# reserved id of the 128,256-row vocabulary that no text encodes to, so it can stand for an image token.
LLAMA3_IMAGE_TOKEN = 128011


def preset(name: str, **overrides) -> ModelConfig:
    """A fresh copy of preset `name` with fields overridden, e.g. preset("8b", dtype="bfloat16", remat="full")."""
    if name not in PRESETS:
        raise ConfigError("model", f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    try:
        return dataclasses.replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError("model", f"preset override: {e}") from None


def vision_preset(name: str, **overrides) -> VisionConfig:
    """A fresh copy of vision tower `name`, e.g. vision_preset("siglip-so400m-224", image_token_id=128011); set
    it as a decoder preset's `vision` (model/config.py): preset("8b", vision=vision_preset(...))."""
    if name not in VISION_PRESETS:
        raise ConfigError("model.vision", f"unknown vision preset {name!r}; presets are {sorted(VISION_PRESETS)}")
    try:
        return dataclasses.replace(VISION_PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError("model.vision", f"vision preset override: {e}") from None


def param_count(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` describes (its vision tower too, if any), from abstract shapes (nothing is
    allocated)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(_abstract_params(cfg)))


def _abstract_params(cfg: ModelConfig):
    from instruct_jax.model.transformer import Transformer  # local: presets stay importable without the model
    from instruct_jax.model.transformer import init_params_boxed
    from instruct_jax.parallel.sharding import unbox

    init = functools.partial(init_params_boxed, Transformer(cfg))
    return unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
