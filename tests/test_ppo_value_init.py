"""PPO's value model at iteration 1 (before any update): at the end-of-turn token that closes a response,
its value equals the reward model's *normalized* score, as the `score` path (RewardScorer) computes it.

A tiny reward-model export with a normalization far from identity (gain 1.9, bias -0.6, and a non-zero
head bias) is built with the reward trainer's own export function; PPO loads it and initialises the
value model the way `run_ppo` does (load_reward -> build_ppo -> initial_params -> init_state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from instruct_jax.config import apply_overrides, load_experiment
from instruct_jax.data.build import build_chat_template, build_tokenizer
from instruct_jax.data.tokenizer import train_sentencepiece
from instruct_jax.inference.scorer import RewardScorer
from instruct_jax.model.heads import RewardModel, init_reward_params_boxed
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.mesh import make_mesh
from instruct_jax.parallel.sharding import unbox
from instruct_jax.rl.ppo.trainer import build_ppo, initial_params, load_reward, prompt_len, reference_params
from instruct_jax.rl.rollout import sample_from_tokens
from instruct_jax.train.rm.trainer import export_reward_model

pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

NORM = {"gain": 1.9, "bias": -0.6}
HEAD_BIAS = -0.5
PAIRS = [("Say something.", "good sweet day and the sea"), ("Describe the weather.", "vile sad rain of it day"),
         ("Hi", "kind"), ("Tell me about the sea.", "the sea is cold and it is fair and good"),
         ("Say something.", "bad foul day"), ("Name a flower.", "rose"),
         ("Describe the weather.", "good kind rain and the wind"), ("Hi", "the fair true sweet sweet love")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """(cfg, rm workdir, tokenizer, setup, reward params, initial PPOState, reference params), as run_ppo has them."""
    tmp = tmp_path_factory.mktemp("value_init")
    prefix = tmp / "spm"
    train_sentencepiece([str(data_dir / "tinyshakespeare.txt")], str(prefix), 1024)
    rm_dir = tmp / "rm"
    cfg = apply_overrides(load_experiment(str(REPO / "experiments" / "tiny_ppo.py")),
                          [f"data.tokenizer={prefix}.model", "train.init_from=", f"ppo.reward_model={rm_dir}"])
    params = unbox(init_reward_params_boxed(RewardModel(cfg.model), jax.random.PRNGKey(3)))
    params["head"]["bias"] = jnp.asarray(HEAD_BIAS, params["head"]["bias"].dtype)
    export_reward_model(str(rm_dir), jax.device_get(params), NORM)

    tokenizer = build_tokenizer(cfg.data)
    mesh = make_mesh(cfg.mesh, jax.devices())
    reward_fn, reward_params, reward_sh = load_reward(cfg, tokenizer, mesh, cfg.mesh.logical_rules())
    setup = build_ppo(cfg, stop_tokens=(tokenizer.eos_id, tokenizer.eot_id), pad_id=tokenizer.pad_id,
                      eot_id=tokenizer.eot_id, reward_fn=reward_fn, reward_shardings=reward_sh)
    policy, value = initial_params(setup, reward_params)
    return cfg, rm_dir, tokenizer, setup, reward_params, setup.init_state(policy, value), reference_params(setup)


def test_value_at_the_last_response_token_equals_the_normalized_score(run):
    cfg, rm_dir, tokenizer, setup, reward_params, state, ref = run
    scorer = RewardScorer(cfg, str(rm_dir))
    want = scorer.score(PAIRS)  # strings in: the score command's tokenization, batching and normalization
    assert scorer.norm == pytest.approx(NORM)

    # The same pairs as a PPO rollout: left-padded prompts [B, T], teacher-forced responses [B, N] that end
    # with the end-of-turn token, token for token what the scorer encoded.
    t, n = prompt_len(cfg), cfg.ppo.response_len
    template = build_chat_template(cfg.data, tokenizer)
    prompts, responses = np.full((len(PAIRS), t), tokenizer.pad_id), np.full((len(PAIRS), n), tokenizer.pad_id)
    lengths = []
    for i, (p, r) in enumerate(PAIRS):
        head = template.render_prompt([{"role": "user", "content": p}])
        full = list(scorer.encode(p, r))
        assert full[:len(head)] == head and full[-1] == tokenizer.eot_id
        prompts[i, t - len(head):], responses[i, :len(full) - len(head)] = head, full[len(head):]
        lengths.append(len(head))
    prompt = ModelInput.left_padded(jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths))
    sample = sample_from_tokens(jnp.asarray(responses, jnp.int32), (tokenizer.eos_id, tokenizer.eot_id),
                                tokenizer.pad_id)
    assert bool(np.all(sample.done))
    exp, _ = setup.steps.experience(state.policy.params, ref, state.value.params, reward_params, prompt, sample,
                                    np.float32(cfg.ppo.kl_coef))
    last = t + np.asarray(exp.lengths) - 1  # [B]: the end-of-turn token that closes each response
    value = setup.value_model.apply({"params": state.value.params}, exp.inputs, jnp.asarray(last, jnp.int32))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(exp.scores, want, rtol=1e-5, atol=1e-5)  # the score PPO is paid, same units
    # The reward model's raw head (no fold) is off by far more than the tolerance: the check can fail.
    raw = setup.value_model.apply({"params": reward_params["params"]}, exp.inputs, jnp.asarray(last, jnp.int32))
    assert np.min(np.abs(np.asarray(raw) - want)) > 0.1
