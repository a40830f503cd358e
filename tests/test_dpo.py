"""DPO / IPO (issue 30, item 1): the losses against naive loops over pairs, the log-probs against a per-sequence
forward, the sharded step against one device, bad settings named, and the phase end to end (resumed bitwise after
SIGKILL, in the slow tier)."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from instruct_jax.config import Config, DPOConfig, OptimConfig, TrainConfig
from instruct_jax.errors import ConfigError
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.transformer import ModelInput, Transformer
from instruct_jax.parallel.mesh import MeshConfig
from instruct_jax.train.dpo.losses import preference_loss_sum, sequence_logprobs
from instruct_jax.train.dpo.trainer import build_dpo, validate_dpo
from instruct_jax.data.config import DataConfig

# ----------------------------------------------------------------------------- the losses, by hand
POLICY = np.array([[-3.0, -5.0, -4.0, 0.0], [-2.0, -2.5, 0.0, 0.0], [-1.0, -1.0, 0.0, 0.0]], np.float32)
REFERENCE = np.array([[-3.5, -4.0, -4.0, 0.0], [-2.2, -2.0, 0.0, 0.0], [-1.5, -0.5, 0.0, 0.0]], np.float32)
RANKS = np.array([[1, 2, 2, 0],  # 0 above 1 and 2; 1 and 2 tie; slot 3 empty
                  [2, 1, 0, 0],  # 1 above 0
                  [1, 1, 0, 0]], np.int32)  # a tie only: no pair, the prompt does not count


def naive(policy, reference, ranks, beta, loss):
    """Per prompt, a loop over its non-tied pairs; prompts without one are left out."""
    per_prompt, chosen, rejected, correct, pairs = [], [], [], 0.0, 0
    for p, r, k in zip(policy, reference, ranks):
        terms = []
        for i in range(len(k)):
            for j in range(len(k)):
                if k[i] and k[j] and k[i] < k[j]:
                    h = (p[i] - r[i]) - (p[j] - r[j])
                    terms.append(math.log1p(math.exp(-beta * h)) if loss == "sigmoid" else (h - 1 / (2 * beta)) ** 2)
                    chosen.append(beta * (p[i] - r[i]))
                    rejected.append(beta * (p[j] - r[j]))
                    correct += 1.0 if h > 0 else 0.5 if h == 0 else 0.0
                    pairs += 1
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt), len(per_prompt), correct, pairs, sum(chosen), sum(rejected)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_preference_losses_equal_a_loop_over_pairs(loss, beta):
    total, prompts, stats = preference_loss_sum(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(RANKS),
                                                beta, loss)
    want = naive(POLICY, REFERENCE, RANKS, beta, loss)
    np.testing.assert_allclose([float(total), float(prompts), float(stats["correct"]), float(stats["pairs"]),
                                float(stats["chosen"]), float(stats["rejected"])], want, rtol=1e-5, atol=1e-6)
    assert want[1] == 2 and want[3] == 3  # two prompts with pairs, three pairs


def naive_plackett_luce(policy, reference, ranks, beta):
    """Per prompt: the ranking as successive choices, best first, with plain floats; a tied group's members each
    chosen against the group and everything below it (Breslow); the last group chooses nothing."""
    per_prompt = []
    for p, r, k in zip(policy, reference, ranks):
        reward = {i: beta * (float(p[i]) - float(r[i])) for i in range(len(k)) if k[i]}
        terms = []
        for i in reward:
            if not any(k[j] > k[i] for j in reward):
                continue
            rest = [reward[j] for j in reward if k[j] >= k[i]]
            terms.append(-math.log(math.exp(reward[i]) / sum(math.exp(x) for x in rest)))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt), len(per_prompt)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_plackett_luce_equals_a_loop_over_the_rankings_choices_and_is_dpo_at_k2(beta):
    ranks = np.concatenate([RANKS, [[3, 1, 4, 2], [2, 1, 1, 3]]]).astype(np.int32)  # a full order; a tie on top
    policy = np.concatenate([POLICY, [[-3.0, -2.0, -6.0, -4.0], [-1.0, -3.0, -2.0, -2.0]]]).astype(np.float32)
    reference = np.concatenate([REFERENCE, [[-2.0, -2.5, -5.0, -4.5], [-1.5, -2.0, -2.5, -1.0]]]).astype(np.float32)
    total, prompts, stats = preference_loss_sum(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(ranks), beta,
                                                "plackett_luce")
    want_total, want_prompts = naive_plackett_luce(policy, reference, ranks, beta)
    assert want_prompts == 4
    np.testing.assert_allclose([float(total), float(prompts)], [want_total, want_prompts], rtol=1e-5, atol=1e-6)
    # the stats are the pairwise ones, whatever the loss
    pairwise = preference_loss_sum(jnp.asarray(policy), jnp.asarray(reference), jnp.asarray(ranks), beta, "sigmoid")[2]
    for key in ("correct", "pairs", "chosen", "rejected"):
        assert float(stats[key]) == pytest.approx(float(pairwise[key]))
    # pairwise data (K = 2, empty slots): exactly DPO's sigmoid loss
    pair_ranks = np.array([[1, 2, 0, 0], [2, 1, 0, 0], [1, 1, 0, 0]], np.int32)
    pl = preference_loss_sum(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(pair_ranks), beta,
                             "plackett_luce")
    dpo = preference_loss_sum(jnp.asarray(POLICY), jnp.asarray(REFERENCE), jnp.asarray(pair_ranks), beta, "sigmoid")
    np.testing.assert_allclose([float(pl[0]), float(pl[1])], [float(dpo[0]), float(dpo[1])], rtol=1e-6)
    # a ranking of three: the gradient raises the best, lowers the worst, and is finite despite the empty slot
    grad = jax.grad(lambda x: preference_loss_sum(x, jnp.zeros((1, 4)), jnp.array([[1, 2, 3, 0]]), beta,
                                                  "plackett_luce")[0])(jnp.zeros((1, 4)))
    assert grad[0, 0] < 0 < grad[0, 2] and bool(jnp.all(jnp.isfinite(grad))) and float(grad[0, 3]) == 0.0


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "plackett_luce"])
def test_the_gradient_raises_the_better_answer_and_lowers_the_worse(loss):
    """Pairwise, better answer first: the loss falls as the better answer's log-prob rises (DPO always; IPO
    while the log-ratio gap is below its target 1 / (2 beta))."""
    policy = jnp.array([[-4.0, -4.0]])
    grad = jax.grad(lambda p: preference_loss_sum(p, jnp.array([[-4.0, -4.0]]), jnp.array([[1, 2]]), 0.1,
                                                  loss)[0])(policy)
    assert grad[0, 0] < 0 < grad[0, 1]
    # at the reference, DPO's loss is log 2 per prompt and every implicit reward is 0
    total, prompts, stats = preference_loss_sum(policy, policy, jnp.array([[1, 2]]), 0.1, "sigmoid")
    assert float(total) == pytest.approx(math.log(2)) and float(stats["chosen"]) == float(stats["rejected"]) == 0


# ----------------------------------------------------------------------------- log-probs and the sharded step
def tiny_cfg(**mesh) -> Config:
    return Config(
        model=ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                          mlp_dim=64, max_seq_len=32),
        mesh=MeshConfig(**{"fsdp": 1, **mesh}), data=DataConfig(format="ranking"),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.1, eps=1e-3),
        train=TrainConfig(steps=10, global_batch_size=8, seq_len=16), dpo=DPOConfig(beta=0.5))


def ranking_batch(b=8, k=3, t=16, vocab=64, seed=0):
    """Random [B, K, T] responses sharing a prompt of 5 tokens, answers of random length; ranks 1..K, some empty."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((b, k, t), np.int32)
    mask = np.zeros((b, k, t), np.float32)
    lengths = np.zeros((b, k), np.int32)
    ranks = np.zeros((b, k), np.int32)
    for i in range(b):
        prompt = rng.integers(1, vocab, 5)
        for j in range(k if i % 3 else 2):  # every third prompt has only two answers
            n = int(rng.integers(7, t + 1))
            tokens[i, j, :5], tokens[i, j, 5:n] = prompt, rng.integers(1, vocab, n - 5)
            mask[i, j, 4:n - 1] = 1.0  # targets of positions 4..n-2 are the answer tokens 5..n-1
            lengths[i, j], ranks[i, j] = n, 1 + (j + i) % k
    valid = np.arange(t)[None, None] < lengths[..., None]
    targets = np.where(valid, np.roll(tokens, -1, axis=-1), 0).astype(np.int32)
    targets[..., -1] = 0
    return {"tokens": tokens, "targets": targets, "loss_mask": mask * valid,
            "positions": np.where(valid, np.arange(t), 0).astype(np.int32), "segment_ids": valid.astype(np.int32),
            "ranks": ranks, "lengths": lengths}


