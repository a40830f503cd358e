"""From a DataConfig to examples and loaders: read -> parse -> split train/eval -> tokenize -> Loader.

For the SFT / pretraining loop, one call:

    data = build_lm_data(cfg, workdir)          # cfg: the whole Config
    batches = data.train.iterate(start_step, sharding)
    eval_batch = data.eval.device_batch(i, sharding) if data.eval else None
    print(data.report())                        # kept / skipped by reason / truncated / dropped

The pieces, for other phases (reward model: pairwise / ranking; PPO: prompt):

    tokenizer = build_tokenizer(cfg.data, workdir)
    data = load_data(cfg.data, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.seed)
    loader = make_loader(data.train, cfg.data, tokenizer, global_batch_size=..., seq_len=..., seed=cfg.seed)

`read_records` is the one place where the `on_malformed` policy is applied: a malformed row either
raises MalformedDataError ("file.jsonl:12: field 'instances[0].output': missing") or is counted
as a skip under its reason; filtered rows (formats.FilteredRow) are always counted skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

from instruct_jax import files
from instruct_jax.data.chat import ChatTemplate, load_chat_template
from instruct_jax.data.config import TRAIN_SENTENCEPIECE, DataConfig, DataConfigError
from instruct_jax.data.examples import encode_conversation, encode_prompt, encode_ranking, encode_text
from instruct_jax.data.formats import Ranking, prompt_key, row_to_record, self_instruct_config
from instruct_jax.data.images import ImageLayout, WithImages, check_image_markers, record_messages, row_images
from instruct_jax.data.loader import Loader
from instruct_jax.data.sources import iter_rows, local_files
from instruct_jax.data.stats import DataStats, FilteredRow, MalformedDataError
from instruct_jax.data.store import complete_parts, open_store, part_done, part_name, write_part
from instruct_jax.data.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer, train_sentencepiece


# ----------------------------------------------------------------------------- tokenizer and template
def build_tokenizer(cfg: DataConfig, workdir: Optional[str] = None) -> Tokenizer:
    """Load `cfg.tokenizer`, or train sentencepiece once into <workdir>/tokenizer/ and reuse it after.

    Training reads `cfg.tokenizer_train_files`, or the source files for the text format.
    Without a workdir the model is written to a fresh temporary folder.
    """
    if cfg.tokenizer != TRAIN_SENTENCEPIECE:
        return load_tokenizer(cfg.tokenizer)
    texts = list(cfg.tokenizer_train_files)
    if not texts and cfg.format == "text":
        texts = local_files(cfg.source) or []
    if not texts:
        raise DataConfigError("data.tokenizer_train_files", "no text files to train sentencepiece on")
    folder = files.join(workdir, "tokenizer") if workdir else tempfile.mkdtemp(prefix="instruct_jax_tok_")
    model = files.join(folder, f"spm_{cfg.vocab_size}.model")
    if not files.isfile(model):  # else trained by an earlier (or interrupted and resumed) run
        # Train beside it and rename: an interrupted run never leaves a half-written model to reuse,
        # and hosts sharing a workdir (training is deterministic) never read each other's partial file.
        # A bucket workdir: train locally, then one upload (an object appears whole).
        remote = files.is_remote(model)
        if not remote:
            os.makedirs(folder, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix="training_", dir=None if remote else folder)
        train_sentencepiece(texts, os.path.join(scratch, "spm"), cfg.vocab_size)
        if remote:
            files.copy_tree(os.path.join(scratch, "spm.model"), model)
        else:
            os.replace(os.path.join(scratch, "spm.model"), model)
        shutil.rmtree(scratch, ignore_errors=True)
    return SentencePieceTokenizer(files.local_copy(model))


def build_chat_template(cfg: DataConfig, tokenizer: Tokenizer, images: Optional[ImageLayout] = None) -> ChatTemplate:
    """cfg.chat_template for `tokenizer`; with an image layout, image markers expand to its image tokens."""
    template = load_chat_template(cfg.chat_template, tokenizer)
    return template.with_images(images.token_id, images.tokens_per_image) if images else template


# ----------------------------------------------------------------------------- rows -> records
def read_records(source: str, cfg: DataConfig, stats: Optional[DataStats] = None,
                 split: Optional[str] = None, shard: tuple[int, int] = (0, 1),
                 images: Optional[ImageLayout] = None) -> tuple[list[tuple[str, object]], DataStats]:
    """Parse every row of `source` (or host shard[0]'s share of shard[1], see `iter_rows`) with cfg's format
    and field mapping: [(where, record)], stats.

    With an image layout (a model with a vision tower), each row's `cfg.images_field` is loaded and checked
    against the row's image markers here, before any batch exists: a mismatch is a MalformedDataError naming
    the row and both counts (or, with on_malformed=skip, a counted skip), and the record comes as WithImages."""
    stats = stats if stats is not None else DataStats(name=source)
    records = []
    rows = iter_rows(source, split=split or cfg.split, hub_config=cfg.hub_config, hub_data_dir=cfg.hub_data_dir,
                     text_unit=cfg.text_unit, max_rows=cfg.max_rows, shard=shard)
    for where, row in rows:
        try:
            if isinstance(row, MalformedDataError):
                raise row
            record = row_to_record(row, cfg)
            if images is not None and cfg.format != "text":
                pixels = row_images(row, cfg.images_field, images, where)
                check_image_markers(record_messages(record), pixels, where, images.max_images)
                record = WithImages(record, pixels)
        except FilteredRow as f:
            stats.skip(f.reason, where)
            continue
        except MalformedDataError as e:
            if cfg.on_malformed == "error":
                raise (e if e.where else e.at(where)) from None
            stats.skip(e.reason, where)
            continue
        stats.rows += 1
        records.append((where, record))
    return records, stats


def load_self_instruct_sft(path: str, on_malformed: str = "error") -> tuple[list[list[dict]], DataStats]:
    """Self-Instruct seed tasks as SFT conversations [user: instruction (+ input), assistant: output]."""
    cfg = self_instruct_config(path, on_malformed=on_malformed)
    records, stats = read_records(cfg.source, cfg)
    return [conversation for _, conversation in records], stats


def unwrap(record):
    """A record without its images."""
    return record.record if isinstance(record, WithImages) else record


def is_eval(record, fraction: float, seed: int) -> bool:
    """Seeded hash of the record's prompt: one prompt is always on one side, whatever the row order."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\x00{prompt_key(unwrap(record))}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64 < fraction


# ----------------------------------------------------------------------------- records -> examples
def encode_records(records: Sequence[tuple[str, object]], cfg: DataConfig, tokenizer: Tokenizer,
                   template: ChatTemplate, seq_len: int, stats: DataStats) -> list:
    """Tokenize records of cfg.format into examples (examples.py), applying on_overlength."""
    max_prompt_len = cfg.max_prompt_len or seq_len // 2
    examples = []
    for where, record in records:
        images = record.images if isinstance(record, WithImages) else None
        record = record.record if isinstance(record, WithImages) else record
        if cfg.format == "text":
            made = encode_text(record, tokenizer, seq_len, stats)
        elif cfg.format == "sft":
            made = [encode_conversation(record, template, seq_len, cfg.on_overlength, stats, where, images)]
        elif cfg.format == "prompt":
            made = [encode_prompt(record, template, max_prompt_len, cfg.on_overlength, stats, where, images)]
        else:
            assert isinstance(record, Ranking)
            made = [encode_ranking(record, template, seq_len, cfg.on_overlength, stats, where, images)]
        made = [m for m in made if m is not None]
        stats.kept += bool(made)
        examples += made
    return examples


@dataclass
class Data:
    """Everything a training phase reads: tokenizer, template, examples and what happened to the rows."""

    tokenizer: Tokenizer
    template: ChatTemplate
    train: Sequence  # examples: a list, or an ExampleStore (data.store)
    eval: Sequence
    train_stats: DataStats
    eval_stats: DataStats = field(default_factory=lambda: DataStats(name="eval"))

    def report(self) -> str:
        return self.train_stats.report() + ("\n" + self.eval_stats.report() if self.eval_stats.rows else "")


def load_data(cfg: DataConfig, tokenizer: Tokenizer, template: Optional[ChatTemplate] = None, *,
              seq_len: int, seed: int = 0, shard: tuple[int, int] = (0, 1), images: Optional[ImageLayout] = None) -> Data:
    """Read cfg.source (and eval_source), split off eval by prompt, and tokenize both sides.

    shard = (i, n): only host i's share of n (`iter_rows`), as `prepare_store` writes it. images: the model's
    image layout (`ImageLayout.of(cfg.model.vision)`), or None for a text-only model."""
    if not cfg.source:
        raise DataConfigError("data.source", "empty; name a Hub dataset or local files")
    template = template or build_chat_template(cfg, tokenizer, images)
    train_stats, eval_stats = DataStats(name="train"), DataStats(name="eval")
    records, _ = read_records(cfg.source, cfg, train_stats, shard=shard, images=images)
    if cfg.eval_source:
        eval_records, _ = read_records(cfg.eval_source, cfg, eval_stats, split=cfg.eval_split or cfg.split,
                                       shard=shard, images=images)
    else:
        held_out = [is_eval(r, cfg.eval_fraction, seed) for _, r in records]
        eval_records = [r for r, out in zip(records, held_out) if out]
        records = [r for r, out in zip(records, held_out) if not out]
        eval_stats.rows, train_stats.rows = len(eval_records), train_stats.rows - len(eval_records)
    train = encode_records(records, cfg, tokenizer, template, seq_len, train_stats)
    held = encode_records(eval_records, cfg, tokenizer, template, seq_len, eval_stats)
    return Data(tokenizer, template, train, held, train_stats, eval_stats)


# ----------------------------------------------------------------------------- a tokenised store
_KEY_FIELDS = ("source", "format", "split", "hub_config", "hub_data_dir", "eval_source", "eval_split", "eval_fraction",
               "max_rows", "text_field", "messages_field", "prompt_field", "input_field", "response_field",
               "transcript", "text_unit", "tokenizer", "vocab_size", "chat_template", "on_malformed", "on_overlength",
               "max_prompt_len")
_PROBE = "The quick brown fox: 12,345 jumps?\nÜber naïve café — 東京 🙂"


def store_key(cfg: DataConfig, tokenizer: Tokenizer, template: ChatTemplate, seq_len: int, seed: int) -> str:
    """What a store's examples depend on: the data fields that shape them, the sequence length, the seed when it
    picks the eval split, and the tokenizer and template (by what they make of a probe)."""
    parts = {name: getattr(cfg, name) for name in _KEY_FIELDS}
    parts.update(seq_len=seq_len, seed=seed if cfg.eval_fraction else None, vocab=tokenizer.vocab_size,
                 probe=tokenizer.encode(_PROBE),
                 rendered=template.render([{"role": "user", "content": _PROBE}, {"role": "assistant", "content": "ok"}]))
    text = json.dumps(parts, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else list(v))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def prepare_store(cfg: DataConfig, tokenizer: Tokenizer, template: Optional[ChatTemplate] = None, *, seq_len: int,
                  seed: int = 0, folder: Optional[str] = None, shard: tuple[int, int] = (0, 1)) -> bool:
    """Tokenise host shard[0]'s share of cfg's data into part shard[0] of shard[1] of the store at `folder`
    (default cfg.store): train and eval sides. Returns False when a complete store (any number of parts) or
    this part is there already. Tokenising on n hosts takes 1/n of the time; the `prepare` command runs it
    ahead of a job, on any machine."""
    folder = folder or cfg.store
    template = template or build_chat_template(cfg, tokenizer)
    key = store_key(cfg, tokenizer, template, seq_len, seed)
    sides = ("train", "eval")
    part = part_name(*shard)
    if all(complete_parts(files.join(folder, side), key) for side in sides) or \
            all(part_done(files.join(folder, side, part), key) for side in sides):
        return False
    data = load_data(cfg, tokenizer, template, seq_len=seq_len, seed=seed, shard=shard)
    write_part(files.join(folder, "eval", part), data.eval, data.eval_stats, key)
    write_part(files.join(folder, "train", part), data.train, data.train_stats, key)
    return True


def load_stored_data(cfg: DataConfig, tokenizer: Tokenizer, template: Optional[ChatTemplate] = None, *,
                     seq_len: int, seed: int = 0, folder: Optional[str] = None) -> Data:
    """`load_data` through the store at `folder` (default cfg.store): prepared here first if needed (each
    process its share, then all wait for each other), then opened: `Data.train` / `Data.eval` are
    ExampleStores (index only; tokens read per step) and the stats are those of every part."""
    import jax

    folder = folder or cfg.store
    template = template or build_chat_template(cfg, tokenizer)
    key = store_key(cfg, tokenizer, template, seq_len, seed)
    if not all(complete_parts(files.join(folder, side), key) for side in ("train", "eval")):
        prepare_store(cfg, tokenizer, template, seq_len=seq_len, seed=seed, folder=folder,
                      shard=(jax.process_index(), jax.process_count()))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"instruct_jax data store {folder}")
    train, held = (open_store(files.join(folder, side), key) for side in ("train", "eval"))
    if train is None or held is None:
        raise DataConfigError("data.store", f"{folder}: the store is incomplete after preparing it (a part written "
                                            "by another host is missing)")
    train.stats.name, held.stats.name = "train", "eval"
    return Data(tokenizer, template, train, held, train.stats, held.stats)


