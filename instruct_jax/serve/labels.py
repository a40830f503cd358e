"""People's rankings of model answers: sessions (answers shown, anonymised) and the labels jsonl they become.

A row is what `python -m instruct_jax rm --set data.format=ranking data.source=labels.jsonl` reads as it is
(data/formats.py: prompt, responses, ranks; 1 = best, ties allowed, not all tied), plus who ranked, which
models (and weight versions) wrote each answer, the sampling settings and the time:

    {"prompt": [{"role": "user", "content": "..."}], "responses": ["...", "..."], "ranks": [2, 1],
     "labeler": "ana", "models": [["sft"], ["ppo", "sft"]], "versions": [[1], [3, 1]],
     "sampling": {"temperature": 1.0, ...}, "time": "2026-12-07T10:00:00+00:00", "id": "..."}

Identical answers are merged before they are shown (one response, every model that wrote it). Appends are
atomic: one `write` of the whole line under an exclusive `flock`, so concurrent submissions (threads or
processes) never tear or interleave a row.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import os
import random
import uuid

from instruct_jax.data.formats import MAX_RESPONSES, check_ranks
from instruct_jax.data.stats import MalformedDataError
from instruct_jax.serve.guard import ApiError


@dataclasses.dataclass
class Answer:
    id: str
    text: str
    models: list[str]
    versions: list[int]


@dataclasses.dataclass
class RankingSession:
    id: str
    messages: list[dict]
    answers: list[Answer]  # in the order shown
    sampling: dict

    @classmethod
    def build(cls, messages: list[dict], answers: list[tuple[str, str, int]], sampling: dict,
              rng: random.Random | None = None) -> "RankingSession":
        """answers: (text, model, version) per sample; empty ones dropped, identical ones merged, order shuffled."""
        merged: dict[str, Answer] = {}
        for text, model, version in answers:
            if not text:
                continue
            a = merged.setdefault(text, Answer("", text, [], []))
            a.models.append(model)
            a.versions.append(version)
        shown = list(merged.values())[:MAX_RESPONSES]
        (rng or random.Random()).shuffle(shown)
        for i, a in enumerate(shown):
            a.id = f"a{i}"
        return cls(uuid.uuid4().hex, messages, shown, sampling)

    def row(self, ranks: list[int], labeler: str) -> dict:
        return {"prompt": self.messages, "responses": [a.text for a in self.answers], "ranks": ranks,
                "labeler": labeler, "models": [a.models for a in self.answers],
                "versions": [a.versions for a in self.answers], "sampling": self.sampling,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "id": self.id}


def check_ranking(session: RankingSession, ranks: dict) -> list[int]:
    """The ranks in the session's answer order; ApiError(400) naming what is wrong."""
    ids = [a.id for a in session.answers]
    missing, unknown = [i for i in ids if i not in ranks], sorted(set(ranks) - set(ids))
    if missing or unknown:
        raise ApiError(400, f"rank every answer exactly once: missing {missing}, unknown {unknown}", "ranks")
    ordered = [ranks[i] for i in ids]
    try:
        check_ranks(ordered, len(ids), "ranks")
    except MalformedDataError as e:
        raise ApiError(400, str(e), "ranks") from None
    return ordered


class LabelStore:
    """Appends rows to a jsonl file atomically; returns each row's 1-based line number."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def append(self, row: dict) -> int:
        import json

        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                os.write(fd, line)
                os.fsync(fd)
                with open(self.path, "rb") as f:
                    return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
