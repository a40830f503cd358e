"""GGUF (llama.cpp) checkpoints in: de-quantized with the `gguf` package, un-permuted, sharded.

A GGUF file holds metadata (architecture, sizes, RoPE, the tokenizer and chat template) and
tensors named the llama.cpp way (`blk.3.attn_q.weight`), each row-major [out, in] like
PyTorch's and quantized in blocks along a row. `GGUFSource` presents them under their Hugging
Face names, so the same layout table (layout.py) places them on the mesh; a device's
callback de-quantizes only the rows of its own shard.

The q/k rows. llama.cpp's `llama` architecture rotates interleaved pairs (2j, 2j+1), so its
converter reorders each head's q and k rows from Hugging Face's rotate-half order (pair j =
rows j and j + H/2) into interleaved order. Per head of H rows:

    HF:   [x0, x1, ..., x(H/2-1), y0, y1, ..., y(H/2-1)]       pair j = (xj, yj)
    GGUF: [x0, y0, x1, y1, ...]

`unpermute_heads` undoes that, over the query heads for attn_q and over the KV heads for
attn_k; without it every rotation pairs the wrong dims and parity fails. Architectures that
llama.cpp runs with NeoX-style RoPE (qwen2) are stored unpermuted.

    params, cfg = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", mesh=mesh)
    gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf", "out/tokenizer")   # tokenizer.json + chat template
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import numpy as np

from instruct_jax.interop.hf import load_from_source
from instruct_jax.interop.hf_config import UnsupportedConfig, model_config_from_hf
from instruct_jax.model.config import ModelConfig

PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp LLM_ARCH_LLAMA: normal (interleaved) RoPE
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# Hugging Face name -> GGUF name (per layer, after "model.layers.{i}." / "blk.{i}.").
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)  # "model.layers.{i}.{rest}"
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def unpermute_heads(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF interleaved q/k rows [num_heads * H, ...] -> Hugging Face rotate-half rows (module docstring)."""
    h = rows.shape[0] // num_heads
    return rows.reshape(num_heads, h // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _hf_shape(tensor) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape))  # ggml lists ne[0] (the columns) first


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


class GGUFSource:
    """A GGUF file's tensors under Hugging Face names and shapes, de-quantized to float32 on read."""

    def __init__(self, reader, num_heads: int, num_kv_heads: int, architecture: str):
        import gguf

        self._gguf = gguf
        self.reader = reader
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.permuted = architecture in PERMUTED_ARCHITECTURES
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def __contains__(self, name: str) -> bool:
        return name in _GLOBAL_NAMES or name.startswith("model.layers.") and gguf_name(name) in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return _hf_shape(self.tensors[gguf_name(name)])

    def _rows(self, tensor, start: int, stop: int) -> np.ndarray:
        """De-quantized rows [start, stop) (quantization blocks run along a row, so rows split cleanly)."""
        out = self._gguf.dequantize(tensor.data[start:stop], tensor.tensor_type)
        return np.asarray(out, np.float32).reshape((stop - start,) + _hf_shape(tensor)[1:])

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        tensor = self.tensors[gguf_name(name)]
        shape = _hf_shape(tensor)
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = slice(*index[0].indices(shape[0])[:2])
        kind = tensor.name.split(".")[-2]  # "attn_q" in "blk.0.attn_q.weight"
        if self.permuted and kind in self.heads:
            # Un-permuting works per head: widen the rows to whole heads, then cut back.
            h = shape[0] // self.heads[kind]
            first, last = rows.start // h, -(-rows.stop // h)
            block = unpermute_heads(self._rows(tensor, first * h, last * h), last - first)
            block = block[rows.start - first * h:rows.stop - first * h]
        else:
            block = self._rows(tensor, rows.start, rows.stop)
        return block[(slice(None),) + index[1:]]


def _llama3_from_freq_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Llama 3.1 RoPE settings reproducing a GGUF's `rope_freqs.weight` (per-pair frequency divisors).

    llama.cpp stores the result of the llama3 formula, not its parameters. The factor is the
    largest divisor; low/high frequency factors and the original context are Meta's published
    values (1, 4, 8192), accepted only if they regenerate every stored divisor.
    """
    from instruct_jax.model.rope import rope_inv_freq

    base, _ = rope_inv_freq(head_dim, theta)
    settings = dict(rope_type="llama3", factor=float(factors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
    scaled, _ = rope_inv_freq(head_dim, theta, "llama3", settings["factor"], 8192, 1.0, 4.0)
    if not np.allclose(base / scaled, factors, rtol=1e-4):
        raise UnsupportedConfig("rope_freqs", "per-pair RoPE frequency factors that no llama3 setting reproduces")
    return settings


def open_gguf(path: str):
    """A gguf.GGUFReader (memory-maps the file; parsing the vocabulary takes a few seconds)."""
    import gguf

    return gguf.GGUFReader(path)


def gguf_hf_config(path_or_reader) -> dict:
    """The transformers config.json equivalent of a GGUF file's metadata (a path or an open reader)."""
    import gguf

    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedConfig("general.architecture",
                                f"expected one of {list(SUPPORTED_ARCHITECTURES)}, got {arch!r}")
    names = {t.name for t in reader.tensors}

    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(get("attention.key_length") or get("rope.dimension_count") or d_model // heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    hf = {
        "model_type": arch,
        "vocab_size": int(vocab or _hf_shape(next(t for t in reader.tensors if t.name == "token_embd.weight"))[0]),
        "hidden_size": d_model,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    if get("rope.dimension_count") not in (None, head_dim):
        raise UnsupportedConfig("rope.dimension_count", "partial rotary dimensions are not supported")
    scaling = get("rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        hf["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor"))}
        if scaling == "yarn":
            hf["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    elif scaling != "none":
        raise UnsupportedConfig("rope.scaling.type", f"unsupported RoPE scaling {scaling!r}")
    if "rope_freqs.weight" in names:
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        factors = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float64).reshape(-1)
        hf["rope_scaling"] = _llama3_from_freq_factors(factors, head_dim, hf["rope_theta"])
    return hf


def import_gguf(path: str, mesh=None, rules=None, vocab_size: Optional[int] = None,
                **overrides) -> tuple[dict, ModelConfig]:
    """(params, ModelConfig) from a GGUF file, de-quantized to float32 and placed on `mesh`.

    Arguments as hf.import_hf: rules default to config.DEFAULT_RULES, vocab_size >= the file's.
    """
    reader = open_gguf(path)
    hf = gguf_hf_config(reader)
    cfg = model_config_from_hf(hf, vocab_size, **overrides)
    source = GGUFSource(reader, cfg.num_heads, cfg.num_kv_heads, hf["model_type"])
    hf_names = {v: k for k, v in _GLOBAL_NAMES.items()}
    names = []
    for name in source.tensors:
        if name in hf_names:
            names.append(hf_names[name])
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            match = [k for k, v in _LAYER_NAMES.items() if v == rest]
            names.append(f"model.layers.{i}.{match[0]}" if match else name)
        elif name != "rope_freqs.weight":  # folded into the config above
            names.append(name)
    params = load_from_source(source, cfg, hf["vocab_size"], mesh, rules, extra_names=tuple(names))
    return params, cfg


def gguf_tokenizer(path: str, out: str) -> str:
    """Write the GGUF's tokenizer (tokenizer.json, tokenizer_config.json with its chat template) to `out`.

    The vocabulary, merges and pre-tokenizer go through transformers' GGUF converter to a Hugging
    Face `tokenizers` tokenizer, the same path `AutoTokenizer.from_pretrained(gguf_file=...)` takes,
    so token ids match transformers'. Returns `out`, which data.tokenizer can name.
    """
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is in requirements-test.txt
        raise ImportError("reading a GGUF tokenizer needs `transformers` (pip install transformers gguf)") from e
    from instruct_jax.interop.hf import export_tokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    staging = out + ".transformers"
    tok.save_pretrained(staging)
    export_tokenizer(staging, out)  # normalise to the layout every transformers version reads
    shutil.rmtree(staging)
    return out

