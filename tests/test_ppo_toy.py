"""A short PPO run on the toy reward (count of one token) on the 8-device mesh: the score rises by a large
margin while the KL to the reference stays finite (docs/PPO.md records the numbers)."""

import math

import jax
import numpy as np
import pytest

from ppo_toy import toy_config, toy_setup, run_toy

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")


def test_toy_reward_rises_by_a_large_margin_with_finite_kl():
    cfg = toy_config(steps=30)  # data 2 x fsdp 4, 16 prompts, 12-token responses, 2 epochs x 2 minibatches
    setup, state, ref = toy_setup(cfg)
    state, history = run_toy(setup, state, ref, iterations=30)
    scores = np.array([h["score"] for h in history])
    kls = np.array([h["kl"] for h in history])
    start, end = scores[:3].mean(), scores[-3:].mean()
    print(f"toy score {start:.3f} -> {end:.3f}; kl {kls[-1]:.3f}; entropy {history[0]['entropy']:.3f} -> "
          f"{history[-1]['entropy']:.3f}")
    assert end > start + 2.0 and end > 4 * start  # a random policy emits the token ~12/64 = 0.19 times
    assert all(math.isfinite(k) for k in kls) and kls[-1] < 50.0
    assert history[-1]["entropy"] < history[0]["entropy"]
    assert all(abs(h["approx_kl_first"]) < 1e-10 for h in history)  # ratio 1 on every first minibatch
    assert max(h["logprob_mismatch"] for h in history) < 1e-4
    assert int(jax.device_get(state.policy.step)) == 30 * 4
