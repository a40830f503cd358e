"""Hugging Face `config.json` <-> ModelConfig, for the Llama family (Llama 2/3/3.1/3.2, Mistral,
Qwen2, SmolLM/SmolLM2).

The three architectures are one computation here: pre-norm blocks of RMSNorm, grouped-query
attention with rotate-half RoPE, SwiGLU; Qwen2 adds q/k/v biases. What differs is spelled in
the config and mapped field by field:

    hidden_size -> d_model, intermediate_size -> mlp_dim, num_hidden_layers -> num_layers,
    num_attention_heads -> num_heads, num_key_value_heads -> num_kv_heads,
    head_dim (or hidden_size / num_attention_heads) -> head_dim,
    max_position_embeddings -> max_seq_len, rms_norm_eps -> norm_eps,
    tie_word_embeddings -> tie_embeddings, model_type == "qwen2" -> qkv_bias,
    rope_theta + rope_scaling (transformers < 5) or rope_parameters (>= 5) -> rope_*.

Worked example (Llama 3.2 1B's config.json, abridged):

    {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 8,
     "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}, ...}
    -> ModelConfig(d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
                   rope_type="llama3", rope_factor=32.0, rope_original_max_len=8192, ...)

Anything this model can't reproduce exactly (dynamic NTK, an o_proj or MLP bias, a partial
rotary dimension, a non-SiLU activation) is an error naming the config key, never a silent
approximation. Mistral / Qwen2 sliding-window attention is the exception: a warning, because
logits are identical for sequences no longer than the window.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Optional

from instruct_jax.model.config import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2")
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SEQUENCE_CLASSIFIER = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                       "qwen2": "Qwen2ForSequenceClassification"}
# model_type aliases that are the llama computation under another name.
LLAMA_ALIASES = ("smollm", "smollm2")
DEFAULT_THETA = 10000.0  # transformers' default when a config omits rope_theta
REWARD_OFFSET_KEY = "instruct_jax_reward_offset"  # see hf.py: HF's score head has no bias
LLAVA = "LlavaForConditionalGeneration"  # a vision tower + projector around a decoder (interop/llava.py)


class UnsupportedConfig(ValueError):
    """The checkpoint uses a feature this model cannot reproduce exactly; names the config key."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"config.json '{key}': {message}")


def is_llava(hf: dict) -> bool:
    """A LLaVA config.json: its decoder is `text_config`, read by interop/llava.py."""
    return hf.get("model_type") == "llava" or LLAVA in (hf.get("architectures") or ())


def text_config_of(hf: dict) -> dict:
    """The decoder's config.json keys: the dict itself, or a LLaVA config's `text_config`."""
    return (hf.get("text_config") or {}) if is_llava(hf) else hf


def family_of(hf: dict) -> str:
    model_type = hf.get("model_type", "llama")
    if model_type in LLAMA_ALIASES:
        return "llama"
    if model_type not in FAMILIES:
        raise UnsupportedConfig("model_type", f"expected one of {list(FAMILIES)}, got {model_type!r}")
    return model_type


