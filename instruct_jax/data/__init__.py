"""Data pipeline: sources -> records -> token examples -> packed rows -> host-sharded batches.

Read top to bottom in this order:
    config.py     DataConfig (cfg.data) and validate_data_config
    sources.py    rows from local jsonl / json / parquet / text files or a Hub dataset, with locations
    formats.py    field mapping: rows -> text | conversation | prompt | Ranking; HH-RLHF and Self-Instruct
    stats.py      MalformedDataError, FilteredRow and the DataStats report
    tokenizer.py  sentencepiece and Hugging Face tokenizers behind one interface
    chat.py       chat templates (built-in and Jinja) with exact assistant masks
    examples.py   records -> LMExample / PromptExample / RankingExample, over-length policy
    packing.py    examples -> fixed-shape rows (greedy packing with segment ids, or padding)
    loader.py     deterministic global batches, per-host slices, prefetching iterator
    build.py      the wiring from a DataConfig to examples and loaders
"""

from instruct_jax.data.build import (Data, LMData, build_chat_template, build_lm_data, build_tokenizer, load_data,
                                     load_self_instruct_sft, make_loader, read_records)
from instruct_jax.data.chat import BuiltinChatTemplate, ChatTemplate, JinjaChatTemplate, load_chat_template
from instruct_jax.data.config import DataConfig, DataConfigError, validate_data_config
from instruct_jax.data.examples import LMExample, PromptExample, RankingExample
from instruct_jax.data.formats import SELF_INSTRUCT_FIELDS, Ranking, self_instruct_config
from instruct_jax.data.loader import Loader, LoaderIterator
from instruct_jax.data.packing import pack_lm_row
from instruct_jax.data.stats import DataStats, FilteredRow, MalformedDataError
from instruct_jax.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "BuiltinChatTemplate", "ChatTemplate", "Data", "DataConfig", "DataConfigError", "DataStats", "FilteredRow",
    "JinjaChatTemplate", "LMData", "LMExample", "Loader", "LoaderIterator", "MalformedDataError",
    "PromptExample", "Ranking", "RankingExample", "SELF_INSTRUCT_FIELDS", "Tokenizer", "build_chat_template",
    "build_lm_data", "build_tokenizer", "load_chat_template", "load_data", "load_self_instruct_sft",
    "load_tokenizer", "make_loader", "pack_lm_row", "read_records", "self_instruct_config", "train_sentencepiece",
    "validate_data_config",
]
