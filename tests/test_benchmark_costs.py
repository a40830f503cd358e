"""The cost model behind docs/BENCHMARKS.md: weight counts, FLOPs and bytes of a generate call, its floor."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import common  # noqa: E402
import generate  # noqa: E402

from instruct_jax.model.transformer import Transformer  # noqa: E402
from instruct_jax.model.transformer import init_params_boxed  # noqa: E402
from instruct_jax.parallel.sharding import unbox  # noqa: E402


@pytest.mark.parametrize("tie", [True, False])
def test_param_count_is_the_models(tie):
    cfg = common.tiny_model(tie_embeddings=tie)
    shapes = jax.eval_shape(lambda: unbox(init_params_boxed(Transformer(cfg), jax.random.PRNGKey(0))))
    assert common.param_count(cfg) == sum(x.size for x in jax.tree.leaves(shapes))


def test_decode_costs_by_hand():
    """One layer, d 4, 1 head of 4, 1 KV head, MLP 8, vocabulary 10, tied: every term counted by hand."""
    cfg = common.tiny_model(num_layers=1, d_model=4, num_heads=1, num_kv_heads=1, head_dim=4, mlp_dim=8,
                            vocab_size=10, tie_embeddings=True)
    weights = 4 * 4 * 3 + 4 * 4 + 3 * 4 * 8 + 2 * 4 + 10 * 4 + 4  # q k v, o, mlp, 2 norms, table, final norm
    matmul = weights - 4 * 3  # less the three norm scales
    assert common.param_count(cfg) == weights
    batch, prompt, new = 2, 3, 3
    c = generate.decode_costs(cfg, batch, prompt, new)
    attn = lambda length: 4 * length * 4  # noqa: E731  QK^T and PV, 2 FLOPs each, head_dim 4, one head
    assert c["prefill_flops"] == batch * (prompt * 2 * matmul + attn(1) + attn(2) + attn(3))
    # decode steps i = 1, 2: position prompt + i attends to prompt + i + 1 tokens
    assert c["step_flops"] == [batch * (2 * matmul + attn(5)), batch * (2 * matmul + attn(6))]
    kv = 2 * 4  # keys and values of one token, one layer
    assert c["step_bytes"] == [4 * (weights + batch * kv * 4), 4 * (weights + batch * kv * 5)]
    assert c["flops"] == c["prefill_flops"] + sum(c["step_flops"]) and c["bytes_read"] == sum(c["step_bytes"])


def test_floor_takes_the_binding_limit_per_step():
    c = {"prefill_flops": 100.0, "step_flops": [10.0, 40.0], "step_bytes": [30.0, 20.0]}
    # peak 10 FLOP/s, bandwidth 10 B/s: prefill 10 s; step 1 bound by bytes (3 s), step 2 by FLOPs (4 s)
    assert generate.floor_seconds(c, peak=10.0, bandwidth=10.0) == pytest.approx(10 + 3 + 4)
    assert generate.floor_seconds(c, peak=1e12, bandwidth=10.0) == pytest.approx(5.0)  # all memory-bound
    assert generate.floor_seconds(c, peak=10.0, bandwidth=1e12) == pytest.approx(15.0)  # all compute-bound


def test_targets_table_states_what_meeting_each_target_takes():
    import run_all

    result = {
        "sft": {"speedup_vs_transformers": 0.8, "results": {"instruct_jax": {"mfu_vs_measured_peak": 0.4},
                                                            "transformers": {"mfu_vs_measured_peak": 0.5}}},
        "generate": {"results": [{"batch": 8, "speedup_vs_transformers": 2.0, "transformers": {"median_s": 6.0},
                                  "floor_s": 1.5},
                                 {"batch": 64, "speedup_vs_transformers": 1.5, "transformers": {"median_s": 30.0},
                                  "floor_s": 12.0}]},
        "ppo": {"phases": {"rollout": {"share_of_iteration": 0.6}}},
    }
    rows = {r[0]: r[1:] for r in run_all.targets(result)}
    assert rows["SFT tokens/s vs transformers"] == [">= 1.0x", "0.80x", "**no**", "50% of the matmul peak"]
    assert rows["SFT fraction of f32 matmul peak"][1:3] == ["40.0%", "**no**"]
    # batch 8: 3x transformers allows 2 s per call; the floor is 1.5 s, so it needs 75% of roofline speed
    assert rows["generate batch 8 vs transformers"] == [">= 3x", "2.00x", "**no**",
                                                       "2 s/call, floor 1.5 s: needs 75% of roofline speed"]
    # batch 64: 10 s allowed, floor 12 s: out of reach on this machine whatever the implementation
    assert rows["generate batch 64 vs transformers"][2:] == ["**no**",
                                                            "10 s/call, floor 12 s: needs 120% of roofline speed"]
    assert rows["PPO rollout share of the iteration"][1:3] == ["60%", "**no**"]


def test_interleaved_times_the_settled_call_of_each_case_in_turn():
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.interleaved(cases, repeats=2, warmup=1, settle=1)
    # warm-up round: one call each; then per round and case one untimed and one timed call
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert {name: t["repeats"] for name, t in times.items()} == {"a": 2, "b": 2}
