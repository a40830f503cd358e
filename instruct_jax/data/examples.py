"""Records -> token examples, with the over-length policy applied and counted.

Three example types, one per kind of batch (packing.py turns them into rows):

    LMExample       ids [n], weights [n]     next-token training: sft, text (and PPO-ptx)
    PromptExample   ids [n]                  PPO prompts, rendered up to the assistant header
    RankingExample  K LMExamples + K ranks   reward model: each is prompt + answer + end-of-turn

`weights[i]` is 1.0 when ids[i] is a training target, i.e. when the loss counts predicting ids[i]
from ids[:i]. For sft it is the chat template's assistant mask; for text it is all ones.

Over-length (`on_overlength`), with L the room available:
  * text      documents longer than seq_len are not over-length: they are cut into windows of
              seq_len + 1 tokens overlapping by one, so every token is a target exactly once;
  * sft       truncate keeps the first seq_len + 1 tokens (the conversation's start); an example
              left with no assistant token is dropped ("no_target_in_window");
  * prompt    truncate keeps BOS and the last tokens, because generation continues from the end;
  * ranking   truncate keeps BOS and the last seq_len - 1 tokens of each response sequence, so
              the end-of-turn token where the reward is read survives.
  `drop` drops the example ("overlength"); every truncation and drop is counted in DataStats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from instruct_jax.data.chat import ChatTemplate
from instruct_jax.data.formats import Ranking
from instruct_jax.data.stats import DataStats
from instruct_jax.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class LMExample:
    ids: np.ndarray  # int32 [n], n >= 2
    weights: np.ndarray  # float32 [n]; 1.0 where ids[i] is a training target
    images: Optional[np.ndarray] = None  # float32 [m, H, W, C]: the images its image tokens show, in order

    @property
    def length(self) -> int:
        """Positions the example fills in a packed row: inputs ids[:-1] predict targets ids[1:]."""
        return len(self.ids) - 1


@dataclass(frozen=True)
class PromptExample:
    ids: np.ndarray  # int32 [n]: prompt ending with the assistant header
    images: Optional[np.ndarray] = None  # float32 [m, H, W, C]


@dataclass(frozen=True)
class RankingExample:
    responses: tuple  # K LMExamples: prompt + answer + end-of-turn, weights on the answer (and the prompt's images)
    ranks: tuple  # K ints, 1 = best

    @property
    def images(self) -> Optional[np.ndarray]:
        return self.responses[0].images

    @property
    def k(self) -> int:
        return len(self.responses)


def _lm(ids: Sequence[int], weights: Sequence[float], images: Optional[np.ndarray] = None) -> LMExample:
    return LMExample(np.asarray(ids, np.int32), np.asarray(weights, np.float32), images)


def images_intact(ids: Sequence[int], images: Optional[np.ndarray], template: ChatTemplate) -> bool:
    """Whether ids hold exactly tokens-per-image image tokens per image (none without images): false when a
    truncation cut into an image, or an answer spelled a marker no image stands for."""
    if template.image_tokens is None:
        return True
    token_id, count = template.image_tokens
    return int(np.sum(np.asarray(ids) == token_id)) == count * (0 if images is None else len(images))


def encode_text(text: str, tokenizer: Tokenizer, seq_len: int, stats: DataStats) -> list[LMExample]:
    """BOS + text + EOS, cut into windows of seq_len + 1 tokens that overlap by one.

    With seq_len = 4 and ids [B a b c d e f E] (8 tokens): windows [B a b c d], [d e f E];
    as (input -> target) pairs: B->a a->b b->c c->d, then d->e e->f f->E. Every token but the first is a
    target exactly once, and no window is wasted on a one-token tail.
    """
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    ids = bos + tokenizer.encode(text) + [tokenizer.eos_id]
    out = [_lm(ids[s:s + seq_len + 1], np.ones(len(ids[s:s + seq_len + 1])))
           for s in range(0, len(ids) - 1, seq_len)]
    stats.examples += len(out)
    stats.tokens += sum(len(e.ids) for e in out)
    return out


def encode_conversation(messages: Sequence[dict], template: ChatTemplate, seq_len: int, on_overlength: str,
                        stats: DataStats, where: str = "", images: Optional[np.ndarray] = None) -> Optional[LMExample]:
    """An SFT conversation as one example, loss on the assistant's tokens; None if dropped. With images, an
    example whose truncation cuts an image's tokens is dropped ("image_tokens_cut")."""
    ids, mask = template.render(messages)
    truncated = len(ids) - 1 > seq_len
    if truncated:
        if on_overlength == "drop":
            stats.drop("overlength", where)
            return None
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    if not any(mask[1:]):  # nothing to learn: the answer was cut off (or the template marked none)
        stats.drop("no_target_in_window", where)
        return None
    if not images_intact(ids, images, template):
        stats.drop("image_tokens_cut", where)
        return None
    stats.truncated += int(truncated)  # counted only when kept: a dropped example is counted as dropped
    stats.examples += 1
    stats.tokens += len(ids)
    return _lm(ids, mask, images)


def _keep_end(ids: list[int], mask: list[int], limit: int, bos_id: Optional[int]) -> tuple[list[int], list[int]]:
    """The last `limit` tokens (and their mask), keeping a leading BOS in front: models are trained with it first."""
    if bos_id is not None and ids and ids[0] == bos_id:
        cut = len(ids) - (limit - 1)
        return [bos_id] + ids[cut:], [0] + mask[cut:]
    return ids[len(ids) - limit:], mask[len(mask) - limit:]


def encode_prompt(messages: Sequence[dict], template: ChatTemplate, max_len: int, on_overlength: str,
                  stats: DataStats, where: str = "", images: Optional[np.ndarray] = None) -> Optional[PromptExample]:
    ids = template.render_prompt(messages)
    truncated = len(ids) > max_len
    if truncated:
        if on_overlength == "drop":
            stats.drop("overlength", where)
            return None
        ids, _ = _keep_end(ids, [0] * len(ids), max_len, template.tokenizer.bos_id)
    if not images_intact(ids, images, template):
        stats.drop("image_tokens_cut", where)
        return None
    stats.truncated += int(truncated)
    stats.examples += 1
    stats.tokens += len(ids)
    return PromptExample(np.asarray(ids, np.int32), images)


def encode_ranking(ranking: Ranking, template: ChatTemplate, seq_len: int, on_overlength: str,
                   stats: DataStats, where: str = "", images: Optional[np.ndarray] = None) -> Optional[RankingExample]:
    """Each answer rendered after the prompt; the sequence ends with the end-of-turn token. The prompt's
    images go with every response."""
    responses, truncated = [], False
    for answer in ranking.responses:
        ids, mask = template.render(list(ranking.prompt) + [{"role": "assistant", "content": answer}])
        if len(ids) > seq_len:
            if on_overlength == "drop":
                stats.drop("overlength", where)
                return None
            ids, mask = _keep_end(ids, mask, seq_len, template.tokenizer.bos_id)
            truncated = True
        if not images_intact(ids, images, template):
            stats.drop("image_tokens_cut", where)
            return None
        responses.append(_lm(ids, mask, images))
    stats.truncated += int(truncated)
    stats.examples += 1
    stats.tokens += sum(len(r.ids) for r in responses)
    return RankingExample(tuple(responses), tuple(ranking.ranks))
