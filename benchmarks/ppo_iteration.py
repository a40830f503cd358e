"""One PPO iteration on a fixed workload, split into rollout / scoring / update.

    python benchmarks/ppo_iteration.py            # SmolLM2-135M shape, f32: 64 prompts x 64 + 64 new tokens
    python benchmarks/ppo_iteration.py --quick    # 1 measured iteration
    python benchmarks/ppo_iteration.py --tiny     # a tiny model, seconds

The workload (the issue's): 64 prompts of 64 tokens, 64 sampled tokens each (no stop token is ever
sampled early: random weights over a 49,152-token vocabulary), 1 epoch x 4 minibatches of 16 rows.
The pieces are the trainer's own jitted steps (`rl/ppo/trainer.py` build_ppo -> rl/ppo/step.py), the reward
a reward model of the same shape (random weights; `reward_model_reward`):

    rollout   steps.sample       prefill + 63 KV-cache decode steps (inference/sampling.py)
    scoring   steps.experience   policy, reference, value and reward forward passes, rewards, GAE
    update    steps.update       4 x (policy + value forward and backward, two AdamW updates)

Each phase is timed to completion (block_until_ready) after one warm-up iteration (compilation), the
median over the measured iterations kept. Fractions: the rollout against the read bandwidth (as in
generate.py), scoring and update against the f32 matmul peak (model FLOPs, PaLM-style).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import generate  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from instruct_jax.config import Config, OptimConfig, PPOConfig, TrainConfig  # noqa: E402
from instruct_jax.metrics import model_flops_per_token  # noqa: E402
from instruct_jax.model.heads import RewardModel, init_reward_params_boxed  # noqa: E402
from instruct_jax.model.transformer import ModelInput  # noqa: E402
from instruct_jax.parallel.context import mesh_and_rules  # noqa: E402
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.parallel.mesh import make_mesh  # noqa: E402
from instruct_jax.parallel.sharding import replicated, unbox  # noqa: E402
from instruct_jax.parallel.sharding import param_shardings_for  # noqa: E402
from instruct_jax.rl.ppo.trainer import build_ppo, initial_params  # noqa: E402
from instruct_jax.rl.rewards import reward_model_reward  # noqa: E402

EOS, PAD = 2, 0


def ppo_config(model_cfg, batch: int, prompt_len: int, new_tokens: int, minibatches: int) -> Config:
    return Config(
        name="bench-ppo", model=model_cfg, mesh=MeshConfig(data=1, fsdp=1),
        optim=OptimConfig(learning_rate=1e-6, warmup_steps=0, decay="constant", b2=0.95, eps=1e-5, grad_clip=1.0),
        train=TrainConfig(steps=100, global_batch_size=batch, seq_len=2 * prompt_len),
        ppo=PPOConfig(reward="model", reward_model="(random weights)", response_len=new_tokens, temperature=1.0,
                      epochs=1, minibatches=minibatches, missing_eos="replace"))


def random_reward_model(cfg: Config, devices) -> tuple[dict, dict]:
    """({"params", "norm"}, their shardings): a reward model of the policy's shape, random weights."""
    mesh, rules = make_mesh(cfg.mesh, devices), cfg.mesh.logical_rules()
    init = functools.partial(init_reward_params_boxed, RewardModel(cfg.model))
    _, shardings = param_shardings_for(init, mesh, rules)
    with mesh_and_rules(mesh, rules):
        params = jax.jit(lambda: unbox(init(jax.random.PRNGKey(1))), out_shardings=shardings)()
    scalar = lambda v: jax.device_put(jnp.float32(v), replicated(mesh))  # noqa: E731
    tree = {"params": params, "norm": {"gain": scalar(1.0), "bias": scalar(0.0)}}
    return tree, jax.tree.map(lambda x: x.sharding, tree)


