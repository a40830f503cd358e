"""Hugging Face checkpoints in and out: safetensors + config.json + tokenizer files.

    params, cfg = import_hf("path/to/Llama-3.2-1B", mesh=mesh, rules=rules)   # sharded as training wants
    export_hf("out/", params, cfg, tokenizer="path/to/tokenizer_folder")      # transformers.from_pretrained("out/")

Import places every parameter on the target mesh shard by shard (layout.py); export writes
float32 (or bfloat16) safetensors, sharded above 5 GB, one layer on the host at a time.

A reward model ({"trunk": ..., "head": {"kernel", "bias"}}, train/rm/trainer.py) exports as
`<Family>ForSequenceClassification` with one label. transformers' score head is a bias-free
linear map read at the last non-pad token, so the head's kernel is written pre-multiplied by
the normalization gain, and the constant (gain * head bias + normalization bias) goes into
config.json as `instruct_jax_reward_offset`: our normalized reward = HF logit + that offset.
Differences between responses, all the reward model is trained on, need no offset.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import jax

from instruct_jax.interop.hf_config import (REWARD_OFFSET_KEY, hf_config_from_model, is_llava, model_config_from_hf,
                                           read_hf_config)
from instruct_jax.interop.layout import (PaddedVocab, TensorSource, check_source, check_unused, dim_sizes,
                                         expected_names, hf_entries, hf_shape, hf_tensor, load_tree, target_params,
                                         tensor_maps, to_host)
from instruct_jax.interop.safetensors_io import DTYPES, SafetensorsCheckpoint, write_checkpoint
from instruct_jax.model.config import ModelConfig

# Tensors some checkpoints carry that hold no parameters of ours (old Llama conversions saved the RoPE table).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "generation_config.json")
RESERVED_PAD_TEXT = "<|instruct_jax_pad|>"


def load_from_source(source: TensorSource, cfg: ModelConfig, source_vocab: int, mesh=None, rules=None,
                     reward: bool = False, extra_names: tuple = ()) -> dict:
    """Params from any HF-named source onto `mesh` (None: one default device). Rows past
    source_vocab (cfg.vocab_size larger) are filled as PaddedVocab explains. extra_names: the
    source's tensor names, checked for tensors we would silently drop."""
    maps = tensor_maps(cfg, reward)
    sizes = dim_sizes(cfg)
    check_source(source, maps, sizes, dim_sizes(cfg, source_vocab))
    check_unused(extra_names, expected_names(maps, sizes, cfg.tie_embeddings))
    if cfg.vocab_size > source_vocab:
        source = PaddedVocab(source, cfg.vocab_size)
    shardings = None if mesh is None else target_params(cfg, mesh, rules, reward)[1]
    return load_tree(source, maps, sizes, shardings)


def import_hf(path: str, mesh=None, rules=None, vocab_size: Optional[int] = None,
              **overrides) -> tuple[dict, ModelConfig]:
    """(params, ModelConfig) from a Hugging Face folder (config.json + safetensors).

    mesh, rules: place each parameter as training would (rules default to config.DEFAULT_RULES);
    vocab_size: embedding rows, >= the checkpoint's (see PaddedVocab); overrides: ModelConfig fields.
    A LLaVA folder (config.json model_type "llava") goes to interop/llava.py, which also takes max_images.
    """
    hf = read_hf_config(path)
    if is_llava(hf):
        from instruct_jax.interop.llava import import_llava  # llava.py never imports this module

        return import_llava(path, mesh, rules, vocab_size, **overrides)
    cfg = model_config_from_hf(hf, vocab_size, **overrides)
    source = SafetensorsCheckpoint(path)
    return load_from_source(source, cfg, int(hf["vocab_size"]), mesh, rules, extra_names=tuple(source.names())), cfg


# ----------------------------------------------------------------------------- export
def _tokenizer_ids(tokenizer, rows: int) -> dict:
    """bos / eos / pad ids for config.json; the reserved pad only when its row is exported."""
    if tokenizer is None:
        return {}
    pad = tokenizer.pad_id if tokenizer.pad_id < rows else None
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": pad}


