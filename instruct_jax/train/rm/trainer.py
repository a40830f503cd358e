"""The reward-model phase (InstructGPT step 2), top to bottom: Mesh -> Model -> Shard -> Update -> Input
-> the one loop (train/loop.py: Checkpoint -> Train -> Normalize -> Export).

Same conventions as the SFT loop (train/lm/trainer.py): resumable from the newest intact checkpoint
(the data order is a pure function of (seed, step)), SIGTERM saves and exits, metrics.jsonl +
TensorBoard, and a params export at the end. What differs:

* the model is trunk + scalar head (model/heads.py); `train.init_from` names an SFT / pretraining
  export (or workdir) whose trunk is loaded while the head starts fresh, or an earlier reward
  model export, loaded whole;
* every evaluation scores ALL held-out comparisons and logs eval_accuracy with its 95% CI,
  reward mean / std, accuracy by margin bucket, and the "longer answer wins" baseline and the
  length-balanced accuracy on the same pairs;
* after training the scores are normalized on reference demonstrations (mean 0, optionally
  std 1); gain and bias go into the final checkpoint's meta, into the params export
  ({"params": ..., "norm": {"gain", "bias"}}) and into <workdir>/reward_norm.json, and
  <workdir>/eval.json holds the final evaluation on normalized scores.

    python -m instruct_jax rm --experiment experiments/tiny_rm.py --workdir runs/tiny-rm
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from instruct_jax import files
from instruct_jax.checkpoint import export_params, load_params, resolve_params_dir
from instruct_jax.config import Config, save_config, validate
from instruct_jax.data.build import (Data, build_chat_template, build_tokenizer, encode_records, is_eval, load_data,
                                     make_loader, read_records)
from instruct_jax.data.chat import ChatTemplate
from instruct_jax.data.examples import RankingExample, encode_ranking
from instruct_jax.data.formats import Ranking
from instruct_jax.data.images import ImageLayout
from instruct_jax.data.loader import Loader
from instruct_jax.data.packing import prefix_flags, ranking_row, stack_rows
from instruct_jax.data.stats import DataStats
from instruct_jax.data.synthetic_prefs import synthetic_rankings
from instruct_jax.data.tokenizer import Tokenizer, check_tokenizer_fits
from instruct_jax.errors import ConfigError
from instruct_jax.inference.scorer import load_reward_model, score_batch_size
from instruct_jax.inference.scorer import make_score_step, put_global, score_token_sequences
from instruct_jax.metrics import MetricsWriter, log, model_flops_per_token
from instruct_jax.model.lora import merged_for_export
from instruct_jax.model.heads import RewardModel, init_reward_params_boxed
from instruct_jax.model.transformer import Transformer, init_params_boxed
from instruct_jax.parallel.mesh import make_mesh
from instruct_jax.parallel.sharding import param_shardings_for, unbox
from instruct_jax.train.guards import GuardConfig
from instruct_jax.train.loop import Phase, run_phase
from instruct_jax.train.optimizer import freeze_base, learning_rate_schedule, make_optimizer
from instruct_jax.train.rm.ranking import (IDENTITY_NORM, fit_normalization, make_reward_eval_step,
                                           make_reward_train_step, model_ranking_shardings, ranking_keys,
                                           ranking_metrics, ranking_shardings)
from instruct_jax.train.state import PhaseSetup, TrainState, state_shardings_for

NORM_FILE = "reward_norm.json"
EVAL_FILE = "eval.json"


# ----------------------------------------------------------------------------- setup
@dataclasses.dataclass
class RMSetup(PhaseSetup):
    """The reward phase's setup: `model` is the RewardModel, `eval_step` returns raw rewards [B, K]."""

    score_step: Callable = None  # (params, norm, tokens, positions, segment_ids, eos_index) -> normalized [N]


def validate_reward(cfg: Config) -> None:
    """The reward phase's own checks (config.validate knows nothing about it)."""
    r = cfg.reward
    if cfg.data.format not in ("pairwise", "ranking"):
        raise ConfigError("data.format", f"the rm command reads 'pairwise' or 'ranking' data, got {cfg.data.format!r}")
    if r.synthetic and cfg.data.source:  # a setting another one makes inert is an error naming both
        raise ConfigError("reward.synthetic", f"{r.synthetic} generated rankings would replace data.source="
                          f"{cfg.data.source!r}; set one of the two (reward.synthetic=0 reads data.source)")
    for name in ("reference_max_examples", "margin_buckets", "synthetic", "score_batch_size"):
        if getattr(r, name) < 0:
            raise ConfigError(f"reward.{name}", f"must be >= 0, got {getattr(r, name)}")
    if r.reference.format not in ("sft", "pairwise", "ranking"):
        raise ConfigError("reward.reference.format", f"expected sft, pairwise or ranking, got {r.reference.format!r}")


