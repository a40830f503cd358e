"""The DPO phase, top to bottom: Mesh -> Model -> Shard -> Update -> Input -> the one loop (train/loop.py).

    python -m instruct_jax dpo --experiment experiments/tiny_cpu.py:dpo --workdir runs/tiny-dpo

The policy starts from `train.init_from` (an SFT export or workdir) and so does the frozen reference, loaded
separately (the policy's buffers are donated to each step, the reference's never). Without `train.init_from`
both start from the seeded init (tests). The reference's log-probs are computed on the fly in each step (a
second forward without gradients), so nothing is cached on disk and a resumed run needs only the checkpoint.
Rankings are the reward model's (`data`, format pairwise or ranking, or `reward.synthetic`), read by its data
path (train/rm/trainer.py `build_rm_data`). Each evaluation scores every held-out ranking with the implicit
reward and logs the reward model's metrics on it (eval_accuracy with its CI, the longer-answer baseline, ...).
The end: the params export `<workdir>/params`, an LM export like SFT's, which `eval`, `chat` and PPO read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import numpy as np

from instruct_jax.model.lora import base_is_reference, merged_for_export
from instruct_jax.checkpoint import export_params, load_params, resolve_params_dir
from instruct_jax.config import DPO_LOSSES, Config, save_config
from instruct_jax.data.tokenizer import check_tokenizer_fits
from instruct_jax.errors import ConfigError
from instruct_jax.inference.scorer import put_global
from instruct_jax.metrics import log, model_flops_per_token
from instruct_jax.train.dpo.step import DPO_KEYS, dpo_shardings, make_dpo_eval_step, make_dpo_train_step
from instruct_jax.train.guards import GuardConfig
from instruct_jax.train.loop import Phase, run_phase
from instruct_jax.train.rm.ranking import ranking_metrics
from instruct_jax.train.rm.trainer import RMData, build_rm_data, ranking_batches
from instruct_jax.train.lm.build import build_lm
from instruct_jax.train.state import PhaseSetup


class DPOSetup(PhaseSetup):
    """The DPO phase's setup: `model` is the policy's Transformer; `train_step(state, reference, batch)`,
    `eval_step(params, reference, batch)` -> implicit rewards [B, K]."""


def validate_dpo(cfg: Config) -> None:
    d = cfg.dpo
    if cfg.data.format not in ("pairwise", "ranking"):
        raise ConfigError("data.format", f"the dpo command reads 'pairwise' or 'ranking' data, got {cfg.data.format!r}")
    if d.loss not in DPO_LOSSES:
        raise ConfigError("dpo.loss", f"expected one of {list(DPO_LOSSES)}, got {d.loss!r}")
    if not d.beta > 0:
        raise ConfigError("dpo.beta", f"must be > 0, got {d.beta}")
    if cfg.reward.synthetic and cfg.data.source:
        raise ConfigError("reward.synthetic", f"{cfg.reward.synthetic} generated rankings would replace "
                          f"data.source={cfg.data.source!r}; set one of the two")


def build_dpo(cfg: Config, devices: Optional[Sequence] = None) -> DPOSetup:
    # ---- Mesh, Model, Shard: the policy is the LM, sharded and optimised exactly as in SFT (build_lm)
    lm = build_lm(cfg, devices)
    # ---- Update
    train_step = make_dpo_train_step(lm.model, lm.tx, lm.schedule, lm.mesh, lm.rules, lm.state_shardings,
                                     cfg.train.microbatches, cfg.dpo.beta, cfg.dpo.loss,
                                     GuardConfig.from_train(cfg.train))
    eval_step = make_dpo_eval_step(lm.model, lm.mesh, lm.rules, lm.state_shardings.params, cfg.dpo.beta)
    fields = {f.name: getattr(lm, f.name) for f in dataclasses.fields(lm)}
    return DPOSetup(**{**fields, "train_step": train_step, "eval_step": eval_step})


def starting_params(setup: DPOSetup) -> Any:
    """The policy's starting params (a new copy each call): `train.init_from`, else the seeded init."""
    init_from = setup.cfg.train.init_from
    if init_from:
        return load_params(resolve_params_dir(init_from), setup.abstract_state.params, setup.cfg.seed)
    return setup.init_state().params


