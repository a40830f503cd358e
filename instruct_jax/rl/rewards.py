"""Per-token rewards for PPO: response masks, KL estimators, score placement, KL controllers.

Letters: B rollout rows, N response slots (the sampler's max_new_tokens).

A response row holds its sampled tokens up to and including the first stop token (EOS or
end-of-turn), then padding. Everything here reads the row's extent from its length, never
from the pad id:

    lengths [B]  -> mask [B, N]   = idx < lengths        (the stop token is inside the mask)
                 -> t_end [B]     = lengths - 1          (the first stop token, or N - 1 if none)

Per-token reward (Ziegler et al. 2019; lm-human-preferences `rewards = -kl_coef * kl` then
`rewards[:, -1] += scores`, here placed at each row's own end rather than the buffer's end):

    r_t = -beta * k_t * mask_t  +  score * [t == t_end]

Worked example, N = 5, stop token 2, beta = 0.1:

    tokens   [7, 9, 2, p, p]          lengths 3, t_end 2, mask [1, 1, 1, 0, 0]
    k1       [0.5, -0.2, 0.1, *, *]   (* = whatever the model says about padding: ignored)
    score    1.0
    rewards  [-0.05, 0.02, -0.01 + 1.0, 0, 0] = [-0.05, 0.02, 0.99, 0, 0]

A row with no stop token ([7, 9, 4, 4, 4], lengths 5) has t_end 4; its score is first replaced by
(or reduced by) the missing-EOS penalty, `apply_missing_eos`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from instruct_jax.model.transformer import ModelInput

KL_ESTIMATORS = ("k1", "k3")
MISSING_EOS_MODES = ("replace", "subtract", "none")


# ----------------------------------------------------------------------------- masks from lengths
def response_mask(lengths: jax.Array, n: int) -> jax.Array:
    """lengths [B] -> float32 [B, N]: 1 on a response's tokens (its stop token included), 0 after.

    lengths [3, 5, 1], N = 5 -> [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    """
    return (jnp.arange(n, dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.float32)


def end_index(lengths: jax.Array) -> jax.Array:
    """t_end [B]: index of the first stop token (inclusive), or N - 1 for a row that never stopped.

    The sampler counts the stop token in `lengths` and a row without one fills all N slots, so both
    cases are lengths - 1: lengths [3, 5] (N = 5; row 1 ran out) -> [2, 4].
    """
    return jnp.maximum(lengths - 1, 0)


def first_stop(tokens: jax.Array, stop_tokens: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(lengths [B], done [B]) of responses [B, N] given as tokens: up to the first stop token, inclusive.

    The sampler returns these itself; this is for teacher-forced rollouts (tests, fixed samples) and
    checks the response tokens only (never the prompt). tokens [[7, 2, 5, 2]], stop (2,) -> ([2], [True]);
    [[7, 5, 5, 5]] -> ([4], [False]).
    """
    n = tokens.shape[1]
    is_stop = jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else jnp.zeros(tokens.shape, bool)
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    first = jnp.min(jnp.where(is_stop, idx, n), axis=1)  # [B]: n when there is none
    done = first < n
    return jnp.where(done, first + 1, n).astype(jnp.int32), done


# ----------------------------------------------------------------------------- KL estimators
def kl_estimate(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs under each (any shape).

    With l = log pi(y) and l_ref = log pi_ref(y), y ~ pi:
      k1 = l - l_ref                                  unbiased, per token and summed over a sequence; can be < 0
      k3 = exp(l_ref - l) - 1 - (l_ref - l)           >= 0 and lower variance (Schulman 2020), but as a
                                                      per-token *reward* its sum is not the sequence KL
                                                      and its gradient is biased: documented, not default.
    Example: l = -1, l_ref = -2 -> k1 = 1, k3 = e^-1 - 1 + 1 = 0.3679.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return jnp.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


# ----------------------------------------------------------------------------- score and rewards
def apply_missing_eos(score: jax.Array, done: jax.Array, mode: str, replace_score: float = -1.0,
                      penalty: float = 1.0) -> jax.Array:
    """Scores [B] of responses that emitted no stop token (done False): replaced by `replace_score`
    (lm-human-preferences' penalty_reward_value, in normalized units), reduced by `penalty`, or left.

    score [0.5, 2.0], done [True, False] -> replace: [0.5, -1.0]; subtract (penalty 1): [0.5, 1.0].
    """
    if mode == "replace":
        return jnp.where(done, score, replace_score)
    if mode == "subtract":
        return jnp.where(done, score, score - penalty)
    if mode == "none":
        return score
    raise ValueError(f"missing_eos must be one of {MISSING_EOS_MODES}, got {mode!r}")


def token_rewards(score: jax.Array, kl: jax.Array, kl_coef, lengths: jax.Array) -> jax.Array:
    """r [B, N] = -kl_coef * kl on response tokens, plus each row's score at t_end; 0 after t_end.

    score [B], kl [B, N] (any values after t_end: masked here), lengths [B]. See the module docstring
    for a worked example. The score never lands on a pad: t_end is inside the mask for lengths >= 1.
    """
    n = kl.shape[1]
    mask = response_mask(lengths, n)
    at_end = (jnp.arange(n, dtype=jnp.int32)[None, :] == end_index(lengths)[:, None]).astype(jnp.float32)
    return (-kl_coef * kl + score[:, None] * at_end) * mask


def sequence_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence KL [B]: the masked sum over response tokens (what the adaptive controller reads)."""
    return jnp.sum(kl * mask, axis=1)


# ----------------------------------------------------------------------------- KL controllers
def adaptive_kl_update(kl_coef: float, kl: float, n: int, target: float, horizon: int) -> float:
    """One step of Ziegler et al.'s adaptive controller (lm-human-preferences AdaptiveKLController).

    kl: batch mean of the per-sequence k1 sum on the current rollout (before the update); n: sequences
    in the batch. e = clip(kl / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon).
    Example: beta 0.1, kl 9, target 6, n 64, horizon 10000 -> e = 0.2 (clipped from 0.5),
    beta = 0.1 * (1 + 0.2 * 0.0064) = 0.100128. Plain Python floats (host-side, exactly reproducible).
    """
    error = min(max(float(kl) / target - 1.0, -0.2), 0.2)
    return float(kl_coef) * (1.0 + error * n / horizon)


@dataclasses.dataclass
class KLController:
    """beta, fixed or adaptive. Its state is `kl_coef` alone, saved in the checkpoint's meta."""

    kl_coef: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, n: int) -> float:
        if self.adaptive:
            self.kl_coef = adaptive_kl_update(self.kl_coef, kl, n, self.target, self.horizon)
        return self.kl_coef

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])