def abstract_rm_state(cfg: Config, mesh) -> tuple[TrainState, TrainState]:
    """(abstract reward-model TrainState with shardings, sharding tree); `mesh` may be an AbstractMesh."""
    init_boxed = functools.partial(init_reward_params_boxed, RewardModel(cfg.model))
    return state_shardings_for(init_boxed, freeze_base(make_optimizer(cfg.optim, cfg.train.steps), cfg.model), mesh, cfg.mesh.logical_rules())


def build_rm(cfg: Config, devices: Optional[Sequence] = None) -> RMSetup:
    devices = list(devices if devices is not None else jax.devices())
    validate(cfg, num_devices=len(devices))
    # ---- Mesh
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.logical_rules()
    # ---- Model
    model = RewardModel(cfg.model)
    init_boxed = functools.partial(init_reward_params_boxed, model)
    # ---- Shard
    tx = freeze_base(make_optimizer(cfg.optim, cfg.train.steps), cfg.model)
    schedule = learning_rate_schedule(cfg.optim, cfg.train.steps)
    abstract_state, shardings = state_shardings_for(init_boxed, tx, mesh, rules)
    # ---- Update
    train_step = make_reward_train_step(model, tx, schedule, mesh, rules, shardings, cfg.train.microbatches,
                                        cfg.reward.margin, GuardConfig.from_train(cfg.train))
    eval_step = make_reward_eval_step(model, mesh, rules, shardings.params)
    score_step = make_score_step(model, mesh, rules, shardings.params)
    return RMSetup(cfg, mesh, rules, model, tx, schedule, init_boxed, abstract_state, shardings, train_step,
                   eval_step, score_step)


# ----------------------------------------------------------------------------- params in and out
def export_kind(path: str) -> str:
    """"reward" for a reward-model export ({"params", "norm"}), "lm" for an SFT / pretraining one."""
    tree = ocp.StandardCheckpointer().metadata(files.path(path)).item_metadata
    return "reward" if set(tree.keys()) == {"params", "norm"} else "lm"


def load_reward_export(setup: RMSetup, path: str) -> tuple[Any, dict]:
    """(params, norm) of a reward-model export, on the setup's shardings."""
    return load_reward_model(path, setup.cfg.model, setup.mesh, setup.rules)


def load_trunk_params(setup: RMSetup, path: str) -> dict:
    """Reward-model params: the trunk from an LM export (its lm_head dropped), a freshly initialised head."""
    lm_init = functools.partial(init_params_boxed, Transformer(setup.cfg.model))
    abstract_lm, _ = param_shardings_for(lm_init, setup.mesh, setup.rules)
    lm = load_params(path, abstract_lm, setup.cfg.seed)
    return {"trunk": {k: v for k, v in lm.items() if k != "lm_head"}, "head": fresh_params(setup)["head"]}


def fresh_params(setup: RMSetup):
    """Freshly initialised params, sharded; the same values `setup.init_state()` starts from."""
    init_rng, _ = jax.random.split(jax.random.PRNGKey(setup.cfg.seed))  # as state.create_train_state
    with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
        return jax.jit(lambda: unbox(setup.init_boxed(init_rng)), out_shardings=setup.state_shardings.params)()


def export_reward_model(workdir: str, params, norm: dict, model_cfg=None) -> None:
    """<workdir>/params (orbax, with manifest) and the human-readable <workdir>/reward_norm.json."""
    params = merged_for_export(params, model_cfg) if model_cfg is not None else params  # LoRA: merged
    export_params(files.join(workdir, "params"), {"params": params, "norm": {
        k: np.float32(v) for k, v in norm.items()}})
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, NORM_FILE), json.dumps({k: float(v) for k, v in norm.items()}, indent=2))


def fresh_state(setup: RMSetup) -> TrainState:
    """A fresh run's state: seeded, or from `train.init_from` (a reward export whole, an LM export's trunk)."""
    init_from = setup.cfg.train.init_from
    if not init_from:
        return setup.init_state()
    path = resolve_params_dir(init_from)
    if export_kind(path) == "reward":
        params, _ = load_reward_export(setup, path)
        log(f"initialised the whole reward model from {init_from}")
    else:
        params = load_trunk_params(setup, path)
        log(f"initialised the trunk from {init_from}; the reward head starts fresh")
    return setup.init_state(params=params)