def phase_flops(model_cfg, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Model FLOPs of scoring (4 forwards) and of the update (policy and value forward + backward)."""
    seq = prompt_len + new_tokens
    lm = model_flops_per_token(model_cfg, seq)  # forward + backward = 3 x forward
    scalar = model_flops_per_token(model_cfg, seq, output_size=1)
    tokens = batch * seq
    scoring = tokens * (2 * lm + scalar) / 3 + batch * (seq + 1) * scalar / 3
    return {"scoring": scoring, "update": tokens * (lm + scalar)}


def run(tiny: bool = False, quick: bool = False, batch: int = 64, prompt_len: int = 64, new_tokens: int = 64,
        minibatches: int = 4, iterations: int = 0, limits: dict | None = None) -> dict:
    model_cfg = (common.tiny_model if tiny else common.smollm2_135m)(max_seq_len=4 * (prompt_len + new_tokens))
    iterations = iterations or (1 if quick or tiny else 2)
    limits = limits or common.hardware_limits(quick or tiny)
    cfg = ppo_config(model_cfg, batch, prompt_len, new_tokens, minibatches)
    devices = jax.devices()[:1]
    reward_params, reward_sh = random_reward_model(cfg, devices)
    setup = build_ppo(cfg, stop_tokens=(EOS,), pad_id=PAD, eot_id=EOS, reward_fn=reward_model_reward(model_cfg),
                      reward_shardings=reward_sh, devices=devices)
    policy, value = initial_params(setup, reward_params)
    state = setup.init_state(policy, value)
    ref = setup.copy(policy, setup.shardings.policy.params)
    tokens = generate.random_prompt(batch, prompt_len, model_cfg.vocab_size)
    prompt = ModelInput.left_padded(jnp.asarray(tokens), jnp.full((batch,), prompt_len))
    kl_coef = np.float32(0.05)

    times = {"rollout": [], "scoring": [], "update": []}
    load = common.load_average()
    for it in range(1 + iterations):  # iteration 0 compiles
        rng = jax.random.fold_in(jax.random.PRNGKey(0), it)
        start = time.perf_counter()
        sample = jax.block_until_ready(setup.steps.sample(state.policy.params, prompt, jax.random.fold_in(rng, 0)))
        rolled = time.perf_counter()
        exp, _ = jax.block_until_ready(setup.steps.experience(state.policy.params, ref, state.value.params,
                                                              reward_params, prompt, sample, kl_coef))
        scored = time.perf_counter()
        state, _ = jax.block_until_ready(setup.steps.update(state, exp, jax.random.fold_in(rng, 1)))
        updated = time.perf_counter()
        if it > 0:
            for name, s in (("rollout", rolled - start), ("scoring", scored - rolled), ("update", updated - scored)):
                times[name].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = sum(med.values())
    flops = phase_flops(model_cfg, batch, prompt_len, new_tokens)
    decode = generate.decode_costs(model_cfg, batch, prompt_len, new_tokens)
    peak, bw = limits["matmul"]["flops_per_s"], limits["bandwidth"]["bytes_per_s"]
    phases = {
        "rollout": {"seconds": med["rollout"], "bandwidth_fraction": decode["bytes_read"] / med["rollout"] / bw,
                    "compute_fraction": decode["flops"] / med["rollout"] / peak},
        "scoring": {"seconds": med["scoring"], "compute_fraction": flops["scoring"] / med["scoring"] / peak},
        "update": {"seconds": med["update"], "compute_fraction": flops["update"] / med["update"] / peak},
    }
    for p in phases.values():
        p["share_of_iteration"] = p["seconds"] / total
    return {"benchmark": "ppo_iteration", "model": "tiny" if tiny else "SmolLM2-135M shape", "dtype": "float32",
            "prompts": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "epochs": 1,
            "minibatches": minibatches, "iterations_measured": iterations, "load_average": load,
            "limits": limits, "iteration_seconds": total, "phases": phases, "raw_seconds": times}


def table(result: dict) -> str:
    rows = []
    for name, p in result["phases"].items():
        limit = (f"{100 * p['bandwidth_fraction']:.1f}% of read bandwidth, " if "bandwidth_fraction" in p else "") + \
            f"{100 * p['compute_fraction']:.1f}% of f32 matmul peak"
        rows.append([name, p["seconds"], f"{100 * p['share_of_iteration']:.0f}%", limit])
    rows.append(["iteration", result["iteration_seconds"], "100%", ""])
    return common.markdown_table(["PPO phase (64 prompts, 64 + 64 tokens)", "seconds", "share", "vs the machine"],
                                 rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, default=0)
    parser.add_argument("--out", default="", help="JSON path (common.default_out)")
    args = parser.parse_args(argv)
    args.out = args.out or common.default_out("benchmarks_ppo.json", args.tiny)
    result = run(tiny=args.tiny, quick=args.quick, iterations=args.iterations)
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    main()