# ----------------------------------------------------------------------------- reward functions
# A reward function: (reward_params, scoring input [B, T + N + 1], score_index [B], response tokens [B, N],
# response mask [B, N]) -> scores [B]. Pure and jittable; reward_params is any pytree ({} for the toy). The rewards:
# reward_model_reward (ppo.reward=model), implicit_reward (dpo), token_count_reward (count), host_scores_reward (host).
RewardFn = Callable[[Any, ModelInput, jax.Array, jax.Array, jax.Array], jax.Array]


def token_count_reward(token_id: int) -> RewardFn:
    """Toy reward for tests and smoke runs: how many times `token_id` occurs in the response."""
    def reward(params, inputs, score_index, response, mask):
        del params, inputs, score_index
        return jnp.sum((response == token_id).astype(jnp.float32) * mask, axis=1)

    return reward


def host_scores_reward() -> RewardFn:
    """Scores computed on the host between rollout and experience (ppo.reward = "host": a Python function
    the caller passes to run_ppo, e.g. the pipeline's gold judge for its oracle run).

    reward_params = {"scores": [B] float32, batch-sharded}, one per iteration.
    """
    def reward(params, inputs, score_index, response, mask):
        del inputs, score_index, response, mask
        return params["scores"]

    return reward


def reward_model_reward(model_cfg) -> RewardFn:
    """The reward model's normalized score at each row's end-of-turn token (inference/scorer.py `score_fn`).

    reward_params = {"params": RM params, "norm": {"gain", "bias"}} (`load_reward_model`).
    """
    from instruct_jax.inference.scorer import score_fn  # the RM's one scoring function

    score = score_fn(model_cfg)

    def reward(params, inputs, score_index, response, mask):
        del response, mask
        return score(params["params"], params["norm"], inputs, score_index)

    return reward


