"""GGUF import: the llama.cpp q/k row permutation, de-quantization, and logits parity with
transformers loading the same file (`from_pretrained(folder, gguf_file=...)`).

Each test writes a tiny GGUF the way llama.cpp's converter does (q/k rows permuted for the
`llama` architecture, not for `qwen2`), from a random Hugging Face model of test_interop_hf's
families, so the reference weights are known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch
import transformers
import gguf

from test_interop_hf import (FAMILIES, LOGIT_TOL, build_hf_model, hf_logits, jax_logits,  # noqa: E402,F401
                             mesh_and_rules, random_tokens)

from instruct_jax.interop import gguf_hf_config, import_gguf  # noqa: E402
from instruct_jax.interop.gguf import unpermute_heads  # noqa: E402

Q = gguf.GGMLQuantizationType


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (pairs (j, j + H/2) -> (2j, 2j + 1))."""
    h = rows.shape[0] // num_heads
    return rows.reshape(num_heads, 2, h // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def test_unpermute_inverts_llama_cpp_and_matches_transformers():
    rows = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)  # 3 heads of head_dim 8, 5 columns
    permuted = llama_cpp_permute(rows, 3)
    # Head 0's rows in GGUF order interleave the two halves: 0, 4, 1, 5, 2, 6, 3, 7.
    np.testing.assert_array_equal(permuted[:8, 0] // 5, [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(unpermute_heads(permuted, 3), rows)
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    theirs = LlamaTensorProcessor()._reverse_permute_weights(permuted, 6, 3)  # k: 6 query heads, 3 kv heads
    np.testing.assert_array_equal(unpermute_heads(permuted, 3), theirs)


def write_gguf(model, path: str, qtype=Q.F32) -> None:
    """Write `model` (a transformers Llama / Qwen2) as a GGUF file, as llama.cpp's converter would."""
    c = model.config
    arch = "qwen2" if c.model_type == "qwen2" else "llama"
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        array = p.float().numpy()
        parts = name.removeprefix("model.").split(".")
        if parts[0] == "layers":
            module, kind = ".".join(parts[2:-1]), parts[-1]
            gguf_name = f"blk.{parts[1]}.{names[module]}.{kind}"
        else:
            gguf_name = f"{names[parts[0]]}.{parts[-1]}"
        if arch == "llama" and ("attn_q." in gguf_name or "attn_k." in gguf_name):
            array = llama_cpp_permute(array, c.num_attention_heads if "attn_q." in gguf_name else c.num_key_value_heads)
        kind = qtype if array.ndim == 2 else Q.F32  # llama.cpp keeps norms and biases in float32
        w.add_tensor(gguf_name, gguf.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("family, qtype", [("llama3", Q.F32), ("smollm2", Q.Q4_1), ("qwen2", Q.Q8_0)],
                         ids=["llama3-f32", "smollm2-q4_1", "qwen2-q8_0"])
def test_gguf_import_matches_transformers(family, qtype, tmp_path, mesh_and_rules):
    mesh, rules = mesh_and_rules
    model = build_hf_model(FAMILIES[family])
    path = str(tmp_path / "model.gguf")
    write_gguf(model, path, qtype)
    assert gguf_hf_config(path)["tie_word_embeddings"] == FAMILIES[family]["tie_word_embeddings"]

    params, cfg = import_gguf(path, mesh=mesh, rules=rules)
    tokens = random_tokens(96, (2, 32))
    ours = jax_logits(params, cfg, tokens, mesh, rules)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf",
                                                                  dtype=torch.float32)
    diff = float(np.abs(ours - hf_logits(reference, tokens)).max())
    print(f"{family} GGUF {qtype.name}: max |logit diff| vs transformers on the same file = {diff:.2e}")
    assert diff < LOGIT_TOL
    if qtype == Q.F32:  # lossless storage: also the original model, so the un-permutation is ours, not copied
        assert np.abs(ours - hf_logits(model, tokens)).max() < LOGIT_TOL


def test_llama3_rope_frequency_factors_become_llama3_settings(tmp_path):
    """Llama 3.1 / 3.2 GGUFs carry `rope_freqs.weight` (the per-pair divisors) instead of settings."""
    from instruct_jax.model.rope import rope_inv_freq

    base, _ = rope_inv_freq(64, 500000.0)
    scaled, _ = rope_inv_freq(64, 500000.0, "llama3", 32.0, 8192, 1.0, 4.0)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, value in dict(block_count=1, context_length=131072, embedding_length=128, feed_forward_length=256,
                           head_count=2, head_count_kv=1, rope_dimension_count=64, vocab_size=32).items():
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(500000.0)
    w.add_tensor("rope_freqs.weight", (base / scaled).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    scaling = gguf_hf_config(str(tmp_path / "m.gguf"))["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}