def export_tokenizer(tokenizer_path: str, out: str, rows: Optional[int] = None) -> None:
    """Copy a tokenizer (tokenizer.json or a folder holding it) into `out` in transformers' layout.

    tokenizer_config.json gets the class every transformers version reads
    (PreTrainedTokenizerFast), the special tokens our loader resolved and the chat template.
    A reserved pad id (data/tokenizer.py) becomes an added special token when its embedding
    row is exported (id < rows), so HF padding uses the same id our training did.
    """
    from instruct_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    os.makedirs(out, exist_ok=True)
    config = {}
    if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            config = json.load(f)
    config.pop("added_tokens_decoder", None)  # transformers rebuilds it from tokenizer.json
    if getattr(tok, "path", "").endswith(".model"):
        import sentencepiece.sentencepiece_model_pb2 as spm_pb2

        shutil.copyfile(tok.path, os.path.join(out, "tokenizer.model"))
        config.setdefault("tokenizer_class", "LlamaTokenizer")
        # transformers' LlamaTokenizer prepends "▁" to every text unless told otherwise; the models trained here
        # have no dummy prefix (data/tokenizer.py), so without this key its ids differ from ours by a first token.
        proto = spm_pb2.ModelProto()
        with open(tok.path, "rb") as f:
            proto.ParseFromString(f.read())
        config["add_prefix_space"] = bool(proto.normalizer_spec.add_dummy_prefix)
    else:
        import tokenizers

        backend = tokenizers.Tokenizer.from_file(tok.path)
        if tok.pad_is_reserved and rows is not None and tok.pad_id < rows:
            backend.add_special_tokens([tokenizers.AddedToken(RESERVED_PAD_TEXT, special=True)])
            if backend.token_to_id(RESERVED_PAD_TEXT) != tok.pad_id:
                raise ValueError(f"could not give the reserved pad id {tok.pad_id} a token in tokenizer.json")
            config["pad_token"] = RESERVED_PAD_TEXT
        backend.save(os.path.join(out, "tokenizer.json"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for name, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        text = tok.token_text(token_id) if token_id is not None else None
        if text is not None:
            config[f"{name}_token"] = text
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    for key in ("backend", "is_local", "local_files_only"):  # transformers-5 bookkeeping, not settings
        config.pop(key, None)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    special = {f"{k}_token": config[f"{k}_token"] for k in ("bos", "eos", "pad", "unk") if f"{k}_token" in config}
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)


def export_hf(out: str, params: dict, cfg: ModelConfig, tokenizer: Optional[str] = None, *,
              family: Optional[str] = None, vocab_size: Optional[int] = None, dtype: str = "float32",
              reward_norm: Optional[dict] = None, pad_token_id: Optional[int] = None,
              max_shard_bytes: int = 5 << 30) -> dict:
    """Write `out/` so that transformers' from_pretrained loads it; returns the config.json dict.

    params: our LM params, or a reward model's {"trunk", "head"} (then reward_norm {"gain", "bias"}
    is folded in, see the module docstring). tokenizer: a tokenizer.json / folder to ship beside
    it. vocab_size: embedding rows to write (default all; fewer drops trailing rows such as a
    reserved pad). dtype: float32 | bfloat16 | float16 for the safetensors. pad_token_id:
    overrides the tokenizer's (a sequence classifier needs one to find each row's last
    token in a padded batch). Every process
    must call this (gathering a sharded layer is a collective); process 0 writes.
    """
    from instruct_jax.data.tokenizer import load_tokenizer

    reward = "trunk" in params
    rows = vocab_size or cfg.vocab_size
    if rows > cfg.vocab_size:
        raise ValueError(f"vocab_size {rows} exceeds the model's {cfg.vocab_size} rows")
    tok = load_tokenizer(tokenizer) if tokenizer else None
    ids = _tokenizer_ids(tok, rows)
    if pad_token_id is not None:
        ids["pad_token_id"] = pad_token_id
    hf = hf_config_from_model(cfg, family, vocab_size=rows, reward=reward, dtype=dtype, **ids)
    if reward:
        norm = {"gain": 1.0, "bias": 0.0, **(reward_norm or {})}
        gain = float(norm["gain"])
        hf[REWARD_OFFSET_KEY] = gain * float(to_host(params["head"]["bias"])) + float(norm["bias"])
        params = {"trunk": params["trunk"], "head": {"kernel": params["head"]["kernel"] * gain}}
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(out, exist_ok=True)
    maps = tensor_maps(cfg, reward)
    sizes = dim_sizes(cfg, rows)
    entries = hf_entries(maps, sizes)
    by_name = {name: (m, layer) for name, m, layer in entries}
    np_dtype = DTYPES[{"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]]
    write_checkpoint(out, [(name, hf_shape(m, sizes), np_dtype) for name, m, _ in entries],
                     lambda name: hf_tensor(params, by_name[name][0], sizes, by_name[name][1]),
                     max_shard_bytes=max_shard_bytes, write=primary)
    if primary:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        if tok is not None and not reward:
            stops = sorted({tok.eos_id, tok.eot_id})
            with open(os.path.join(out, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                           "pad_token_id": hf["pad_token_id"]}, f, indent=2)
        if tokenizer:
            export_tokenizer(tokenizer, out, rows)
    return hf
