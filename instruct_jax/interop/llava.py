"""LLaVA checkpoints in: a SigLIP vision tower, LLaVA's two-layer projector and a Llama-family decoder.

    params, cfg = import_hf("path/to/llava-siglip")  # config.json model_type "llava": hf.import_hf comes here

The checkpoint is what transformers' `LlavaForConditionalGeneration.save_pretrained` writes (config.json +
safetensors) with a `SiglipVisionConfig` tower. Its config.json maps onto ModelConfig as follows:

    text_config                     -> every decoder field, as hf_config.py maps a Llama / Mistral / Qwen2 config
    vision_config (siglip_vision_model): image_size, patch_size, num_channels -> channels, hidden_size -> d_model,
        num_hidden_layers -> num_layers, num_attention_heads -> num_heads, intermediate_size -> mlp_dim,
        layer_norm_eps -> norm_eps
    vision_feature_layer            -> vision.feature_layer (as a negative hidden-states index; -2 is LLaVA's)
    vision_feature_select_strategy  -> vision.feature_select ("default" drops the first token, "full" keeps all)
    image_token_index               -> vision.image_token_id;  projector "mlp" (linear_1, GELU, linear_2)

Worked example, LLaVA's defaults on a 2-block SigLIP tower over 16 px images in 4 px patches: 16 patches;
vision_feature_layer -2 is hidden_states[-2] of the 3 states (patch embeddings, block 1, block 2), so one block
runs and SigLIP's post_layernorm does not (transformers captures hidden states before it); "default" drops the
first patch: 15 image tokens per image, so a prompt holds 15 copies of the image token per image.

Why the numbers agree: SigLIP's attention scale is head_dim^-0.5 as ours; its MLP's gelu_pytorch_tanh is
jax.nn.gelu(approximate=True) and the projector's "gelu" the exact erf GELU of our `mlp` projector; its conv
patch embedding [D, C, p, p] read as [(row, col, channel), D] is our patch_embedding (vision.patchify's order);
it has one learned position embedding per patch and no class token. Anything else (a CLIP tower, with a class
token and a pre-LayerNorm; several feature layers concatenated; another activation) is an UnsupportedConfig
naming the key, never an approximation.

Tensor names: transformers 5 saves `language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`
and `multi_modal_projector.*`; transformers 4.5x saved `model.language_model.*`, `lm_head.weight`,
`model.vision_tower.vision_model.*` and `model.multi_modal_projector.*`, and the llava-hf hub checkpoints have
`vision_tower.vision_model.*`. All are read (`canonical_names`). Tensors LLaVA never uses (SigLIP's pooling head,
its post_layernorm, blocks past the feature layer) are skipped; any other unknown tensor is an error.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from instruct_jax.interop.hf_config import UnsupportedConfig, model_config_from_hf, read_hf_config, text_config_of
from instruct_jax.interop.layout import (PaddedVocab, TensorMap, check_source, check_unused, dim_sizes, expected_names,
                                         load_tree, target_params, tensor_maps)
from instruct_jax.interop.safetensors_io import SafetensorsCheckpoint
from instruct_jax.model.config import ModelConfig, VisionConfig
from instruct_jax.model.vision import validate_vision

SIGLIP = "siglip_vision_model"
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), both
# (stored prefix, canonical prefix), first match wins: every naming above -> one (see LlavaSource).
RENAMES = (
    ("model.language_model.", "model."), ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."), ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."), ("multi_modal_projector.", "multi_modal_projector."),
)
PATCH_CONV = "vision_tower.embeddings.patch_embedding.weight"  # [D, C, p, p], a Conv2d's kernel
PATCH_MATRIX = "vision_tower.embeddings.patch_embedding.matrix"  # derived: [D, (p p C)], patchify's order
PROJECTOR_BIASES = ("multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_2.bias")


# ----------------------------------------------------------------------------- config.json -> ModelConfig
def feature_layer_from_hf(hf: dict, num_layers: int, tie_last: bool = False) -> int:
    """VisionConfig.feature_layer for a `vision_feature_layer` index into the num_layers + 1 hidden states.

    tie_last: the tower's config sets tie_last_hidden_states, so its last hidden state is post-LayerNorm (then -1,
    or num_layers, is the native tower, 0). Worked example, 24 blocks: -2 and 23 -> -2; -1 -> -1; 0 -> error.
    """
    layer = hf.get("vision_feature_layer", -2)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise UnsupportedConfig("vision_feature_layer", f"one layer index is supported, got {layer!r} (several "
                                "layers' features concatenated are not)")
    states = num_layers + 1
    if not -states <= layer < states:
        raise UnsupportedConfig("vision_feature_layer", f"{layer} is outside the {states} hidden states")
    index = layer % states  # 0: the patch embeddings, i: block i's output
    if index == 0:
        raise UnsupportedConfig("vision_feature_layer", "the patch embeddings without any block are not supported")
    return 0 if index == num_layers and tie_last else index - states


def vision_config_from_hf(hf: dict, max_images: int = 1) -> VisionConfig:
    """VisionConfig computing what transformers' LLaVA computes from its tower and projector settings."""
    v = hf.get("vision_config") or {}
    if v.get("model_type") != SIGLIP:
        raise UnsupportedConfig("vision_config.model_type", f"only SigLIP towers ({SIGLIP!r}) are supported, got "
                                f"{v.get('model_type')!r} (a CLIP tower adds a class token and a pre-LayerNorm)")
    if v.get("hidden_act", "gelu_pytorch_tanh") not in TANH_GELUS:
        raise UnsupportedConfig("vision_config.hidden_act", f"expected one of {TANH_GELUS} (tanh GELU), got "
                                f"{v['hidden_act']!r}")
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedConfig("projector_hidden_act", f"only 'gelu' (exact, erf) is supported, got "
                                f"{hf['projector_hidden_act']!r}")
    select = hf.get("vision_feature_select_strategy", "default")
    if select not in ("default", "full"):
        raise UnsupportedConfig("vision_feature_select_strategy", f"expected 'default' or 'full', got {select!r}")
    layers = int(v.get("num_hidden_layers", 12))
    return VisionConfig(
        image_size=int(v.get("image_size", 224)), patch_size=int(v.get("patch_size", 16)),
        channels=int(v.get("num_channels", 3)), d_model=int(v.get("hidden_size", 768)), num_layers=layers,
        num_heads=int(v.get("num_attention_heads", 12)), mlp_dim=int(v.get("intermediate_size", 3072)),
        norm_eps=float(v.get("layer_norm_eps", 1e-6)), projector="mlp", max_images=max_images,
        image_token_id=int(hf.get("image_token_index", hf.get("image_token_id", 32000))),
        feature_layer=feature_layer_from_hf(hf, layers, bool(v.get("tie_last_hidden_states"))),
        feature_select=select)


