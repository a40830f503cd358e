"""ppo.reward = "host": a Python function scores each rollout between sampling and the experience step (the
pipeline's oracle run passes the gold judge). The scores must land on the rows they were computed for."""

import dataclasses
import json

import numpy as np
import pytest

from conftest import REPO
from instruct_jax.config import load_experiment
from instruct_jax.errors import ConfigError
from instruct_jax.rl.ppo.trainer import run_ppo


def config(**ppo):
    cfg = load_experiment(str(REPO / "experiments" / "tiny_ppo.py:toy"))
    cfg.train = dataclasses.replace(cfg.train, steps=3, global_batch_size=16, init_from="")
    cfg.checkpoint.every_steps = 0
    cfg.logging = dataclasses.replace(cfg.logging, log_every=1, progress_bar=False, tensorboard=False)
    cfg.ppo = dataclasses.replace(cfg.ppo, synthetic_prompts=64, response_len=8, epochs=1, minibatches=2,
                                  log_samples=16, **ppo)
    return cfg


def characters(text: str) -> float:
    """The test's reward: a quarter of the response's length in characters (different on most rows)."""
    return len(text) / 4.0


def test_host_scores_reach_their_own_rows(tmp_path):
    seen = []

    def reward(prompts, responses):
        assert len(prompts) == len(responses) == 16 and all(p.ndim == 1 and len(p) > 0 for p in prompts)
        seen.append(list(responses))
        return np.array([characters(r) for r in responses])

    last = run_ppo(config(reward="host", count_text=""), str(tmp_path), host_reward=reward)
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(seen) == 3 and [m["step"] for m in metrics] == [1, 2, 3]
    for step, texts in enumerate(seen, start=1):
        logged = [s for s in samples if s["step"] == step]
        # row i of the rollout: the response the function scored, and the score it gave
        assert [s["response"] for s in logged] == texts
        np.testing.assert_allclose([s["score"] for s in logged], [characters(t) for t in texts], rtol=1e-6)
        np.testing.assert_allclose(metrics[step - 1]["score"], np.mean([characters(t) for t in texts]), rtol=1e-5)
    assert last["step"] == 3


def test_host_reward_needs_a_function_and_nothing_beside_it(tmp_path):
    with pytest.raises(ConfigError, match="ppo.reward"):
        run_ppo(config(reward="host", count_text=""), str(tmp_path))  # what the ppo command would do
    with pytest.raises(ConfigError, match="ppo.reward"):
        run_ppo(config(), str(tmp_path), host_reward=lambda p, r: np.zeros(len(r)))  # count ignores it
    with pytest.raises(ConfigError, match="ppo.reward_model"):
        run_ppo(config(reward="host", count_text="", reward_model="runs/rm"), str(tmp_path),
                host_reward=lambda p, r: np.zeros(len(r)))


def test_rloo_with_a_host_reward_scores_each_sample_of_a_group(tmp_path):
    """The verifier case of critic-free RL: 8 prompts x 4 samples; the function sees every sample with its own
    prompt (each prompt 4 times in a row) and the scores land on their rows."""
    seen = []

    def reward(prompts, responses):
        assert len(prompts) == len(responses) == 32
        for g in range(8):  # rows 4g .. 4g + 3: one prompt, four samples
            assert all(np.array_equal(prompts[4 * g], prompts[4 * g + j]) for j in range(4))
        assert not np.array_equal(prompts[0], prompts[4])
        seen.append(list(responses))
        return np.array([characters(r) for r in responses])

    cfg = config(reward="host", count_text="", algorithm="rloo", group_size=4)
    cfg.ppo.log_samples = 32
    cfg.train = dataclasses.replace(cfg.train, global_batch_size=32)
    run_ppo(cfg, str(tmp_path), host_reward=reward)
    samples = [json.loads(line) for line in open(tmp_path / "samples.jsonl")]
    assert len(seen) == 3
    for step, texts in enumerate(seen, start=1):
        logged = [s for s in samples if s["step"] == step]
        assert [s["response"] for s in logged] == texts
        np.testing.assert_allclose([s["score"] for s in logged], [characters(t) for t in texts], rtol=1e-6)
    assert not (tmp_path / "value_params").exists()