def implicit_rewards(setup: DPOSetup, params, reference, data: RMData):
    """(implicit rewards, ranks, lengths), each [N, K], for every held-out ranking."""
    shardings = dpo_shardings(setup.mesh, setup.rules)
    cfg = setup.cfg
    rewards, ranks, lengths = [], [], []
    for batch in ranking_batches(data.data.eval, cfg.train.global_batch_size, data.k_slots, cfg.train.seq_len,
                                 data.tokenizer.pad_id):
        device = {k: put_global(batch[k], shardings[k]) for k in DPO_KEYS}
        rewards.append(np.asarray(jax.device_get(setup.eval_step(params, reference, device))))
        ranks.append(batch["ranks"])
        lengths.append(batch["lengths"])
    n = len(data.data.eval)
    return np.concatenate(rewards)[:n], np.concatenate(ranks)[:n], np.concatenate(lengths)[:n]


def evaluate_dpo(setup: DPOSetup, params, reference, data: RMData) -> dict:
    """eval_* metrics of the implicit reward on every held-out ranking (eval_loss: the sigmoid DPO loss)."""
    rewards, ranks, lengths = implicit_rewards(setup, params, reference, data)
    metrics = ranking_metrics(rewards, ranks, lengths, 0.0, setup.cfg.reward.margin_buckets)
    return {f"eval_{k}": v for k, v in metrics.items()}


class DPOPhase(Phase):
    """DPO on the one loop: the preference loss against the frozen reference, evaluation of the implicit reward
    on held-out rankings every train.eval_every steps and at the end, the params export."""

    name = "dpo"

    def __init__(self, setup: DPOSetup, data: RMData, reference, workdir: str):
        cfg = setup.cfg
        self.setup, self.data, self.reference, self.cfg, self.workdir = setup, data, reference, cfg, workdir
        self.sharding = dpo_shardings(setup.mesh, setup.rules)["tokens"]
        self.tokens_per_step = cfg.train.global_batch_size * data.k_slots * cfg.train.seq_len
        # forward + backward of the policy, plus the reference's forward (a third of a training step)
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.train.seq_len) * 4 / 3
        self.batches = None

    def fresh_state(self):
        if self.cfg.train.init_from:
            log(f"initialised the policy and the reference from {self.cfg.train.init_from}")
        return self.setup.init_state(params=starting_params(self.setup))

    def begin(self, start: int) -> None:
        self.batches = self.data.train.iterate(start, self.sharding)

    def step(self, state, index: int):
        return self.setup.train_step(state, self.reference, next(self.batches))

    def eval_due(self, done: int) -> bool:
        every = self.cfg.train.eval_every
        return done == self.cfg.train.steps or (every > 0 and done % every == 0)

    def row(self, done: int, state, out, evaluate: bool) -> dict:
        row = super().row(done, state, out, evaluate)
        if evaluate:
            row.update(evaluate_dpo(self.setup, state.params, self.reference, self.data))
        return row

    def postfix(self, row: dict) -> dict:
        return {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.3f}", "margin": f"{row['margin']:.3f}"}

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def export(self, state) -> None:
        export_params(f"{self.workdir.rstrip('/')}/params", merged_for_export(state.params, self.cfg.model))

    def summary(self, result: dict) -> None:
        log(self.data.report())
        if result and "eval_accuracy" in result:
            log(f"done: step {result['step']} loss {result['loss']:.4f}; implicit reward on held-out rankings: "
                f"eval_accuracy {result['eval_accuracy']:.4f} [{result['eval_accuracy_ci_low']:.4f}, "
                f"{result['eval_accuracy_ci_high']:.4f}] over {result['eval_pairs']} pairs, longer answer wins "
                f"{result['eval_longer_wins']:.4f}")


def run_dpo(cfg: Config, workdir: str) -> dict:
    """Train the policy on the rankings with DPO (or IPO); return the last row (with the final evaluation)."""
    validate_dpo(cfg)
    save_config(cfg, workdir)

    # ---- Mesh, Model, Shard, Update (validates the config against the devices first)
    setup = build_dpo(cfg)
    log(f"mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")

    # ---- Input
    data = build_rm_data(cfg, workdir)
    check_tokenizer_fits(data.tokenizer, cfg.model)
    log(f"{len(data.data.train)} training and {len(data.data.eval)} held-out rankings, K = {data.k_slots} slots; "
        f"{cfg.dpo.loss} loss, beta {cfg.dpo.beta}")

    # ---- the frozen reference, then Checkpoint, Train, Export: the one loop
    reference = {} if base_is_reference(cfg.model) else starting_params(setup)  # LoRA: the policy's frozen base
    return run_phase(DPOPhase(setup, data, reference, workdir), cfg, workdir, setup.abstract_state)


__all__ = ["DPOPhase", "DPOSetup", "build_dpo", "evaluate_dpo", "run_dpo", "validate_dpo"]