def llava_model_config(hf: dict, vocab_size: Optional[int] = None, max_images: int = 1, **overrides) -> ModelConfig:
    """ModelConfig (decoder + `vision`) computing exactly what transformers computes for a LLaVA config.json.

    vocab_size, overrides: as model_config_from_hf; max_images: image slots per row (no params depend on it).
    A decoder setting we cannot reproduce is an UnsupportedConfig naming `text_config.<key>`.
    """
    vision = vision_config_from_hf(hf, max_images)
    text = dict(text_config_of(hf))
    if hf.get("tie_word_embeddings"):  # LlavaConfig's own flag ties the head too
        text["tie_word_embeddings"] = True
    try:
        cfg = model_config_from_hf(text, vocab_size, vision=vision, **overrides)
    except UnsupportedConfig as e:
        raise UnsupportedConfig(f"text_config.{e.key}", e.message) from None
    validate_vision(cfg)
    return cfg


# ----------------------------------------------------------------------------- tensors
def canonical_names(names) -> dict[str, str]:
    """{canonical name: stored name}: the decoder's under plain Llama names (what layout.tensor_maps reads), the
    tower's as `vision_tower.<SigLIP name>`, the projector's as `multi_modal_projector.<name>`; a name no rule
    matches stays itself (and is then reported as unused)."""
    out: dict[str, str] = {}
    for name in names:
        canonical = next((new + name[len(old):] for old, new in RENAMES if name.startswith(old)), name)
        if canonical in out:
            raise ValueError(f"checkpoint tensors {out[canonical]!r} and {name!r} are both {canonical!r}")
        out[canonical] = name
    return out