def prepare_command(cfg, workdir: Optional[str] = None) -> None:
    """`python -m instruct_jax prepare`: the stores a run of this experiment reads (data.store and, with PPO-ptx,
    ppo.ptx.store), prepared by every process of the job, each its share; a complete store is left as it is."""
    import jax

    wanted = [(name, d) for name, d in (("data", cfg.data), ("ppo.ptx", cfg.ppo.ptx)) if d.store]
    if not wanted:
        raise DataConfigError("data.store", "empty (and ppo.ptx.store too): name the folder to prepare the data in")
    tokenizer = build_tokenizer(cfg.data, workdir)
    for name, d in wanted:
        data = load_stored_data(d, tokenizer, seq_len=cfg.train.seq_len, seed=cfg.seed)
        if jax.process_index() == 0:
            print(f"{name}.store {d.store}: {len(data.train)} training and {len(data.eval)} held-out examples "
                  f"in {len(data.train.parts)} part(s)\n{data.report()}", flush=True)


def make_loader(examples: Sequence, cfg: DataConfig, tokenizer: Tokenizer, *, global_batch_size: int,
                seq_len: int, seed: int, shuffle: bool = True, images: Optional[ImageLayout] = None) -> Loader:
    """A Loader with the config's packing, prompt length, response slots and prefetch (and image slots)."""
    return Loader(examples, global_batch_size, seq_len, seed, pad_id=tokenizer.pad_id, packing=cfg.packing,
                  shuffle=shuffle, prompt_len=cfg.max_prompt_len or seq_len // 2, padding_side="left",
                  max_responses=cfg.max_responses, prefetch=cfg.prefetch, images=images)