# ----------------------------------------------------------------------------- input
@dataclasses.dataclass
class RMData:
    tokenizer: Tokenizer
    template: ChatTemplate
    data: Data  # train / eval RankingExamples and their stats
    train: Loader
    k_slots: int

    def report(self) -> str:
        return self.data.report()


def load_rankings(cfg: Config, tokenizer: Tokenizer, template: ChatTemplate) -> Data:
    """Train / eval RankingExamples: read from cfg.data, or generated (reward.synthetic > 0)."""
    if not cfg.reward.synthetic:
        return load_data(cfg.data, tokenizer, template, seq_len=cfg.train.seq_len, seed=cfg.seed,
                         images=ImageLayout.of(cfg.model.vision))
    records = [(f"synthetic:{i}", r) for i, r in enumerate(synthetic_rankings(cfg.reward.synthetic, seed=cfg.seed))]
    held_out = [is_eval(r, cfg.data.eval_fraction, cfg.seed) for _, r in records]
    train_stats, eval_stats = DataStats(name="train"), DataStats(name="eval")
    train_stats.rows, eval_stats.rows = held_out.count(False), held_out.count(True)
    train = encode_records([r for r, h in zip(records, held_out) if not h], cfg.data, tokenizer, template,
                           cfg.train.seq_len, train_stats)
    held = encode_records([r for r, h in zip(records, held_out) if h], cfg.data, tokenizer, template,
                          cfg.train.seq_len, eval_stats)
    return Data(tokenizer, template, train, held, train_stats, eval_stats)


def build_rm_data(cfg: Config, workdir: Optional[str]) -> RMData:
    if not (cfg.reward.synthetic or cfg.data.source):  # training needs comparisons; scoring (inference/scorer.py) doesn't
        raise ConfigError("data.source", "empty; name the comparisons to train on (or set reward.synthetic)")
    tokenizer = build_tokenizer(cfg.data, workdir)
    check_tokenizer_fits(tokenizer, cfg.model)
    images = ImageLayout.of(cfg.model.vision)
    if images and (cfg.reward.synthetic or cfg.reward.reference.source):
        name = "reward.synthetic" if cfg.reward.synthetic else "reward.reference.source"
        raise ConfigError(name, "a reward model with images (model.vision) reads its rankings and their images "
                                "from data.source, and normalises on their best-ranked answers: leave it empty")
    template = build_chat_template(cfg.data, tokenizer, images)
    data = load_rankings(cfg, tokenizer, template)
    if not data.eval:
        raise ConfigError("data.eval_fraction", "the reward model needs held-out comparisons: set "
                          "data.eval_fraction > 0 or data.eval_source")
    k_slots = cfg.data.max_responses or max(e.k for e in data.train + data.eval)
    loader_cfg = dataclasses.replace(cfg.data, max_responses=k_slots)
    train = make_loader(data.train, loader_cfg, tokenizer, global_batch_size=cfg.train.global_batch_size,
                        seq_len=cfg.train.seq_len, seed=cfg.seed, images=images)
    return RMData(tokenizer, template, data, train, k_slots)


def ranking_batches(examples: Sequence[RankingExample], batch_size: int, k_slots: int, seq_len: int,
                    pad_id: int, images: Optional[ImageLayout] = None):
    """Every example once, in order, as [batch_size, K, T] numpy batches; the last is filled with
    empty rankings (all ranks 0), which add no pair to any metric. With an image layout each batch also
    holds the image slots of every line ([batch_size, K, M, H, W, C])."""
    empty = RankingExample((), ())
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        chunk += [empty] * (batch_size - len(chunk))
        batch = stack_rows([ranking_row(e, k_slots, seq_len, pad_id) for e in chunk])
        if images is not None:
            slots = np.stack([images.slots(e.images if e.k else None)[0] for e in chunk])  # [B, M, H, W, C]
            batch["images"] = np.repeat(slots[:, None], k_slots, axis=1)
            if images.prefix_lm:
                batch["prefix"] = prefix_flags(batch)
        yield batch