class LlavaSource:
    """A LLaVA checkpoint as a TensorSource under canonical names (`canonical_names`), plus derived tensors:
    PATCH_MATRIX, the conv kernel as the matrix our patch_embedding transposes, and zero projector biases for a
    checkpoint saved with multimodal_projector_bias false (adding zero is what a bias-free linear does)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, hf: dict):
        self.checkpoint = checkpoint
        self.stored = canonical_names(checkpoint.names())
        self.zero_biases = () if hf.get("multimodal_projector_bias", True) else PROJECTOR_BIASES
        self.text_width = int(text_config_of(hf)["hidden_size"])

    def names(self) -> list[str]:
        return sorted(self.stored)

    def __contains__(self, name: str) -> bool:
        return name in self.stored or (name == PATCH_MATRIX and PATCH_CONV in self.stored) or name in self.zero_biases

    def shape(self, name: str) -> tuple[int, ...]:
        if name == PATCH_MATRIX:
            d, c, p, q = self.checkpoint.shape(self.stored[PATCH_CONV])
            return d, p * q * c
        if name in self.zero_biases:
            return (self.text_width,)
        return self.checkpoint.shape(self.stored[name])

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        if name == PATCH_MATRIX:  # [D, C, p, p] -> [D, p, p, C] -> [D, (row, col, channel)]
            kernel = self.checkpoint.read(self.stored[PATCH_CONV])
            return np.ascontiguousarray(kernel.transpose(0, 2, 3, 1).reshape(kernel.shape[0], -1)[index])
        if name in self.zero_biases:
            return np.zeros(self.shape(name), np.float32)[index]
        return self.checkpoint.read(self.stored[name], index)


def vision_tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every leaf of the `vision` subtree (VisionTower) and its LLaVA tensor, in layout.py's letters plus:

        E tower width, A tower heads, B tower head dim, G tower MLP, P patches, X pixels per patch (p p C),
        D decoder d_model (projector output), Y d_model again (linear_2's output: its two dims need two letters),
        L the blocks that run (vision.depth)
    """
    layer = "vision_tower.encoder.layers.{i}."
    maps = [
        TensorMap(("patch_embedding",), PATCH_MATRIX, ("E", "X"), "XE"),
        TensorMap(("patch_bias",), "vision_tower.embeddings.patch_embedding.bias", ("E",), "E"),
        TensorMap(("position_embedding",), "vision_tower.embeddings.position_embedding.weight", ("P", "E"), "PE"),
        TensorMap(("layers", "attn_norm", "scale"), layer + "layer_norm1.weight", ("E",), "E"),
        TensorMap(("layers", "attn_norm", "bias"), layer + "layer_norm1.bias", ("E",), "E"),
    ]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        maps += [TensorMap(("layers", ours), f"{layer}self_attn.{theirs}.weight", ("AB", "E"), "EAB"),
                 TensorMap(("layers", ours + "_bias"), f"{layer}self_attn.{theirs}.bias", ("AB",), "AB")]
    maps += [
        TensorMap(("layers", "o"), layer + "self_attn.out_proj.weight", ("E", "AB"), "ABE"),
        TensorMap(("layers", "o_bias"), layer + "self_attn.out_proj.bias", ("E",), "E"),
        TensorMap(("layers", "mlp_norm", "scale"), layer + "layer_norm2.weight", ("E",), "E"),
        TensorMap(("layers", "mlp_norm", "bias"), layer + "layer_norm2.bias", ("E",), "E"),
        TensorMap(("layers", "fc1"), layer + "mlp.fc1.weight", ("G", "E"), "EG"),
        TensorMap(("layers", "fc1_bias"), layer + "mlp.fc1.bias", ("G",), "G"),
        TensorMap(("layers", "fc2"), layer + "mlp.fc2.weight", ("E", "G"), "GE"),
        TensorMap(("layers", "fc2_bias"), layer + "mlp.fc2.bias", ("E",), "E"),
        TensorMap(("projector_1",), "multi_modal_projector.linear_1.weight", ("D", "E"), "ED"),
        TensorMap(("projector_1_bias",), PROJECTOR_BIASES[0], ("D",), "D"),
        TensorMap(("projector_2",), "multi_modal_projector.linear_2.weight", ("Y", "D"), "DY"),
        TensorMap(("projector_2_bias",), PROJECTOR_BIASES[1], ("Y",), "Y"),
    ]
    if cfg.vision.feature_layer == 0:
        maps += [TensorMap(("post_norm", "scale"), "vision_tower.post_layernorm.weight", ("E",), "E"),
                 TensorMap(("post_norm", "bias"), "vision_tower.post_layernorm.bias", ("E",), "E")]
    return [TensorMap(("vision",) + m.path, m.hf_name, m.hf_dims, m.dims) for m in maps]


