"""Sequence parallelism through the SFT, reward and PPO steps, and a 32,768-token train step on CPU.

With the `sequence` mesh axis > 1 the logical activation axis "length" is split over it
(config.DEFAULT_RULES) and `auto` attention becomes ring attention; every step must then give
the single-device result, and the compiled SFT step must never gather the sequence back.
"""

import jax
import numpy as np
import pytest

from instruct_jax.config import Config, OptimConfig, TrainConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.train.lm.build import build_lm
from instruct_jax.train.rm.trainer import build_rm

from test_ppo_mesh import one_iteration
from test_reward_model import loss_and_grads, ranking_batch, rm_config
from test_sharding import random_batch, run_steps, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


def long_cfg(impl: str, seq_len: int = 32, **mesh) -> Config:
    cfg = tiny_cfg(**mesh)
    cfg.model.attention, cfg.model.attention_block_q, cfg.model.attention_block_kv = impl, 4, 4
    cfg.model.max_seq_len = cfg.train.seq_len = seq_len
    return cfg


def test_sft_step_with_sequence_parallel_ring_equals_single_device():
    batch = random_batch(seq=32, seed=0)
    _, want, want_loss = run_steps(long_cfg("reference", data=1), jax.devices()[:1], [batch])
    setup = build_lm(long_cfg("auto", sequence=8), jax.devices())
    step = setup.train_step.lower(setup.init_state(), batch).compile()
    # The compiled step keeps activations split over `sequence`: K/V chunks travel by
    # collective-permute (the ring) and nothing is ever all-gathered back to full length.
    hlo = step.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo
    got, metrics = step(setup.init_state(), batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_loss[0], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(got.params), jax.device_get(want.params))


@pytest.mark.slow
def test_reward_step_with_sequence_parallel_ring_equals_single_device():
    single = build_rm(rm_config(MeshConfig(fsdp=1)), devices=jax.devices()[:1])
    cfg = rm_config(MeshConfig(data=2, fsdp=1, sequence=4))
    cfg.model.attention_block_q = cfg.model.attention_block_kv = 2
    sharded = build_rm(cfg)
    params = jax.device_get(single.init_state().params)
    batch = ranking_batch()
    loss_1, grads_1 = loss_and_grads(single, params, batch, 1)
    loss_s, grads_s = loss_and_grads(sharded, sharded.init_state(params=params).params, batch, 1)
    assert loss_s == pytest.approx(loss_1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ppo_iteration_with_sequence_parallel_equals_single_device():
    """Experience + PPO update (prompt 8 + response 12 = 20 tokens, 5 per device) on data 2 x sequence 4."""
    (exp1, stats1, new1, upd1) = one_iteration(MeshConfig(fsdp=-1), jax.devices()[:1])
    (exp8, stats8, new8, upd8) = one_iteration(MeshConfig(data=2, fsdp=1, sequence=4), jax.devices())
    for k in stats1:
        np.testing.assert_allclose(stats8[k], stats1[k], rtol=2e-5, atol=2e-6, err_msg=k)
    for k in upd1:
        np.testing.assert_allclose(upd8[k], upd1[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # the parameter tolerance of test_ppo_mesh (a tenth of one Adam step)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), (new8.policy, new8.value),
                 (new1.policy, new1.value))


def packed_long_batch(seq_len: int, docs: int, vocab: int, seed: int = 0) -> dict:
    """One row of `docs` packed examples of seq_len / docs tokens each."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (1, seq_len)).astype(np.int32)
    doc_len = seq_len // docs
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "loss_mask": np.ones((1, seq_len), np.float32),
            "positions": np.tile(np.arange(doc_len, dtype=np.int32), docs)[None],
            "segment_ids": np.repeat(np.arange(1, docs + 1, dtype=np.int32), doc_len)[None]}


@pytest.mark.slow
def test_train_step_at_32k_tokens_on_8_cpu_devices():
    """GPT-4's context: one 32,768-token row (four packed 8,192-token examples) through a train step,
    the sequence split 8 ways (ring attention); the loss is finite and the step updates the weights."""
    seq_len = 32768
    cfg = Config(model=ModelConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                   head_dim=8, mlp_dim=32, max_seq_len=seq_len, attention="auto",
                                   attention_block_q=1024, attention_block_kv=1024),
                 mesh=MeshConfig(fsdp=1, sequence=8), optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
                 train=TrainConfig(steps=1, global_batch_size=1, seq_len=seq_len))
    setup = build_lm(cfg)
    state = setup.init_state()
    before = jax.device_get(state.params["layers"]["attn"]["q"])
    batch = packed_long_batch(seq_len, docs=4, vocab=64)
    step = setup.train_step.lower(state, batch).compile()
    # Linear memory: XLA's plan for the whole step needs far less than one 8k x 8k score matrix (256 MB).
    assert step.memory_analysis().temp_size_in_bytes < 64e6
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["target_tokens"]) == seq_len
    assert not np.allclose(jax.device_get(state.params["layers"]["attn"]["q"]), before)


def test_eval_step_with_loss_chunk_never_holds_the_logits():
    """model.loss_chunk applies to the evaluation too: its compiled temporaries do not grow with length x
    vocabulary (without it they hold a [B, T, V] float32 logits tensor), and the loss equals the unchunked one.
    Blockwise attention keeps the rest of the step linear in length."""
    import dataclasses

    from instruct_jax.train.step import make_eval_step

    b, v = 4, 4096
    temp, logits_bytes = {}, {}
    for t in (256, 1024):
        logits_bytes[t] = b * t * v * 4  # 16 and 64 MiB
        cfg = Config(model=ModelConfig(vocab_size=v, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                       head_dim=16, mlp_dim=64, max_seq_len=t, attention="blockwise",
                                       attention_block_q=64, attention_block_kv=64),
                     mesh=MeshConfig(fsdp=-1), train=TrainConfig(steps=1, global_batch_size=b, seq_len=t))
        setup = build_lm(cfg, jax.devices()[:1])
        params = setup.init_state().params
        batch = random_batch(batch=b, seq=t, vocab=v)
        out = {}
        for chunk in (0, 32):
            model = type(setup.model)(dataclasses.replace(cfg.model, loss_chunk=chunk))
            compiled = make_eval_step(model, setup.mesh, setup.rules, setup.state_shardings.params).lower(
                params, batch).compile()
            temp[t, chunk] = compiled.memory_analysis().temp_size_in_bytes
            out[chunk] = jax.device_get(compiled(params, batch))
        assert out[32]["tokens"] == out[0]["tokens"]
        np.testing.assert_allclose(out[32]["loss_sum"], out[0]["loss_sum"], rtol=1e-5)
        assert temp[t, 0] >= logits_bytes[t], temp  # the unchunked evaluation holds the logits
    # Chunked: 4x the length adds a few percent of the logits' growth (measured 2.6 -> 3.6 MiB vs 16 -> 64 MiB).
    assert temp[1024, 32] - temp[256, 32] < 0.05 * (logits_bytes[1024] - logits_bytes[256]), temp
    assert temp[1024, 32] < logits_bytes[256] / 3, temp
