"""Metrics: metrics.jsonl and TensorBoard, tokens/s and MFU, a progress bar, profiling.

Each log interval the trainer writes one row (loss, lr, grad norm, tokens/s, MFU, ...) to
`<workdir>/metrics.jsonl` and to TensorBoard event files under `<workdir>/tensorboard`
(tensorboardX: the TensorFlow writers would need TensorFlow). Only process 0 writes, shows the
progress bar and profiles; every process may call the same functions.

MFU (model-FLOPs utilization, PaLM appendix B) = achieved model FLOPs / peak FLOPs. The model
FLOPs count only what the architecture needs (no rematerialisation, no padding waste), so MFU
is comparable across remat policies and implementations.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from instruct_jax import files
from instruct_jax.model.config import ModelConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PROFILE_DIR = "profile"


# ----------------------------------------------------------------------------- FLOPs and MFU
def model_flops_per_token(model_cfg: ModelConfig, seq_len: int, *, output_size: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward) per token of a batch of `seq_len`-token sequences.

    Two parts, as in PaLM's appendix B:
    * 6 x the weights of every matmul a token goes through: 2 FLOPs per multiply-add forward,
      and backward costs twice the forward. Per layer that is q (D -> N*H), k and v (D -> K*H
      each), o (N*H -> D), and SwiGLU's gate and up (D -> F) and down (F -> D); then the output
      projection D -> V, which is a real matmul even when it reuses (ties) the embedding table.
      The embedding lookup is a gather, not a matmul, and biases and norms are negligible.
    * Attention's two matmuls, scores q.k and the weighted sum over v: forward
      2 * 2 * seq_len * N * H per token per layer, times 3 for forward + backward. Each query is
      counted against all seq_len keys; the causal mask would halve this, and like PaLM we don't
      take that discount.

    `output_size` replaces the vocabulary for models with another head (1 for the reward
    model's scalar head).
    """
    m = model_cfg
    d, n, k, h, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    out = m.vocab_size if output_size is None else output_size
    attention_weights = d * n * h + 2 * d * k * h + n * h * d  # q, k + v, o
    mlp_weights = 3 * d * f  # gate, up, down
    matmul_weights = m.num_layers * (attention_weights + mlp_weights) + d * out
    attention_forward = 2 * 2 * seq_len * n * h * m.num_layers
    return float(6 * matmul_weights + 3 * attention_forward)


@functools.lru_cache(maxsize=None)
def measure_peak_flops(dtype: str = "float32") -> float:
    """Best matmul FLOP/s of ONE device on the default backend, for MFU when no peak is declared.

    Every local device multiplies its own n x n matrices at the same time (one jitted, sharded
    batched matmul), so devices that share hardware, like emulated CPU devices sharing cores,
    each get their share. n doubles until one multiply takes >= 50 ms, then the best of three
    is kept; about a second on CPU. Cached per process. Use the vendor peak on TPU/GPU
    (`LoggingConfig.peak_flops_per_device`): this only measures what XLA achieves here.
    """
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.array(devices), ("devices",)), PartitionSpec("devices"))
    matmul = jax.jit(lambda a, b: jnp.einsum("dij,djk->dik", a, b), out_shardings=sharding)
    n = 256
    while True:
        a = jax.device_put(jnp.ones((len(devices), n, n), dtype), sharding)
        matmul(a, a).block_until_ready()  # compile and warm up
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            matmul(a, a).block_until_ready()
            best = min(best, time.perf_counter() - start)
        if best >= 0.05 or n >= 8192:
            return 2.0 * n**3 / best
        n *= 2


def throughput(tokens: float, seconds: float, flops_per_token: float, num_devices: int,
               peak_flops_per_device: float) -> dict[str, float]:
    """tokens/s over all devices, and MFU = tokens/s * FLOPs per token / (devices * peak)."""
    tokens_per_sec = tokens / max(seconds, 1e-9)
    mfu = tokens_per_sec * flops_per_token / (num_devices * peak_flops_per_device)
    return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}


class StepTimer:
    """Tokens/s and MFU over the steps since the last `lap()`.

    JAX dispatches asynchronously, so call `lap()` right after the trainer has fetched the
    interval's metrics to the host (which waits for the device); call `reset()` after work that
    shouldn't count (the first step's compilation, evaluation, a blocking checkpoint).
    """

    def __init__(self, flops_per_token: float, num_devices: int, peak_flops_per_device: float):
        self.flops_per_token = flops_per_token
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()
        self._tokens = 0
        self._steps = 0

    def add(self, tokens: int) -> None:
        """Count one optimizer step that processed `tokens` tokens (over all hosts)."""
        self._tokens += tokens
        self._steps += 1

    def lap(self) -> dict[str, float]:
        """{"tokens_per_sec", "mfu", "step_time"} since the last lap/reset; starts a new interval."""
        seconds = time.perf_counter() - self._start
        result = throughput(self._tokens, seconds, self.flops_per_token, self.num_devices,
                            self.peak_flops_per_device)
        result["step_time"] = seconds / max(self._steps, 1)
        self.reset()
        return result


