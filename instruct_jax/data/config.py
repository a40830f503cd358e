"""Data configuration (owned by the data pipeline; composed into instruct_jax.config.Config as `cfg.data`).

This module imports nothing from instruct_jax: config.py imports it at module level.
Field paths ("instances[0].output") walk dicts by key and lists by index; see docs/DATA.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FORMATS = ("sft", "text", "prompt", "pairwise", "ranking")
ON_MALFORMED = ("error", "skip")
ON_OVERLENGTH = ("truncate", "drop")
TRANSCRIPTS = ("none", "hh")
TEXT_UNITS = ("line", "paragraph", "document")
PADDING_SIDES = ("left", "right")
TRAIN_SENTENCEPIECE = "sentencepiece:train"


@dataclass
class DataConfig:
    # ---- where rows come from
    source: str = ""  # Hub dataset name, or local files/globs/folders, comma-separated (jsonl json parquet txt, .gz ok)
    format: str = "sft"  # one of FORMATS: sft | text | prompt | pairwise | ranking (docs/DATA.md shows each)
    split: str = "train"  # Hub split read from `source` (local files are read whole)
    hub_config: str = ""  # Hub dataset config name ("" = the dataset's default)
    hub_data_dir: str = ""  # Hub data_dir inside the dataset repo (e.g. "helpful-base" for Anthropic/hh-rlhf)
    eval_source: str = ""  # held-out rows from another source, same format and fields; "" = carve from `source`
    eval_split: str = ""  # Hub split of `eval_source` ("" = same as `split`)
    eval_fraction: float = 0.0  # without eval_source: fraction of prompts held out (seeded hash of the prompt)
    max_rows: int = 0  # read at most this many rows per source (0 = all): for smoke runs
    # ---- field mapping (dotted paths; "a.b[0].c" indexes lists)
    text_field: str = "text"  # text: the document (rows of .txt files are the text itself)
    messages_field: str = ""  # sft / prompt: a list of {"role", "content"}; "" = build turns from prompt/response
    prompt_field: str = "prompt"  # sft / prompt / ranking: the user's request, a string or a list of messages
    input_field: str = ""  # sft / prompt: optional extra input, appended to the prompt after a blank line
    response_field: str = "response"  # sft: the assistant's answer
    chosen_field: str = "chosen"  # pairwise: the preferred answer
    rejected_field: str = "rejected"  # pairwise: the other answer
    responses_field: str = "responses"  # ranking: list of K answers, 2 <= K <= 9
    ranks_field: str = "ranks"  # ranking: list of K integers, 1 = best, ties allowed
    images_field: str = "images"  # with model.vision: the row's images, one per "<image>" marker, in order
    transcript: str = "none"  # none | hh: string fields hold "\n\nHuman: …\n\nAssistant: …" dialogues (HH-RLHF)
    text_unit: str = "paragraph"  # rows of .txt files: line | paragraph (blank-line separated) | document
    # ---- tokenizer and chat template
    tokenizer: str = TRAIN_SENTENCEPIECE  # .model / tokenizer.json / a folder holding either, or "sentencepiece:train"
    tokenizer_train_files: tuple = ()  # text files for "sentencepiece:train" (() = the source, text format only)
    vocab_size: int = 1024  # "sentencepiece:train": vocabulary size to learn
    chat_template: str = "builtin"  # builtin | model (the tokenizer's own Jinja template) | path to .jinja
    # ---- policies (every skip, truncation and drop is counted in DataStats)
    on_malformed: str = "error"  # error: stop, naming file, line and field | skip: count the row and go on
    on_overlength: str = "truncate"  # truncate | drop examples longer than the sequence
    max_prompt_len: int = 0  # prompt format: tokens per left-padded prompt; 0 = half of train.seq_len
    max_responses: int = 0  # pairwise / ranking: response slots K per batch element; 0 = largest K in the data
    # ---- a tokenised store (data/store.py, docs/DATA.md)
    store: str = ""  # "" = tokenise in memory on every host; a folder (or gs://) = each host tokenises its share once
    # ---- batching
    packing: bool = True  # greedy-pack sft/text examples into rows (else pad one example per row)
    prefetch: int = 2  # batches built ahead in a background thread (0 = build on demand)


class DataConfigError(ValueError):
    """A bad data setting; `field` is its dotted name. Same message shape as instruct_jax.config.ConfigError."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"config field '{field_name}': {message}")