# ----------------------------------------------------------------------------- the LM phases
@dataclass
class LMData:
    """What the SFT / pretraining loop reads: tokenizer, train and eval loaders, and the data report."""

    tokenizer: Tokenizer
    template: ChatTemplate
    train: Loader
    eval: Optional[Loader]  # None without eval_source / eval_fraction
    data: Data

    def report(self) -> str:
        return self.data.report()


def build_lm_data(cfg, workdir: Optional[str] = None) -> LMData:
    """Tokenizer, examples and loaders for next-token training (format sft or text) from the whole Config.

    Reads cfg.data, cfg.train.global_batch_size, cfg.train.seq_len and cfg.seed. The eval loader
    walks the held-out examples in a fixed order (no shuffle), so every evaluation sees the same batches.
    """
    d, t = cfg.data, cfg.train
    if d.format not in ("sft", "text"):
        raise DataConfigError("data.format", f"next-token training reads 'sft' or 'text', got {d.format!r}")
    images = ImageLayout.of(cfg.model.vision)
    if images and d.store:
        raise DataConfigError("data.store", "stores hold token examples only; a model with images "
                                            "(model.vision) reads its data in memory: leave it empty")
    tokenizer = build_tokenizer(d, workdir)
    if d.store:
        data = load_stored_data(d, tokenizer, seq_len=t.seq_len, seed=cfg.seed)
    else:
        data = load_data(d, tokenizer, seq_len=t.seq_len, seed=cfg.seed, images=images)
    common = dict(global_batch_size=t.global_batch_size, seq_len=t.seq_len, seed=cfg.seed, images=images)
    train = make_loader(data.train, d, tokenizer, **common)
    held_out = make_loader(data.eval, d, tokenizer, shuffle=False, **common) if data.eval else None
    return LMData(tokenizer, data.template, train, held_out, data)
