"""Metrics: the FLOP count by hand, MFU arithmetic, metrics.jsonl, TensorBoard, profiling."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from instruct_jax import metrics
from instruct_jax.model.config import ModelConfig

TINY = ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   mlp_dim=256)


# ----------------------------------------------------------------------------- FLOPs
def test_flops_per_token_matches_a_hand_count():
    seq_len = 128
    # Matmul weights one token passes through, per layer (D=64, N=4 heads, K=2 kv heads, H=16, F=256):
    q = 64 * 4 * 16  # 4096    D -> N*H
    k = 64 * 2 * 16  # 2048    D -> K*H
    v = 64 * 2 * 16  # 2048    D -> K*H
    o = 4 * 16 * 64  # 4096    N*H -> D
    gate = 64 * 256  # 16384   D -> F
    up = 64 * 256  # 16384     D -> F
    down = 256 * 64  # 16384   F -> D
    per_layer = q + k + v + o + gate + up + down  # 61440
    output = 64 * 256  # 16384 D -> V (the embedding lookup is not counted)
    weights = 2 * per_layer + output  # 139264
    assert weights == 139264
    # 2 FLOPs per multiply-add forward, x3 for forward + backward:
    weight_flops = 6 * weights  # 835584
    # Attention q.k and p.v: 2 matmuls x 2 FLOPs x seq_len keys x N*H, per layer, forward; x3 for training.
    attention_flops = 3 * (2 * 2 * 128 * 4 * 16 * 2)  # 3 * 65536 = 196608
    assert metrics.model_flops_per_token(TINY, seq_len) == weight_flops + attention_flops == 1032192


def test_flops_tied_embeddings_and_scalar_head():
    tied = ModelConfig(**{**TINY.__dict__, "tie_embeddings": True})
    # A tied output projection is still a D x V matmul.
    assert metrics.model_flops_per_token(tied, 128) == metrics.model_flops_per_token(TINY, 128)
    # A reward model's scalar head replaces D x V (16384 weights) with D x 1 (64 weights).
    assert metrics.model_flops_per_token(TINY, 128) - metrics.model_flops_per_token(TINY, 128, output_size=1) \
        == 6 * (64 * 256 - 64)


# ----------------------------------------------------------------------------- MFU
def test_throughput_arithmetic():
    out = metrics.throughput(tokens=1000, seconds=2.0, flops_per_token=1e6, num_devices=4,
                             peak_flops_per_device=1e9)
    assert out["tokens_per_sec"] == 500.0
    assert out["mfu"] == pytest.approx(500.0 * 1e6 / (4 * 1e9))  # 0.125


def test_step_timer_laps(monkeypatch):
    clock = iter([10.0, 14.0, 14.0])  # reset at 10 s; lap at 14 s; the lap's own reset
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = metrics.StepTimer(flops_per_token=2e6, num_devices=8, peak_flops_per_device=1e9)
    for _ in range(4):
        timer.add(tokens=1024)
    out = timer.lap()
    assert out["tokens_per_sec"] == 1024.0  # 4096 tokens in 4 s
    assert out["step_time"] == 1.0
    assert out["mfu"] == pytest.approx(1024 * 2e6 / 8e9)


def test_measured_peak_is_a_plausible_rate():
    peak = metrics.measure_peak_flops()
    assert math.isfinite(peak) and 1e6 < peak < 1e16
    assert metrics.measure_peak_flops() == peak  # cached: measured once per process


# ----------------------------------------------------------------------------- writers
def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metrics_jsonl_fields_and_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), enabled=True)
    for step in (10, 20, 30):
        writer.write(step, {"loss": jnp.float32(2.5), "lr": np.float64(3e-4), "grad_norm": jnp.array(0.75),
                            "tokens_per_sec": 5120.0, "mfu": 0.4, "phase": "sft"})
    writer.close()
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    for row in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(row)
        assert type(row["loss"]) is float and row["loss"] == 2.5 and row["grad_norm"] == 0.75
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))

    with pytest.raises(ValueError, match="scalar"):
        metrics.MetricsWriter(str(tmp_path), tensorboard=False, enabled=True).write(40, {"loss": jnp.ones(3)})


def test_truncate_after_drops_later_rows_and_a_torn_line(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    for step in (10, 20, 30):
        writer.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # a write cut short by SIGKILL
    resumed = metrics.MetricsWriter(str(tmp_path), tensorboard=False, enabled=True)
    resumed.truncate_after(20)
    resumed.write(30, {"loss": 30.0})
    assert [r["step"] for r in read_rows(tmp_path / "metrics.jsonl")] == [10, 20, 30]


def test_disabled_writer_writes_nothing(tmp_path):
    writer = metrics.MetricsWriter(str(tmp_path / "w"), enabled=False)
    writer.write(1, {"loss": 1.0})
    writer.truncate_after(0)
    writer.close()
    assert not os.path.exists(tmp_path / "w")


def test_progress_bar_only_where_enabled():
    assert metrics.progress(10, initial=3, enabled=False).disable
    bar = metrics.progress(10, initial=3, desc="sft", enabled=True)
    assert not bar.disable and bar.n == 3
    bar.close()


# ----------------------------------------------------------------------------- profiling
def test_profiler_traces_the_configured_range(tmp_path):
    off = metrics.Profiler(str(tmp_path / "off"), start_step=-1, num_steps=3, enabled=True)
    for step in range(3):
        off.step(step)
    assert not off.active and not os.path.exists(tmp_path / "off" / "profile")

    profiler = metrics.Profiler(str(tmp_path), start_step=1, num_steps=1, enabled=True)
    profiler.step(0)
    assert not profiler.active
    profiler.step(1)
    assert profiler.active
    result = jnp.ones(4) * 2
    profiler.step(2, block_on=result)
    assert not profiler.active
    traced = [name for _, _, names in os.walk(tmp_path / "profile") for name in names]
    assert traced, "jax.profiler wrote no trace files"