def test_sequence_logprobs_equal_one_forward_per_response():
    cfg = tiny_cfg()
    model = Transformer(cfg.model)
    setup = build_dpo(cfg, jax.devices()[:1])
    params = jax.device_get(setup.init_state().params)
    batch = ranking_batch()
    got = np.asarray(sequence_logprobs(model, params, {k: jnp.asarray(v) for k, v in batch.items()}))
    for i in range(2):
        for j in range(3):
            n = batch["lengths"][i, j]
            if not n:
                assert got[i, j] == 0.0
                continue
            ids = jnp.asarray(batch["tokens"][i, j, :n])[None]
            logits = model.apply({"params": params}, ModelInput(ids, jnp.arange(n)[None], jnp.ones((1, n), jnp.int32)))
            logp = jax.nn.log_softmax(np.asarray(logits.logits[0], np.float64), axis=-1)
            want = sum(float(logp[p, ids[0, p + 1]]) for p in range(4, n - 1))  # the answer's tokens
            assert got[i, j] == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def one_device_steps():
    return run_steps(tiny_cfg(data=1), jax.devices()[:1])


def run_steps(cfg, devices):
    setup = build_dpo(cfg, devices)
    state, reference = setup.init_state(), setup.init_state().params
    rows = []
    for seed in range(3):
        state, metrics = setup.train_step(state, reference, ranking_batch(seed=seed))
        rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    return rows, jax.device_get(state.params)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=4), dict(fsdp=2, tensor=4)])