def vision_dim_sizes(cfg: ModelConfig) -> dict[str, int]:
    v = cfg.vision
    return {"E": v.d_model, "A": v.num_heads, "B": v.d_model // v.num_heads, "G": v.mlp_dim, "P": v.num_patches,
            "X": v.patch_size * v.patch_size * v.channels, "D": cfg.d_model, "Y": cfg.d_model, "L": v.depth}


def unused_by_llava(name: str, vision: VisionConfig) -> bool:
    """A tower tensor LLaVA never reads: SigLIP's attention-pooling head, its post_layernorm (hidden states are
    taken before it), and the blocks past the feature layer."""
    block = re.match(r"vision_tower\.encoder\.layers\.(\d+)\.", name)
    return (name.startswith("vision_tower.head.") or (block is not None and int(block.group(1)) >= vision.depth)
            or (name.startswith("vision_tower.post_layernorm.") and vision.feature_layer != 0))


def import_llava(path: str, mesh=None, rules=None, vocab_size: Optional[int] = None, max_images: int = 1,
                 **overrides) -> tuple[dict, ModelConfig]:
    """(params, ModelConfig) from a LLaVA folder (config.json + safetensors); arguments as hf.import_hf, plus
    max_images (vision.max_images: image slots per row)."""
    hf = read_hf_config(path)
    cfg = llava_model_config(hf, vocab_size, max_images, **overrides)
    source = LlavaSource(SafetensorsCheckpoint(path), hf)
    source_vocab = int(text_config_of(hf)["vocab_size"])
    text_maps, text_sizes = tensor_maps(cfg), dim_sizes(cfg)
    vision_maps, vision_sizes = vision_tensor_maps(cfg), vision_dim_sizes(cfg)
    check_source(source, text_maps, text_sizes, dim_sizes(cfg, source_vocab))
    check_source(source, vision_maps, vision_sizes, vision_sizes)
    expected = (expected_names(text_maps, text_sizes, cfg.tie_embeddings)
                | expected_names(vision_maps, vision_sizes) | {PATCH_CONV})
    check_unused([n for n in source.names() if not unused_by_llava(n, cfg.vision)], expected)
    shardings = None if mesh is None else target_params(cfg, mesh, rules)[1]
    text_source = PaddedVocab(source, cfg.vocab_size) if cfg.vocab_size > source_vocab else source
    params = load_tree(text_source, text_maps, text_sizes, shardings)
    params["vision"] = load_tree(source, vision_maps, vision_sizes, shardings)["vision"]
    return params, cfg
