"""The SFT / pretraining phase, top to bottom: Mesh -> Input -> Model -> Shard -> the one loop (train/loop.py).

Resumable by construction: the state (params, Adam moments, step, rng) lives in the
checkpoint, and the data order is a pure function of (seed, step), so a restarted run
restores the newest intact checkpoint and continues with exactly the batches it would
have seen. SIGTERM (TPU preemption) saves a checkpoint and exits cleanly (both: the loop).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import jax

from instruct_jax.model.lora import merged_for_export
from instruct_jax.checkpoint import export_params, load_params, resolve_params_dir
from instruct_jax.config import Config, save_config
from instruct_jax.data.build import LMData, build_lm_data
from instruct_jax.data.tokenizer import check_tokenizer_fits
from instruct_jax.errors import ConfigError
from instruct_jax.metrics import log, model_flops_per_token
from instruct_jax.parallel.sharding import batch_sharding
from instruct_jax.train.lm.build import LMSetup, build_lm
from instruct_jax.train.loop import Phase, run_phase


class Plateau:
    """Early stopping on eval_loss: `reached` once `patience` evaluations in a row failed to beat the
    best by more than `min_delta` (patience 0: never). Its state rides in the checkpoint meta, so a
    resumed run stops at the same step as an uninterrupted one."""

    def __init__(self, patience: int, min_delta: float, meta: dict):
        self.patience, self.min_delta = patience, min_delta
        self.best = float(meta.get("best_eval_loss", math.inf))
        self.evals_since_best = int(meta.get("evals_without_improvement", 0))

    def update(self, eval_loss: Optional[float]) -> None:
        if eval_loss is None:
            return
        if eval_loss < self.best - self.min_delta:
            self.best, self.evals_since_best = eval_loss, 0
        else:
            self.evals_since_best += 1

    @property
    def reached(self) -> bool:
        return self.patience > 0 and self.evals_since_best >= self.patience

    def meta(self) -> dict:
        return {"best_eval_loss": self.best, "evals_without_improvement": self.evals_since_best}


def evaluate_lm(setup: LMSetup, state, data: LMData, sharding) -> dict:
    if data.eval is None:
        return {}
    total, tokens = 0.0, 0.0
    for i in range(setup.cfg.train.eval_batches):
        out = setup.eval_step(state.params, data.eval.device_batch(i, sharding))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


class LMPhase(Phase):
    """SFT / pretraining on the one loop (train/loop.py): next-token loss, evaluation on held-out batches
    every train.eval_every steps and at the end, early stopping on eval_loss, the params export."""

    def __init__(self, setup: LMSetup, data: LMData, name: str, workdir: str):
        cfg = setup.cfg
        self.setup, self.data, self.name, self.cfg, self.workdir = setup, data, name, cfg, workdir
        self.sharding = batch_sharding(setup.mesh, setup.rules)
        self.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
        self.flops_per_token = model_flops_per_token(cfg.model, cfg.train.seq_len)
        self.plateau = Plateau(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta, {})
        self.batches = None

    def fresh_state(self):
        init_from, params = self.cfg.train.init_from, None
        if init_from:
            params = load_params(resolve_params_dir(init_from), self.setup.abstract_state.params, self.cfg.seed)
            log(f"initialised params from {init_from}")
        return self.setup.init_state(params=params)

    def restore(self, state, meta: dict):
        self.plateau = Plateau(self.cfg.train.early_stop_patience, self.cfg.train.early_stop_min_delta, meta)
        return state

    def meta(self, done: int) -> dict:
        return {"data_step": done, **self.plateau.meta()}

    def begin(self, start: int) -> None:
        self.batches = self.data.train.iterate(start, self.sharding)

    def step(self, state, index: int):
        return self.setup.train_step(state, next(self.batches))

    def eval_due(self, done: int) -> bool:
        every = self.cfg.train.eval_every
        return done == self.cfg.train.steps or (every > 0 and done % every == 0)

    def row(self, done: int, state, out, evaluate: bool) -> dict:
        row = super().row(done, state, out, evaluate)
        if evaluate:
            row.update(evaluate_lm(self.setup, state, self.data, self.sharding))
            self.plateau.update(row.get("eval_loss"))
            row["evals_without_improvement"] = self.plateau.evals_since_best
        return row

    def stop_early(self) -> Optional[str]:
        if not self.plateau.reached:
            return None
        return (f"eval_loss has not improved on {self.plateau.best:.4f} for {self.plateau.evals_since_best} "
                f"evaluations (train.early_stop_patience)")

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()

    def export(self, state) -> None:
        export_params(os.path.join(self.workdir, "params"), merged_for_export(state.params, self.cfg.model))

    def summary(self, result: dict) -> None:
        log(self.data.report())
        if result:
            log(f"done: step {result['step']} loss {result['loss']:.4f}" +
                (f" eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""))


def run_lm(cfg: Config, workdir: str, phase: str = "sft") -> dict:
    """Train; return the last logged metrics (plus eval). `phase` is "sft" or "pretrain"."""
    expected = {"sft": "sft", "pretrain": "text"}[phase]
    if cfg.data.format != expected:
        raise ConfigError("data.format", f"the {phase} command needs format {expected!r}, got {cfg.data.format!r}")
    save_config(cfg, workdir)

    # ---- Mesh, Model, Shard, Update (validates the config against the devices first)
    setup = build_lm(cfg)
    log(f"mesh {dict(setup.mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} devices")

    # ---- Input
    data = build_lm_data(cfg, workdir)
    check_tokenizer_fits(data.tokenizer, cfg.model)

    # ---- Checkpoint, Train, Export: the one loop
    return run_phase(LMPhase(setup, data, phase, workdir), cfg, workdir, setup.abstract_state)
