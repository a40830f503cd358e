"""Score (prompt, response) pairs with a trained reward model: a pure function, a batched API, a CLI.

Three ways in, one scoring function underneath (`reward_scores` below), so every
consumer sees the same normalized scores (gain and bias fitted after training, stored with the
export):

* jitted code (PPO): `params, norm = load_reward_model(rm_workdir, cfg.model, mesh, rules)`,
  `score = score_fn(cfg.model)`, then
  `score(params, norm, ModelInput(tokens, positions, segment_ids), eos_index) -> [B]`.
  Each sequence must be prompt + response + end-of-turn token, and eos_index must point at that
  token (`last_token_index(segment_ids)` for one sequence per row, either pad side): a sampled
  response cut off before its end-of-turn gets one appended before scoring;
* Python: `RewardScorer(cfg, "runs/hh-rm").score([(prompt, response), ...]) -> np.ndarray`;
* the shell: `python -m instruct_jax score --experiment experiments/hh_rm.py:cpu --workdir runs/hh-rm
  --input pairs.jsonl [--output scored.jsonl]`, rows {"prompt": ..., "response": ...}; each comes back with
  "score" and "truncated" (prompt + response longer than train.seq_len: the start of the prompt was cut),
  and the number cut is printed to stderr.

A prompt is a string (one user turn, or an HH-RLHF dialogue "\\n\\nHuman: ...\\n\\nAssistant:"),
or a list of {"role", "content"} messages ending with the user's turn.

It needs the reward model's params and normalisation only: no optimizer, no training step, no ranking data.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from instruct_jax import files
from instruct_jax.checkpoint import load_params, resolve_params_dir
from instruct_jax.config import Config, validate
from instruct_jax.data.build import build_chat_template, build_tokenizer
from instruct_jax.data.examples import encode_ranking
from instruct_jax.data.formats import Ranking, parse_hh_transcript, to_messages
from instruct_jax.data.sources import read_bytes
from instruct_jax.data.stats import DataStats
from instruct_jax.model.config import ModelConfig
from instruct_jax.model.heads import RewardModel, init_reward_params_boxed
from instruct_jax.model.transformer import ModelInput
from instruct_jax.parallel.context import in_mesh_context
from instruct_jax.parallel.mesh import batch_shards, make_mesh
from instruct_jax.parallel.sharding import batch_sharding, logical_to_spec, param_shardings_for, replicated


# ----------------------------------------------------------------------------- scoring (pure)
def apply_normalization(raw: jax.Array, norm) -> jax.Array:
    """gain * raw + bias; norm = {"gain": scalar, "bias": scalar} (IDENTITY_NORM before fitting)."""
    return raw * norm["gain"] + norm["bias"]


def fold_normalization(head, norm):
    """The reward model's head {"kernel" [D], "bias" []} rewritten so that its raw output is the normalized score.

    The head is linear, so gain * (h . k + b) + c = h . (gain * k) + (gain * b + c): kernel' = gain * kernel,
    bias' = gain * bias + c, for norm = {"gain", "bias": c}, in the head's dtypes. PPO's value model starts
    from the reward model with this head, so its first values are in the units of the rewards it is paid
    (a raw head would be off by a constant that shifts every advantage). Example, D = 2:
    kernel [1, -2], bias 0.5, norm {gain 2, bias -1} -> kernel [2, -4], bias 0.0.
    """
    gain = norm["gain"]
    return {**head, "kernel": (head["kernel"] * gain).astype(head["kernel"].dtype),
            "bias": (head["bias"] * gain + norm["bias"]).astype(head["bias"].dtype)}


def reward_scores(model: RewardModel, params, norm, inputs: ModelInput, eos_index: jax.Array) -> jax.Array:
    """Normalized rewards [B] (or [B, N] for packed rows with N sequences each). Pure and jittable.

    inputs: ModelInput [B, T] of prompt + response + end-of-turn sequences; eos_index: where each
    sequence's end-of-turn token is (see `last_token_index`). The one scoring function PPO calls:

        score = functools.partial(reward_scores, RewardModel(cfg.model))
        r = score(rm_params, norm, ModelInput(tokens, positions, segment_ids), eos_index)   # [B]
    """
    return apply_normalization(model.apply({"params": params}, inputs, eos_index), norm)


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] -> [B]: index of each row's last non-padding token (one sequence per row, either pad side).

    Read from the mask, not from a pad id: segment_ids [[1, 1, 1, 0], [0, 0, 1, 1]] -> [2, 3].
    """
    t = segment_ids.shape[-1]
    idx = jnp.arange(t, dtype=jnp.int32)
    return jnp.max(jnp.where(segment_ids != 0, idx, 0), axis=-1)