def implicit_reward(model_cfg, beta: float) -> RewardFn:
    """A DPO policy's implicit reward, beta * (log pi_dpo(y | x) - log pi_ref(y | x)) (train/dpo/losses.py), the
    log-probs summed over the answer's tokens and its end-of-turn, as DPO trained them: the scoring input's
    positions from the response's first token to `score_index`.

    reward_params = {"policy": the DPO export's params, "reference": its reference's} (`load_implicit_reward`).
    """
    from instruct_jax.model.transformer import Transformer
    from instruct_jax.train.losses import token_nll

    model = Transformer(model_cfg)

    def reward(params, inputs, score_index, response, mask):
        del mask
        length, start = inputs.tokens.shape[1], inputs.tokens.shape[1] - response.shape[1] - 1
        targets = jnp.concatenate([inputs.tokens[:, 1:], jnp.zeros_like(inputs.tokens[:, :1])], axis=1)
        target_pos = jnp.arange(length)[None, :] + 1  # the position of the token logits[:, p] predicts
        answer = ((target_pos >= start) & (target_pos <= score_index[:, None])).astype(jnp.float32)

        def logp(p):
            return -jnp.sum(token_nll(model.apply({"params": p}, inputs).logits, targets) * answer, axis=1)

        return beta * (logp(params["policy"]) - logp(params["reference"]))

    return reward


def scoring_input(prompt: ModelInput, response: jax.Array, lengths: jax.Array, done: jax.Array,
                  eot_id: int) -> tuple[ModelInput, jax.Array]:
    """(prompt + response + one slot [B, T + N + 1], score index [B]) in the form the reward model was
    trained on: a sequence ending with its end-of-turn token, the score read at that token.

    A row that stopped keeps its own stop token (index T + lengths - 1) and the extra slot is padding;
    a row cut off at N gets `eot_id` appended in the extra slot (inference/scorer.py's contract), index T + N.
    Worked example, T = 2, N = 3, eot 2: prompt [[5, 6]],
        response [[7, 2, p]], lengths [2], done [True]  -> tokens [5, 6, 7, 2, p, p], segments [1,1,1,1,0,0], index 3
        response [[7, 8, 9]], lengths [3], done [False] -> tokens [5, 6, 7, 8, 9, 2], segments [1,1,1,1,1,1], index 5
    """
    b, t = prompt.tokens.shape
    n = response.shape[1]
    real = prompt.segment_ids > 0
    first_pos = jnp.max(jnp.where(real, prompt.positions, -1), axis=1) + 1  # [B]
    segment = jnp.max(prompt.segment_ids, axis=1)  # [B]: one segment per row
    idx = jnp.arange(n + 1, dtype=jnp.int32)[None, :]  # [1, N + 1]
    extended = jnp.concatenate([response, jnp.zeros((b, 1), response.dtype)], axis=1)  # [B, N + 1]
    appended = (~done)[:, None] & (idx == n)  # [B, N + 1]
    extended = jnp.where(appended, eot_id, extended)
    valid = (idx < lengths[:, None]) | appended
    inputs = ModelInput(
        tokens=jnp.concatenate([prompt.tokens, extended.astype(jnp.int32)], axis=1),
        positions=jnp.concatenate([prompt.positions, jnp.where(valid, first_pos[:, None] + idx, 0)], axis=1),
        segment_ids=jnp.concatenate([prompt.segment_ids, jnp.where(valid, segment[:, None], 0)], axis=1),
        # a reward model with images reads the prompt's images (and prefix) as the policy did
        images=prompt.images,
        prefix=None if prompt.prefix is None else jnp.concatenate(
            [prompt.prefix, jnp.zeros_like(extended, prompt.prefix.dtype)], axis=1))
    score_index = t + jnp.where(done, lengths - 1, n)
    return inputs, score_index.astype(jnp.int32)