def _rope_from_hf(hf: dict) -> dict:
    """ModelConfig rope_* fields from either spelling of the RoPE settings."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedConfig("rope_parameters", "per-layer-type RoPE settings are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", DEFAULT_THETA)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfig("partial_rotary_factor", f"only full rotary dimensions are supported, got {partial}")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    out: dict[str, Any] = {"rope_theta": theta, "rope_type": "default"}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return {**out, "rope_type": "linear", "rope_factor": float(params["factor"])}
    if rope_type == "llama3":
        return {**out, "rope_type": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(params.get("high_freq_factor", 4.0)),
                "rope_original_max_len": int(params.get("original_max_position_embeddings", max_pos))}
    if rope_type == "yarn":
        original = int(params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
                       or max_pos)
        factor = params.get("factor")
        factor = float(factor) if factor is not None else max_pos / original
        if params.get("truncate", True) is False:
            raise UnsupportedConfig("rope_scaling.truncate", "YaRN without truncation is not supported")
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise UnsupportedConfig("rope_scaling.mscale", "DeepSeek-style YaRN mscale is not supported")
        attention = params.get("attention_factor")
        default_attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        if attention is not None and not math.isclose(float(attention), default_attention, rel_tol=1e-6):
            raise UnsupportedConfig("rope_scaling.attention_factor",
                                    f"only the default 0.1 ln(factor) + 1 = {default_attention:.6f} is supported "
                                    f"(ModelConfig has no attention_factor field), got {attention}")
        return {**out, "rope_type": "yarn", "rope_factor": factor, "rope_original_max_len": original,
                "rope_beta_fast": float(params.get("beta_fast") or 32.0),
                "rope_beta_slow": float(params.get("beta_slow") or 1.0)}
    if rope_type == "dynamic":
        raise UnsupportedConfig("rope_scaling.rope_type", "dynamic NTK recomputes frequencies per sequence length; "
                                "a fixed table cannot match it (see model/rope.py)")
    raise UnsupportedConfig("rope_scaling.rope_type", f"unsupported RoPE type {rope_type!r}")


def model_config_from_hf(hf: dict, vocab_size: Optional[int] = None, **overrides) -> ModelConfig:
    """ModelConfig computing exactly what transformers computes for this config.json dict.

    vocab_size: rows of the embedding table, >= the checkpoint's (room for a reserved pad token);
    overrides: any other ModelConfig field (dtype, remat, max_seq_len, ...).
    """
    family = family_of(hf)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedConfig("hidden_act", f"only SiLU (SwiGLU) MLPs are supported, got {act!r}")
    if hf.get("attention_bias"):
        raise UnsupportedConfig("attention_bias", "q/k/v/o biases (Llama attention_bias) are not supported; "
                                "this model has q/k/v biases only (Qwen2)")
    if hf.get("mlp_bias"):
        raise UnsupportedConfig("mlp_bias", "MLP biases are not supported")
    window = hf.get("sliding_window")
    uses_window = hf.get("use_sliding_window", family == "mistral")
    if window and uses_window and window < hf.get("max_position_embeddings", 0):
        warnings.warn(f"the checkpoint uses sliding-window attention (window {window}); this model attends to the "
                      f"whole context, which is identical for sequences of at most {window} tokens", stacklevel=2)
    heads = int(hf["num_attention_heads"])
    hf_vocab = int(hf["vocab_size"])
    if vocab_size is not None and vocab_size < hf_vocab:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the checkpoint's {hf_vocab}")
    fields = dict(
        vocab_size=vocab_size or hf_vocab,
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        **_rope_from_hf(hf),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _rope_to_hf(cfg: ModelConfig) -> Optional[dict]:
    if cfg.rope_type == "default":
        return None
    if cfg.rope_type == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor}
    if cfg.rope_type == "llama3":
        return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    if cfg.rope_type == "yarn":
        return {"rope_type": "yarn", "factor": cfg.rope_factor, "beta_fast": cfg.rope_beta_fast,
                "beta_slow": cfg.rope_beta_slow, "original_max_position_embeddings": cfg.rope_original_max_len}
    raise UnsupportedConfig("rope_scaling", f"transformers has no fixed-table equivalent of rope_type "
                            f"{cfg.rope_type!r} (model/rope.py explains 'ntk' vs 'dynamic')")


def hf_config_from_model(cfg: ModelConfig, family: Optional[str] = None, *, vocab_size: Optional[int] = None,
                         reward: bool = False, bos_token_id: Optional[int] = None,
                         eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                         dtype: str = "float32") -> dict:
    """A config.json dict that makes transformers compute what ModelConfig computes.

    family: "llama" | "mistral" | "qwen2"; default qwen2 when the model has q/k/v biases, else llama.
    reward: a sequence classifier with one label (the reward model's scalar head) instead of an LM.
    RoPE settings use the `rope_theta` + `rope_scaling` spelling, which transformers 4 and 5 both read.
    """
    family = family or ("qwen2" if cfg.qkv_bias else "llama")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if cfg.qkv_bias and family != "qwen2":
        raise ValueError(f"q/k/v biases exist only in the qwen2 family, not {family!r}")
    if not cfg.qkv_bias and family == "qwen2":
        raise ValueError("the qwen2 family always has q/k/v biases; this model has none (use llama)")
    hf = {
        "architectures": [(SEQUENCE_CLASSIFIER if reward else CAUSAL_LM)[family]],
        "model_type": family,
        "vocab_size": vocab_size or cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "dtype": dtype,  # transformers >= 4.56 spelling (torch_dtype before)
    }
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        hf.update(sliding_window=None, use_sliding_window=False)
    if reward:
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def read_hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)
