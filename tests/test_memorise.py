"""The tiny model memorises 16 demonstrations: assistant-token loss < 0.05 nats, greedy decoding reproduces them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from instruct_jax.config import Config, OptimConfig, TrainConfig
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.train.lm.build import build_lm

VOCAB, SEQ, EOT = 64, 24, 1


def demonstrations(n=16, seed=0):
    """(prompt, response) token lists; each response ends with the end-of-turn token."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = rng.integers(2, VOCAB, size=rng.integers(4, 9)).tolist()
        response = rng.integers(2, VOCAB, size=rng.integers(3, 8)).tolist() + [EOT]
        out.append((prompt, response))
    return out


def sft_batch(examples):
    """Right-padded rows; targets are next tokens; the loss covers response tokens only."""
    b = {k: np.zeros((len(examples), SEQ), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    b["loss_mask"] = np.zeros((len(examples), SEQ), np.float32)
    for i, (prompt, response) in enumerate(examples):
        seq = prompt + response
        n = len(seq)
        b["tokens"][i, :n] = seq
        b["targets"][i, :n - 1] = seq[1:]
        b["positions"][i, :n] = np.arange(n)
        b["segment_ids"][i, :n] = 1
        b["loss_mask"][i, len(prompt) - 1:n - 1] = 1.0  # predicting response tokens (incl. EOT)
    return b


def greedy(model, params, prompt, max_new=10):
    """Naive greedy decoding by full forward passes (a reference, not the production sampler)."""

    @functools.partial(jax.jit)
    def next_token(tokens, length):
        out = model.apply({"params": params}, ModelInput.unpacked(tokens, length))
        return jnp.argmax(out.logits[0, length[0] - 1])

    seq = list(prompt)
    for _ in range(max_new):
        tokens = np.zeros((1, SEQ), np.int32)
        tokens[0, :len(seq)] = seq
        tok = int(next_token(tokens, np.array([len(seq)], np.int32)))
        seq.append(tok)
        if tok == EOT:
            break
    return seq[len(prompt):]


def test_tiny_model_memorises_sixteen_demonstrations():
    cfg = Config(
        model=ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                          mlp_dim=128, max_seq_len=SEQ),
        mesh=MeshConfig(data=2, fsdp=4),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=10, decay="cosine", min_lr_ratio=0.05, grad_clip=1.0),
        train=TrainConfig(steps=300, global_batch_size=16, seq_len=SEQ))
    examples = demonstrations()
    batch = sft_batch(examples)
    setup = build_lm(cfg)
    state = setup.init_state()
    for _ in range(cfg.train.steps):
        state, metrics = setup.train_step(state, batch)
        jax.block_until_ready(metrics)  # see train/lm/trainer.py: bound the steps in flight on CPU
    out = setup.eval_step(state.params, batch)
    loss = float(out["loss_sum"] / out["tokens"])
    assert loss < 0.05, f"assistant-token loss {loss:.4f} after {cfg.train.steps} steps"
    params = jax.device_get(state.params)
    for prompt, response in examples:
        assert greedy(setup.model, params, prompt) == response
