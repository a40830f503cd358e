"""Pretrained checkpoints in and out: Hugging Face safetensors and GGUF (docs/INTEROP.md).

    from instruct_jax.interop import import_hf, import_gguf, export_hf
    params, cfg = import_hf("Llama-3.2-1B/", mesh=mesh, rules=rules)     # sharded like training's params
    params, cfg = import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")         # de-quantized to float32
    export_hf("out/", params, cfg, tokenizer="runs/x/tokenizer")          # transformers loads out/

Families: Llama 2/3/3.1/3.2 (with their RoPE scaling), Mistral, Qwen2 (q/k/v biases),
SmolLM/SmolLM2; import_hf also reads LLaVA (a SigLIP tower, its projector and one of those
decoders: llava.py). `python -m instruct_jax interop import|export` wraps these for the command line.
"""

from instruct_jax.interop.gguf import gguf_hf_config, gguf_tokenizer, import_gguf
from instruct_jax.interop.hf import export_hf, export_tokenizer, import_hf
from instruct_jax.interop.hf_config import UnsupportedConfig, hf_config_from_model, model_config_from_hf

__all__ = ["import_hf", "import_gguf", "export_hf", "export_tokenizer", "gguf_tokenizer", "gguf_hf_config",
           "model_config_from_hf", "hf_config_from_model", "UnsupportedConfig"]
