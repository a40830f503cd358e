"""Score (prompt, response) pairs with a trained reward model: a pure function, a batched API, a CLI.

Three ways in, one scoring function underneath (train/reward.py `reward_scores`), so every
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
  --input pairs.jsonl [--output scored.jsonl]`, rows {"prompt": ..., "response": ...}.

A prompt is a string (one user turn, or an HH-RLHF dialogue "\\n\\nHuman: ...\\n\\nAssistant:"),
or a list of {"role", "content"} messages ending with the user's turn.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from instruct_jax.config import Config
from instruct_jax.data.formats import Ranking, parse_hh_transcript, to_messages
from instruct_jax.data.examples import encode_ranking
from instruct_jax.data.pipeline import build_chat_template, build_tokenizer
from instruct_jax.data.sources import read_bytes
from instruct_jax.data.stats import DataStats
from instruct_jax.model.heads import RewardModel
from instruct_jax.train.reward import last_token_index, reward_scores, score_token_sequences
from instruct_jax.train.rm_trainer import build_rm, load_reward_export, load_reward_model, score_batch_size

__all__ = ["RewardScorer", "last_token_index", "load_reward_model", "prompt_messages", "score_fn", "main"]


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
        self.cfg = cfg
        self.setup = build_rm(cfg, devices)
        self.params, norm = load_reward_export(self.setup, path)
        self.norm = {k: float(v) for k, v in norm.items()}
        workdir = path if os.path.isdir(os.path.join(path, "params")) else os.path.dirname(os.path.abspath(path))
        self.tokenizer = build_tokenizer(cfg.data, workdir)
        self.template = build_chat_template(cfg.data, self.tokenizer)
        self.stats = DataStats(name="scored")  # truncations are counted here

    def encode(self, prompt: Any, response: str) -> np.ndarray:
        """prompt + response + end-of-turn token ids, as the reward model was trained on them."""
        ranking = Ranking(tuple(prompt_messages(prompt)), (response,), (1,))
        example = encode_ranking(ranking, self.template, self.cfg.train.seq_len, "truncate", self.stats)
        return example.responses[0].ids

    def score(self, pairs: Iterable[tuple[Any, str]]) -> np.ndarray:
        """Normalized scores [N] (float32) of (prompt, response) pairs."""
        sequences = [self.encode(p, r) for p, r in pairs]
        return score_token_sequences(self.setup.score_step, self.params, self.norm, sequences,
                                     seq_len=self.cfg.train.seq_len,
                                     batch_size=score_batch_size(self.cfg, self.setup.mesh),
                                     mesh=self.setup.mesh, rules=self.setup.rules)


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
    scores = RewardScorer(cfg, workdir).score([(r["prompt"], r["response"]) for r in rows])
    out = open(output_path, "w") if output_path else sys.stdout
    try:
        for row, s in zip(rows, scores):
            out.write(json.dumps({**row, "score": float(s)}) + "\n")
    finally:
        if output_path:
            out.close()
    return 0