# Which fields each format reads; an empty one can't be followed.
_REQUIRED_FIELDS = {
    "text": ("text_field",),
    "pairwise": ("chosen_field", "rejected_field"),
    "ranking": ("prompt_field", "responses_field", "ranks_field"),
}


def validate_data_config(cfg) -> None:
    """Raise DataConfigError naming the first bad field. Accepts a DataConfig or a Config holding `.data`.

    Checks only what can be known without reading data; a missing source is allowed here because
    a run may hand the pipeline in-memory examples instead (the built-in task does).
    """
    d = getattr(cfg, "data", cfg)
    for name, allowed in (("format", FORMATS), ("on_malformed", ON_MALFORMED),
                          ("on_overlength", ON_OVERLENGTH), ("transcript", TRANSCRIPTS),
                          ("text_unit", TEXT_UNITS)):
        value = getattr(d, name)
        if value not in allowed:
            raise DataConfigError(f"data.{name}", f"expected one of {list(allowed)}, got {value!r}")
    for name in ("max_rows", "max_prompt_len", "max_responses", "prefetch"):
        if getattr(d, name) < 0:
            raise DataConfigError(f"data.{name}", f"must be >= 0, got {getattr(d, name)}")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise DataConfigError("data.eval_fraction", f"must be in [0, 1), got {d.eval_fraction}")
    if d.eval_source and d.eval_fraction:
        raise DataConfigError("data.eval_fraction", "must be 0 when data.eval_source is set (one way to get eval rows)")
    if d.max_responses == 1 or d.max_responses > 9:
        raise DataConfigError("data.max_responses", f"must be 0 (auto) or in 2..9, got {d.max_responses}")
    for name in _REQUIRED_FIELDS.get(d.format, ()):
        if not getattr(d, name):
            raise DataConfigError(f"data.{name}", f"must name a field for format {d.format!r}")
    if d.format in ("sft", "prompt") and not (d.messages_field or d.prompt_field):
        raise DataConfigError("data.prompt_field",
                              f"format {d.format!r} needs data.messages_field or data.prompt_field")
    if d.format == "sft" and not d.messages_field and not d.response_field:
        raise DataConfigError("data.response_field", "format 'sft' needs data.messages_field or data.response_field")
    if d.tokenizer == TRAIN_SENTENCEPIECE:
        if d.vocab_size < 300:  # 256 byte-fallback pieces + specials + some merges
            raise DataConfigError("data.vocab_size", f"must be >= 300 to train sentencepiece, got {d.vocab_size}")
        if d.source and not d.tokenizer_train_files and d.format != "text":
            raise DataConfigError("data.tokenizer_train_files",
                                  f"needed to train a tokenizer for format {d.format!r} "
                                  "(only 'text' trains on its source)")
    elif not d.tokenizer:
        raise DataConfigError("data.tokenizer", f"must be a path or {TRAIN_SENTENCEPIECE!r}")
    if d.store and d.format not in ("sft", "text", "prompt"):
        raise DataConfigError("data.store", f"stores hold sft, text and prompt examples; format {d.format!r} "
                                            "(rankings, read by the reward model) is kept in memory: leave it empty")
    if d.chat_template not in ("builtin", "model") and not os.path.isfile(d.chat_template):
        raise DataConfigError("data.chat_template",
                              f"expected 'builtin', 'model' or a Jinja file, got {d.chat_template!r}")
