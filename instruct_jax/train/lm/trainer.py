"""The SFT / pretraining loop, top to bottom: Mesh -> Input -> Model -> Shard -> Checkpoint -> Update.

Resumable by construction: the state (params, Adam moments, step, rng) lives in the
checkpoint, and the data order is a pure function of (seed, step), so a restarted run
restores the newest intact checkpoint and continues with exactly the batches it would
have seen. SIGTERM (TPU preemption) saves a checkpoint and exits cleanly.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import jax

from instruct_jax.checkpoint import CheckpointManager, PreemptionGuard, export_params, load_params, resolve_params_dir
from instruct_jax.config import Config, save_config
from instruct_jax.data.build import LMData, build_lm_data
from instruct_jax.data.tokenizer import check_tokenizer_fits
from instruct_jax.errors import ConfigError
from instruct_jax.metrics import (MetricsWriter, Profiler, StepTimer, log, measure_peak_flops, model_flops_per_token, progress)
from instruct_jax.parallel.sharding import batch_sharding
from instruct_jax.train.lm.build import LMSetup, build_lm
from instruct_jax.train.loop import maybe_kill, resume_latest, stop_diverged


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


def initial_state(setup: LMSetup, ckpt: CheckpointManager):
    """(state, step, meta): the newest intact checkpoint, else a fresh (or `init_from`) state."""
    resumed = resume_latest(ckpt, setup)
    if resumed is not None:
        return resumed
    init_from = setup.cfg.train.init_from
    params = None
    if init_from:
        params = load_params(resolve_params_dir(init_from), setup.abstract_state.params)
        log(f"initialised params from {init_from}")
    return setup.init_state(params=params), 0, {}


def evaluate(setup: LMSetup, state, data: LMData, sharding) -> dict:
    if data.eval is None:
        return {}
    total, tokens = 0.0, 0.0
    for i in range(setup.cfg.train.eval_batches):
        out = setup.eval_step(state.params, data.eval.device_batch(i, sharding))
        total += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = total / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


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
    sharding = batch_sharding(setup.mesh, setup.rules)

    # ---- Checkpoint
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), every_steps=cfg.checkpoint.every_steps,
                             keep=cfg.checkpoint.keep, keep_every=cfg.checkpoint.keep_every,
                             async_save=cfg.checkpoint.async_save)
    state, start, meta = initial_state(setup, ckpt)
    plateau = Plateau(cfg.train.early_stop_patience, cfg.train.early_stop_min_delta, meta)
    writer = MetricsWriter(workdir, tensorboard=cfg.logging.tensorboard)
    writer.truncate_after(start)  # a resumed run rewrites exactly the rows after its checkpoint

    # ---- Train
    peak = cfg.logging.peak_flops_per_device or measure_peak_flops()
    timer = StepTimer(model_flops_per_token(cfg.model, cfg.train.seq_len), jax.device_count(), peak)
    profiler = Profiler(workdir, cfg.logging.profile_start, cfg.logging.profile_steps)
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    total, last = cfg.train.steps, {}
    stop_at = start if plateau.reached else total  # a run that stopped early and is started again: done
    bar = progress(total, initial=start, desc=phase, enabled=cfg.logging.progress_bar and jax.process_index() == 0)
    batches = data.train.iterate(start, sharding)
    in_flight = None
    with PreemptionGuard() as guard:
        for step in range(start, stop_at):
            profiler.step(step, block_on=state)
            state, metrics = setup.train_step(state, next(batches))
            # At most two steps in flight: dispatch overlaps host work with the device, and on
            # emulated CPU devices an unbounded queue of collective programs can exhaust XLA's
            # thread pool and deadlock in its rendezvous. The guard's verdict on the previous step
            # is read here, once it is ready anyway (a latched guard skips this step too).
            limit = cfg.train.max_nonfinite_in_a_row
            diverged = in_flight is not None and int(in_flight["nonfinite_in_a_row"]) >= limit
            in_flight = metrics
            done = step + 1
            if diverged:
                writer.write(done, {k: float(v) for k, v in jax.device_get(metrics).items()})
                stop_diverged(phase, done, state, {"data_step": done}, limit, ckpt, writer)
            timer.add(tokens_per_step)
            bar.update(1)
            if done == start + 1:
                jax.block_until_ready(metrics)
                timer.reset()  # the first step includes compilation: keep it out of tokens/s
            eval_due = done == total or (cfg.train.eval_every > 0 and done % cfg.train.eval_every == 0)
            if eval_due or done % cfg.logging.log_every == 0:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                row.update(timer.lap())
                if eval_due:
                    row.update(evaluate(setup, state, data, sharding))
                    plateau.update(row.get("eval_loss"))
                    row["evals_without_improvement"] = plateau.evals_since_best
                writer.write(done, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                last = {"step": done, **row}
            if guard.should_stop():
                ckpt.save(done, state, {"data_step": done, **plateau.meta()}, force=True)
                ckpt.close()
                log(f"preemption signal received: saved checkpoint at step {done}, exiting cleanly")
                writer.close()
                return last
            if plateau.reached:
                log(f"early stop at step {done}: eval_loss has not improved on {plateau.best:.4f} for "
                    f"{plateau.evals_since_best} evaluations (train.early_stop_patience)")
                last["stopped_early"] = 1.0
                stop_at = done
                break
            ckpt.save(done, state, {"data_step": done, **plateau.meta()})
            maybe_kill(done)
    bar.close()
    profiler.stop()

    # ---- Final checkpoint, params export, data report
    ckpt.save(stop_at, state, {"data_step": stop_at, **plateau.meta()}, force=True)
    ckpt.wait()
    ckpt.close()
    export_params(os.path.join(workdir, "params"), state.params)
    writer.close()
    log(data.report())
    if last:
        log(f"done: step {last['step']} loss {last['loss']:.4f}" +
            (f" eval_loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""))
    return last