# ----------------------------------------------------------------------------- evaluation and normalization
def score_rankings(setup: RMSetup, params, examples: Sequence[RankingExample], k_slots: int, pad_id: int):
    """(raw rewards, ranks, lengths), each [N, K], for every example."""
    cfg = setup.cfg
    images = ImageLayout.of(cfg.model.vision)
    shardings = model_ranking_shardings(setup.mesh, setup.rules, cfg.model)
    rewards, ranks, lengths = [], [], []
    for batch in ranking_batches(examples, cfg.train.global_batch_size, k_slots, cfg.train.seq_len, pad_id, images):
        device = {k: put_global(batch[k], shardings[k]) for k in ranking_keys(cfg.model)}
        rewards.append(np.asarray(jax.device_get(setup.eval_step(params, device))))
        ranks.append(batch["ranks"])
        lengths.append(batch["lengths"])
    n = len(examples)
    return np.concatenate(rewards)[:n], np.concatenate(ranks)[:n], np.concatenate(lengths)[:n]


def evaluate_rm(setup: RMSetup, params, data: RMData, norm: dict = IDENTITY_NORM) -> dict:
    """eval_* metrics on every held-out comparison (scores normalized with `norm`)."""
    rewards, ranks, lengths = score_rankings(setup, params, data.data.eval, data.k_slots, data.tokenizer.pad_id)
    rewards = rewards * norm["gain"] + norm["bias"]
    metrics = ranking_metrics(rewards, ranks, lengths, setup.cfg.reward.margin, setup.cfg.reward.margin_buckets)
    return {f"eval_{k}": v for k, v in metrics.items()}


def reference_sequences(cfg: Config, data: RMData) -> list[np.ndarray]:
    """Token sequences of the reference demonstrations, each prompt + response + end-of-turn.

    reward.reference.source: sft conversations (the last assistant turn is the response) or
    comparisons (their best-ranked responses); "" = the best-ranked training responses. A seeded
    sample of at most reward.reference_max_examples.
    """
    ref = cfg.reward.reference
    if ref.source:
        records, stats = read_records(ref.source, ref, DataStats(name="reference"))
        rankings = []
        for _, record in records:
            if isinstance(record, Ranking):
                best = min(record.ranks)
                rankings += [Ranking(record.prompt, (a,), (1,)) for a, r in zip(record.responses, record.ranks)
                             if r == best]
            else:  # a conversation ending with the assistant's demonstration
                rankings.append(Ranking(tuple(record[:-1]), (record[-1]["content"],), (1,)))
        encoded = [encode_ranking(r, data.template, cfg.train.seq_len, ref.on_overlength, stats) for r in rankings]
        sequences = [e.responses[0].ids for e in encoded if e is not None]
    else:
        sequences = [resp.ids for e in data.data.train for resp, rank in zip(e.responses, e.ranks)
                     if rank == min(e.ranks)]
    if not sequences:
        raise ConfigError("reward.reference.source", "the reference set is empty")
    limit = cfg.reward.reference_max_examples
    if limit and len(sequences) > limit:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(sequences))[:limit])
        sequences = [sequences[i] for i in keep]
    return sequences


def normalize(setup: RMSetup, params, cfg: Config, data: RMData) -> tuple[dict, dict]:
    """(norm, report): gain and bias fitted on the reference set's raw scores; report has its stats after."""
    if cfg.model.vision.enabled:
        return normalize_with_images(setup, params, cfg, data)
    sequences = reference_sequences(cfg, data)
    kwargs = dict(seq_len=cfg.train.seq_len, batch_size=score_batch_size(cfg, setup.mesh), mesh=setup.mesh,
                  rules=setup.rules)
    raw = score_token_sequences(setup.score_step, params, IDENTITY_NORM, sequences, **kwargs)
    norm = fit_normalization(raw, cfg.reward.normalize_std)
    after = score_token_sequences(setup.score_step, params, norm, sequences, **kwargs)
    report = {"reference_count": len(sequences), "reference_raw_mean": float(raw.mean()),
              "reference_raw_std": float(raw.std()), "reference_mean": float(after.mean()),
              "reference_std": float(after.std())}
    return norm, report


def normalize_with_images(setup: RMSetup, params, cfg: Config, data: RMData) -> tuple[dict, dict]:
    """`normalize` for a reward model with images: the reference set is the best-ranked training answers, each
    scored with its prompt's images (as one-response rankings through the evaluation step)."""
    best = [RankingExample((resp,), (1,)) for e in data.data.train for resp, rank in zip(e.responses, e.ranks)
            if rank == min(e.ranks)]
    limit = cfg.reward.reference_max_examples
    if limit and len(best) > limit:
        best = [best[i] for i in np.sort(np.random.default_rng(cfg.seed).permutation(len(best))[:limit])]
    raw = score_rankings(setup, params, best, 1, data.tokenizer.pad_id)[0][:, 0]
    norm = fit_normalization(raw, cfg.reward.normalize_std)
    after = raw * norm["gain"] + norm["bias"]
    report = {"reference_count": len(best), "reference_raw_mean": float(raw.mean()),
              "reference_raw_std": float(raw.std()), "reference_mean": float(after.mean()),
              "reference_std": float(after.std())}
    return norm, report