# ----------------------------------------------------------------------------- loading and batched scoring
def load_reward_model(path: str, model_cfg: ModelConfig, mesh, rules) -> tuple[Any, dict]:
    """(params, norm) of a reward-model export (or the workdir holding it), sharded over `mesh`.

    What PPO calls to get the reward model: then `score_fn(model_cfg)(params, norm, inputs, eos_index)`.
    """
    init = functools.partial(init_reward_params_boxed, RewardModel(model_cfg))
    abstract_params, _ = param_shardings_for(init, mesh, rules)
    scalar = jax.ShapeDtypeStruct((), np.float32, sharding=replicated(mesh))
    abstract = {"params": abstract_params, "norm": {"gain": scalar, "bias": scalar}}
    tree = load_params(resolve_params_dir(path), abstract)
    return tree["params"], tree["norm"]


def score_batch_size(cfg: Config, mesh) -> int:
    """reward.score_batch_size (default 2 * global batch), rounded up to divide over the batch shards."""
    size = cfg.reward.score_batch_size or 2 * cfg.train.global_batch_size
    shards = batch_shards(mesh.shape, cfg.mesh.logical_rules())
    return -(-size // shards) * shards


def make_score_step(model: RewardModel, mesh, rules, param_shardings) -> Callable:
    """score(params, norm, tokens, positions, segment_ids [N, T], eos_index [N]) -> normalized [N]."""
    rows = batch_sharding(mesh, rules)
    one = NamedSharding(mesh, logical_to_spec(("batch",), rules))

    def score(params, norm, tokens, positions, segment_ids, eos_index):
        inputs = ModelInput(tokens, positions, segment_ids)
        return reward_scores(model, params, norm, inputs, eos_index)

    jitted = jax.jit(score, in_shardings=(param_shardings, replicated(mesh), rows, rows, rows, one),
                     out_shardings=replicated(mesh))
    return in_mesh_context(jitted, mesh, rules)


def put_global(array: np.ndarray, sharding) -> jax.Array:
    """A host array that every process holds whole -> a global jax.Array laid out by `sharding`."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def score_token_sequences(score_step: Callable, params, norm, sequences: Sequence[np.ndarray], *, seq_len: int,
                          batch_size: int, mesh, rules) -> np.ndarray:
    """Normalized scores [N] of token sequences (each prompt + response + end-of-turn, <= seq_len).

    Sequences are right-padded into fixed [batch_size, seq_len] batches (one compilation); the
    last batch is filled with empty rows whose scores are dropped.
    """
    rows = batch_sharding(mesh, rules)
    one = NamedSharding(mesh, logical_to_spec(("batch",), rules))
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        tokens = np.zeros((batch_size, seq_len), np.int32)
        lengths = np.zeros((batch_size,), np.int32)
        for i, ids in enumerate(chunk):
            if len(ids) > seq_len:
                raise ValueError(f"sequence of {len(ids)} tokens is longer than {seq_len}")
            tokens[i, :len(ids)], lengths[i] = ids, len(ids)
        idx = np.arange(seq_len, dtype=np.int32)[None, :]
        segment_ids = (idx < lengths[:, None]).astype(np.int32)
        positions = np.where(segment_ids == 1, idx, 0).astype(np.int32)
        scores = score_step(params, norm, put_global(tokens, rows), put_global(positions, rows),
                            put_global(segment_ids, rows), put_global(np.maximum(lengths - 1, 0), one))
        out.append(np.asarray(jax.device_get(scores))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


# ----------------------------------------------------------------------------- strings in, scores out
def score_fn(model_cfg) -> Callable:
    """The pure, jittable `score(rm_params, norm, inputs: ModelInput, eos_index) -> normalized [B]`."""
    return functools.partial(reward_scores, RewardModel(model_cfg))


def prompt_messages(prompt: Any) -> list[dict]:
    """A prompt as chat messages.

        "Hi"                                   -> [user "Hi"]
        "\\n\\nHuman: Hi\\n\\nAssistant:"          -> [user "Hi"]      (the empty final Assistant tag dropped)
        [{"role": "user", "content": "Hi"}]    -> as given
    """
    if isinstance(prompt, str) and prompt.startswith("\n\nHuman:"):
        messages = parse_hh_transcript(prompt, "prompt")
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = to_messages(prompt, "prompt")
    while messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages = messages[:-1]
    return messages


class RewardScorer:
    """Batched, sharded scoring of (prompt, response) strings with a reward-model export.

        scorer = RewardScorer(load_experiment("experiments/tiny_rm.py"), "runs/tiny-rm")
        scorer.score([("Say something.", "good sweet day"), ("Say something.", "bad foul day")])
        -> array([ 3.1, -4.2], dtype=float32)        (normalized: reference demonstrations average 0)

    `path` is the reward model's workdir (its params/ export and tokenizer/) or the export itself;
    the tokenizer is the workdir's, trained by the `rm` run, unless cfg.data.tokenizer names one.
    Sequences longer than train.seq_len keep BOS and their end, like training.
    """

    def __init__(self, cfg: Config, path: str, devices: Optional[Sequence] = None):
        devices = list(devices if devices is not None else jax.devices())
        validate(cfg, num_devices=len(devices))
        self.cfg = cfg
        self.mesh = make_mesh(cfg.mesh, devices)
        self.rules = cfg.mesh.logical_rules()
        model = RewardModel(cfg.model)
        _, param_shardings = param_shardings_for(functools.partial(init_reward_params_boxed, model), self.mesh,
                                                 self.rules)
        self.score_step = make_score_step(model, self.mesh, self.rules, param_shardings)
        self.params, norm = load_reward_model(path, cfg.model, self.mesh, self.rules)
        self.norm = {k: float(v) for k, v in norm.items()}
        workdir = path if files.isdir(files.join(path, "params")) else str(files.path(path).parent)
        self.tokenizer = build_tokenizer(cfg.data, workdir)
        self.template = build_chat_template(cfg.data, self.tokenizer)
        self.stats = DataStats(name="scored")  # truncations are counted here
        self.last_truncated = np.zeros(0, bool)  # which pairs of the latest score() call were cut

    def encode(self, prompt: Any, response: str) -> np.ndarray:
        """prompt + response + end-of-turn token ids, as the reward model was trained on them."""
        ranking = Ranking(tuple(prompt_messages(prompt)), (response,), (1,))
        example = encode_ranking(ranking, self.template, self.cfg.train.seq_len, "truncate", self.stats)
        return example.responses[0].ids

    def score(self, pairs: Iterable[tuple[Any, str]]) -> np.ndarray:
        """Normalized scores [N] (float32) of (prompt, response) pairs; `last_truncated` [N] says which were cut."""
        sequences, cut = [], []
        for p, r in pairs:
            before = self.stats.truncated
            sequences.append(self.encode(p, r))
            cut.append(self.stats.truncated > before)
        self.last_truncated = np.array(cut, bool)
        return score_token_sequences(self.score_step, self.params, self.norm, sequences,
                                     seq_len=self.cfg.train.seq_len, batch_size=score_batch_size(self.cfg, self.mesh),
                                     mesh=self.mesh, rules=self.rules)


def read_pairs(path: str) -> list[dict]:
    """Rows of a jsonl file (.gz etc. ok), each with "prompt" and "response"."""
    rows = []
    for i, line in enumerate(read_bytes(path).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or "prompt" not in row or not isinstance(row.get("response"), str):
            raise ValueError(f"{path}:{i}: expected an object with 'prompt' and a string 'response'")
        rows.append(row)
    return rows


def main(cfg: Config, workdir: str, input_path: str, output_path: Optional[str] = None) -> int:
    """The `score` command: each input row comes back with a "score" field (stdout or output_path)."""
    rows = read_pairs(input_path)
    scorer = RewardScorer(cfg, workdir)
    scores = scorer.score([(r["prompt"], r["response"]) for r in rows])
    print(f"score: {int(scorer.last_truncated.sum())} of {len(rows)} (prompt, response) pairs longer than "
          f"train.seq_len={cfg.train.seq_len} tokens: the start of their prompt was cut", file=sys.stderr)
    out = open(output_path, "w") if output_path else sys.stdout
    try:
        for row, s, cut in zip(rows, scores, scorer.last_truncated):
            out.write(json.dumps({**row, "score": float(s), "truncated": bool(cut)}) + "\n")
    finally:
        if output_path:
            out.close()
    return 0
