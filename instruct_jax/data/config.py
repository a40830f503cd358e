"""Data configuration (owned by the data pipeline; composed into instruct_jax.config.Config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    source: str = ""  # Hub dataset name or local file/glob (jsonl, json, parquet, txt; .gz ok)
    format: str = "sft"  # sft | text | prompt | pairwise | ranking
    packing: bool = True  # greedy-pack examples into rows (else pad one example per row)