# ----------------------------------------------------------------------------- the phase
class RMPhase(Phase):
    """The reward model on the one loop (train/loop.py). Its last step's row and checkpoint wait for
    finish(): normalization on the reference set, then the final evaluation on normalized scores."""

    name = "rm"
    defer_last = True

    def __init__(self, setup: RMSetup, data: RMData, workdir: str):
        cfg = setup.cfg
        self.setup, self.data, self.cfg, self.workdir = setup, data, cfg, workdir
        self.sharding = ranking_shardings(setup.mesh, setup.rules)["tokens"]  # the loader derives [B, K] from it
        self.tokens_per_step = cfg.train.global_batch_size * data.k_slots * cfg.train.seq_len
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.train.seq_len, output_size=1)
        self.batches, self.norm, self.result = None, None, {}

    def fresh_state(self):
        return fresh_state(self.setup)

    def begin(self, start: int) -> None:
        self.batches = self.data.train.iterate(start, self.sharding)

    def step(self, state, index: int):
        return self.setup.train_step(state, next(self.batches))

    def eval_due(self, done: int) -> bool:  # the last step's evaluation comes after normalization
        every, total = self.cfg.train.eval_every, self.cfg.train.steps
        return every > 0 and done % every == 0 and done != total

    def row(self, done: int, state, out, evaluate: bool) -> dict:
        row = super().row(done, state, out, evaluate)
        if evaluate:
            row.update(evaluate_rm(self.setup, state.params, self.data))
        return row

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.3f}"}

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def finish(self, state, done: int, last: dict, writer: MetricsWriter) -> tuple[dict, dict]:
        """Normalize on the reference demonstrations, then the final evaluation on normalized scores."""
        norm, norm_report = normalize(self.setup, state.params, self.cfg, self.data)
        log(f"normalization: gain {norm['gain']:.4f} bias {norm['bias']:.4f} "
            f"(reference raw mean {norm_report['reference_raw_mean']:.4f} over {norm_report['reference_count']})")
        final = evaluate_rm(self.setup, state.params, self.data, norm)
        final.update({k: v for k, v in last.items() if k != "step" and not k.startswith("eval_")})
        final.update({"norm_gain": norm["gain"], "norm_bias": norm["bias"], **norm_report})
        writer.write(done, final)
        self.norm, self.result = norm, {"step": done, **final}
        return self.result, {"norm": norm}

    def export(self, state) -> None:
        export_reward_model(self.workdir, state.params, self.norm, self.cfg.model)
        if jax.process_index() == 0:
            data = self.data.data
            files.write_text(files.join(self.workdir, EVAL_FILE), json.dumps(
                {**self.result, "data": {"train": data.train_stats.as_dict(), "eval": data.eval_stats.as_dict()}},
                indent=2))

    def summary(self, result: dict) -> None:
        log(self.data.report())
        log(f"done: step {result['step']} eval_accuracy {result['eval_accuracy']:.4f} "
            f"[{result['eval_accuracy_ci_low']:.4f}, {result['eval_accuracy_ci_high']:.4f}] over "
            f"{result['eval_pairs']} pairs; longer answer wins {result['eval_longer_wins']:.4f}; "
            f"length-balanced {result['eval_length_balanced_accuracy']:.4f}")


def run_rm(cfg: Config, workdir: str) -> dict:
    """Train, evaluate, normalize, export; returns the final evaluation (normalized scores)."""
    validate_reward(cfg)
    save_config(cfg, workdir)

    # ---- Mesh, Model, Shard, Update (validates the config against the devices first)
    setup = build_rm(cfg)
    log(f"mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")

    # ---- Input
    data = build_rm_data(cfg, workdir)
    log(f"{len(data.data.train)} training and {len(data.data.eval)} held-out rankings, K = {data.k_slots} slots")

    # ---- Checkpoint, Train, Normalize, Export: the one loop
    return run_phase(RMPhase(setup, data, workdir), cfg, workdir, setup.abstract_state)