def test_sharded_dpo_step_equals_one_device(one_device_steps, mesh):
    want_rows, want_params = one_device_steps
    rows, params = run_steps(tiny_cfg(**mesh), jax.devices())
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # the policy starts as its reference
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["margin"] > 0
    for got, want in zip(rows, want_rows):
        for key in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "pairs"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, want_params)


def test_bad_dpo_settings_name_their_field():
    for sets, field in (({"dpo": DPOConfig(loss="hinge")}, "dpo.loss"), ({"dpo": DPOConfig(beta=0.0)}, "dpo.beta"),
                        ({"data": DataConfig(format="sft")}, "data.format")):
        cfg = tiny_cfg()
        for name, value in sets.items():
            setattr(cfg, name, value)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            validate_dpo(cfg)


# ----------------------------------------------------------------------------- the phase, end to end
BASE = ["train.steps=8", "train.eval_every=4", "checkpoint.every_steps=3", "checkpoint.async_save=false",
        "logging.log_every=1", "logging.progress_bar=false", "reward.synthetic=400", "train.global_batch_size=8"]


def dpo_cli(workdir, *overrides, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    cmd = [sys.executable, "-m", "instruct_jax", "dpo", "--experiment", str(REPO / "experiments" / "tiny_rm.py"),
           "--workdir", str(workdir), "--set", *BASE, *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def rows(workdir):
    timing = {"tokens_per_sec", "mfu", "step_time"}
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.slow
def test_dpo_phase_learns_and_resumes_bitwise_after_sigkill(tmp_path):
    whole = dpo_cli(tmp_path / "whole")
    assert whole.returncode == 0, whole.stdout + whole.stderr
    full = rows(tmp_path / "whole")
    evals = [r for r in full if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8] and full[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert evals[-1]["eval_accuracy"] > 0.6  # the implicit reward ranks held-out answers (synthetic rule)
    killed = dpo_cli(tmp_path / "killed", env_extra={"INSTRUCT_JAX_KILL_AT_STEP": "5"})
    assert killed.returncode == -9, killed.stdout + killed.stderr
    resumed = dpo_cli(tmp_path / "killed")
    assert resumed.returncode == 0 and "resumed from checkpoint at step 3" in resumed.stdout + resumed.stderr
    assert rows(tmp_path / "killed") == full
    from instruct_jax.checkpoint import load_params
    from instruct_jax.config import apply_overrides, load_experiment
    from instruct_jax.parallel.mesh import make_mesh
    from instruct_jax.train.lm.build import abstract_lm_state

    cfg = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_rm.py")), BASE)
    abstract, _ = abstract_lm_state(cfg, make_mesh(cfg.mesh))
    a, b = (jax.device_get(load_params(str(tmp_path / run / "params"), abstract.params)) for run in ("whole", "killed"))
    jax.tree.map(np.testing.assert_array_equal, a, b)