# ----------------------------------------------------------------------------- writers
def _plain(key: str, value: Any) -> Any:
    """Python ints, floats, bools and strings pass; jax/numpy scalars become float."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    array = np.asarray(value)  # fetches a jax.Array to the host
    if array.size != 1:
        raise ValueError(f"metric {key!r} must be a scalar, got shape {array.shape}")
    return float(array.reshape(()))


class MetricsWriter:
    """Append one JSON object per logged step to metrics.jsonl; mirror numbers to TensorBoard.

    Example line: {"step": 20, "loss": 2.31, "lr": 0.0003, "grad_norm": 0.9, "tokens_per_sec":
    5120.0, "mfu": 0.41}. Non-finite floats are written as NaN / Infinity (Python's json reads
    them back). The file is opened per write, so every row is on disk once `write` returns.
    `enabled` defaults to process 0 only; elsewhere every method does nothing.
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: Optional[bool] = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = files.join(workdir, METRICS_FILE)
        self.tensorboard_dir = files.join(workdir, TENSORBOARD_DIR)
        self._use_tensorboard = tensorboard
        self._tensorboard = None  # opened on first write, so truncate_after can set purge_step
        self._purge_step: Optional[int] = None
        self._tensorboard_mirror: Optional[str] = None  # local copy of a bucket's tensorboard folder
        if self.enabled:
            files.makedirs(workdir)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({key: _plain(key, value) for key, value in metrics.items() if key != "step"})
        files.append_text(self.path, json.dumps(row) + "\n")
        if self._use_tensorboard:
            writer = self._tensorboard_writer()
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=row["step"])
            writer.flush()
            if self._tensorboard_mirror:  # a bucket workdir: the events are written locally and uploaded whole
                files.copy_tree(self._tensorboard_mirror, self.tensorboard_dir)

    def _tensorboard_writer(self):
        if self._tensorboard is None:
            from tensorboardX import SummaryWriter  # imported here: only process 0 needs it

            local = self.tensorboard_dir
            if files.is_remote(local):
                # tensorboardX's own GCS writer streams through resumable uploads (it stalled against the GCS
                # emulator in tests); the events go to a local folder that `write` uploads after each flush.
                import tempfile

                self._tensorboard_mirror = local = tempfile.mkdtemp(prefix="instruct_jax_tensorboard_")
            self._tensorboard = SummaryWriter(local, purge_step=self._purge_step)
        return self._tensorboard

    def truncate_after(self, step: int) -> None:
        """Forget rows with step > `step`: call once with the step a resumed run starts from.

        Rows written after the restored checkpoint will be written again by the resumed run, so a
        restarted run ends with the same metrics.jsonl as an uninterrupted one. A half-written
        last line (the process was killed mid-write) is dropped too. TensorBoard event files are
        append-only; instead the next writer is opened with purge_step = step + 1, which tells
        TensorBoard to hide older events beyond that step.
        """
        if not self.enabled:
            return
        self._purge_step = step + 1
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if not files.exists(self.path):
            return
        kept = []
        for line in files.read_text(self.path).splitlines(keepends=True):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        files.write_text(self.path, "".join(kept))  # atomic: a crash here leaves the old or the new file whole

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def progress(total: int, initial: int = 0, desc: str = "", enabled: Optional[bool] = None):
    """A tqdm bar over optimizer steps, shown on process 0 only (a disabled bar elsewhere).

    The trainer calls `bar.update(1)` per step and `bar.set_postfix(loss=...)` per log interval;
    `initial` is the resumed step, so a restarted run's bar starts where it stopped.
    """
    from tqdm.auto import tqdm

    enabled = jax.process_index() == 0 if enabled is None else enabled
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


# ----------------------------------------------------------------------------- profiling
class Profiler:
    """A jax.profiler trace of steps [start_step, start_step + num_steps) into <workdir>/profile.

    Call `step(step)` at the top of every step, before dispatching it. start_step < 0 disables
    it; a run resumed inside the range traces the rest of it. Open the trace in TensorBoard's
    profile plugin or Perfetto. Only process 0 traces unless `enabled` says otherwise.
    """

    def __init__(self, workdir: str, start_step: int, num_steps: int, enabled: Optional[bool] = None):
        self.logdir = os.path.join(workdir, PROFILE_DIR)
        self.start_step = start_step
        self.stop_step = start_step + max(num_steps, 1)
        self.enabled = start_step >= 0 and (jax.process_index() == 0 if enabled is None else enabled)
        self.active = False
        self._done = False

    def step(self, step: int, block_on: Any = None) -> None:
        """Start or stop the trace at `step`. `block_on` (e.g. the last step's outputs) is waited
        for before stopping, so the traced steps' device work is inside the trace."""
        if not self.enabled or self._done:
            return
        if not self.active and self.start_step <= step < self.stop_step:
            jax.profiler.start_trace(self.logdir)
            self.active = True
        elif self.active and step >= self.stop_step:
            if block_on is not None:
                jax.block_until_ready(block_on)
            self.stop()

    def stop(self) -> None:
        """End an active trace (also call at the end of training, in case the range ran past it)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self._done = True


def log(msg: str) -> None:
    """Print on process 0 only (one line per event however many hosts run the job)."""
    if jax.process_index() == 0:
        print(msg, flush=True)
