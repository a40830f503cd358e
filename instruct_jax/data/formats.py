"""Rows -> records: the field mapping from the experiment turns a raw row into one of four shapes.

    format    record                                        example row (default field names)
    text      str                                           {"text": "First Citizen: ..."}
    sft       list[Message] ending with an assistant turn   {"prompt": "Hi", "response": "Hello!"}
    prompt    list[Message] ending with a user turn         {"prompt": "Write a haiku"}
    pairwise  Ranking, K = 2, ranks (1, 2)                  {"prompt": "Hi", "chosen": "Hey!", "rejected": "Go away"}
    ranking   Ranking, 2 <= K <= 9, 1 = best, ties ok       {"prompt": "Hi", "responses": ["a", "b"], "ranks": [2, 1]}

A Message is {"role": "system" | "user" | "assistant", "content": str}. A prompt field may hold a
string (one user turn) or a list of messages; ShareGPT-style {"from": "human", "value": ...} works too.
With `transcript="hh"` string fields are HH-RLHF dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...").

Parsers raise MalformedDataError(reason, detail, field) for rows that break the format and
FilteredRow for well-formed rows the format can't use; the reader adds the location.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from instruct_jax.data.config import DataConfig
from instruct_jax.data.stats import FilteredRow, MalformedDataError

Message = dict  # {"role": str, "content": str}
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
MAX_RESPONSES = 9


@dataclass(frozen=True)
class Ranking:
    """K answers to one prompt, ranked by a labeler. ranks[i] = 1 means responses[i] is best; equal ranks tie."""

    prompt: tuple  # Messages ending with a user turn
    responses: tuple  # K strings
    ranks: tuple  # K ints >= 1


# ----------------------------------------------------------------------------- field paths
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def parse_field_path(path: str) -> list:
    """"instances[0].output" -> ["instances", 0, "output"]."""
    return [int(index) if index else key for key, index in _PATH_PART.findall(path)]


def get_field(row: Any, path: str) -> Any:
    """The value at `path` in a row; MalformedDataError("missing_field") names the path when absent or null."""
    value = row
    for part in parse_field_path(path):
        if isinstance(part, int) and isinstance(value, list) and part < len(value):
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise MalformedDataError("missing_field", "missing", field=path)
    if value is None:
        raise MalformedDataError("missing_field", "missing (null)", field=path)
    return value


def get_text(row: Any, path: str, allow_empty: bool = False) -> str:
    value = get_field(row, path)
    if not isinstance(value, str):
        raise MalformedDataError("wrong_type", f"expected a string, got {type(value).__name__}", field=path)
    if not allow_empty and not value.strip():
        raise MalformedDataError("empty_text", "empty text", field=path)
    return value


# ----------------------------------------------------------------------------- conversations
def to_messages(value: Any, path: str, transcript: str = "none") -> list[Message]:
    """A field's value as messages: a string is one user turn (or an HH dialogue), a list is checked."""
    if isinstance(value, str):
        if not value.strip():
            raise MalformedDataError("empty_text", "empty text", field=path)
        return parse_hh_transcript(value, path) if transcript == "hh" else [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise MalformedDataError("wrong_type", f"expected a string or a list of messages, got {type(value).__name__}",
                                 field=path)
    messages = []
    for i, m in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(m, dict):
            raise MalformedDataError("wrong_type", f"expected a message object, got {type(m).__name__}", field=where)
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise MalformedDataError("bad_role", f"role must be one of {list(ROLES)}, got {role!r}", field=where)
        if not isinstance(content, str):
            raise MalformedDataError("wrong_type", f"content must be a string, got {type(content).__name__}",
                                     field=where)
        messages.append({"role": role, "content": content})
    check_conversation(messages, path)
    return messages


def check_conversation(messages: list[Message], path: str = "messages") -> None:
    """A system turn only first, no empty user/assistant turn, at least one non-system turn."""
    if not any(m["role"] != "system" for m in messages):
        raise MalformedDataError("empty_text", "no user or assistant turn", field=path)
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise MalformedDataError("bad_role", "a system turn may only come first", field=f"{path}[{i}]")
        if m["role"] != "system" and not m["content"].strip():
            raise MalformedDataError("empty_text", f"empty {m['role']} turn", field=f"{path}[{i}]")


_HH_TAG = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(text: str, path: str) -> list[Message]:
    """"\\n\\nHuman: Hi\\n\\nAssistant: Hello" -> [user "Hi", assistant "Hello"]."""
    tags = list(_HH_TAG.finditer(text))
    if not tags or text[:tags[0].start()].strip():
        raise MalformedDataError("bad_transcript", "expected a dialogue starting with '\\n\\nHuman:'", field=path)
    messages = []
    for tag, following in zip(tags, tags[1:] + [None]):
        content = text[tag.end():following.start() if following else len(text)].strip()
        messages.append({"role": "user" if tag.group(1) == "Human" else "assistant", "content": content})
    return messages


def split_hh_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an HH-RLHF pair into (prompt dialogue, chosen answer, rejected answer).

    Both sides repeat the dialogue and differ in the last Assistant turn. The split is at the last
    "\\n\\nAssistant:" lying inside the common prefix of the two texts:

        chosen   = "\\n\\nHuman: Hi\\n\\nAssistant: Hello!"
        rejected = "\\n\\nHuman: Hi\\n\\nAssistant: Go away"
        -> ("\\n\\nHuman: Hi", "Hello!", "Go away")

    Rows that don't fit are FilteredRow: prompt_mismatch (after the split an answer still holds a
    Human/Assistant tag, i.e. the two sides have different dialogues), identical_pair, empty_response.
    """
    if chosen == rejected:
        raise FilteredRow("identical_pair")
    common = len(_common_prefix(chosen, rejected))
    tag = "\n\nAssistant:"
    cut = chosen.rfind(tag, 0, common)  # rfind's end bound keeps the whole tag inside the prefix
    if cut < 0:
        raise FilteredRow("prompt_mismatch", "no shared Assistant turn")
    answers = chosen[cut + len(tag):], rejected[cut + len(tag):]
    if any(_HH_TAG.search(a) for a in answers):  # one side has turns the other lacks: different dialogues
        raise FilteredRow("prompt_mismatch")
    answers = tuple(a.strip() for a in answers)
    if not all(answers):
        raise FilteredRow("empty_response")
    return chosen[:cut], answers[0], answers[1]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


# ----------------------------------------------------------------------------- rows -> records
def prompt_messages(row: Any, cfg: DataConfig) -> list[Message]:
    """The conversation before the answer: messages_field or prompt_field (+ input_field), ending with a user turn.

    Trailing assistant turns are dropped (so an SFT dialogue or an HH "chosen" text can serve as a prompt).
    """
    path = cfg.messages_field or cfg.prompt_field
    messages = to_messages(get_field(row, path), path, cfg.transcript)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] != "user":
        raise MalformedDataError("bad_role", "a prompt must end with a user turn", field=path)
    extra = _optional_text(row, cfg.input_field) if cfg.input_field else ""
    if extra:
        messages[-1] = {"role": "user", "content": f"{messages[-1]['content']}\n\n{extra}"}
    return messages


def _optional_text(row: Any, path: str) -> str:
    """An optional field: missing, null or empty all mean "no extra input"."""
    try:
        value = get_field(row, path)
    except MalformedDataError:
        return ""
    if not isinstance(value, str):
        raise MalformedDataError("wrong_type", f"expected a string, got {type(value).__name__}", field=path)
    return value.strip()


def sft_record(row: Any, cfg: DataConfig) -> list[Message]:
    """A conversation that ends with the assistant's answer.

    With messages_field: the messages as given (they must hold an assistant turn). Otherwise
    [user: prompt (+ "\\n\\n" + input)] + [assistant: response]; e.g. the Self-Instruct mapping
    (SELF_INSTRUCT_FIELDS) turns {"instruction": "Sort", "instances": [{"input": "3 1", "output": "1 3"}]}
    into [user "Sort\\n\\n3 1", assistant "1 3"].
    """
    if cfg.messages_field:
        messages = to_messages(get_field(row, cfg.messages_field), cfg.messages_field, cfg.transcript)
        while messages and messages[-1]["role"] != "assistant":  # trailing user turns teach nothing
            messages = messages[:-1]
        if not messages:
            raise MalformedDataError("no_assistant_turn", "no assistant turn to learn from", field=cfg.messages_field)
        return messages
    prompt = prompt_messages(row, cfg)
    return prompt + [{"role": "assistant", "content": get_text(row, cfg.response_field)}]


def text_record(row: Any, cfg: DataConfig) -> str:
    if isinstance(row, str):  # a row of a .txt file is its text
        if not row.strip():
            raise MalformedDataError("empty_text", "empty text")
        return row
    return get_text(row, cfg.text_field)


def ranking_record(row: Any, cfg: DataConfig) -> Ranking:
    """A pairwise or K-wise row as a Ranking (pairwise is K = 2 with ranks (1, 2))."""
    if cfg.format == "pairwise" and cfg.transcript == "hh":
        dialogue, chosen, rejected = split_hh_pair(get_text(row, cfg.chosen_field), get_text(row, cfg.rejected_field))
        return Ranking(tuple(parse_hh_transcript(dialogue, cfg.chosen_field)), (chosen, rejected), (1, 2))
    prompt = tuple(prompt_messages(row, cfg))
    if cfg.format == "pairwise":
        chosen, rejected = get_text(row, cfg.chosen_field), get_text(row, cfg.rejected_field)
        if chosen == rejected:
            raise FilteredRow("identical_pair")
        return Ranking(prompt, (chosen, rejected), (1, 2))
    responses, ranks = get_field(row, cfg.responses_field), get_field(row, cfg.ranks_field)
    if not isinstance(responses, list) or not 2 <= len(responses) <= MAX_RESPONSES:
        raise MalformedDataError("bad_ranks", f"expected a list of 2..{MAX_RESPONSES} responses",
                                 field=cfg.responses_field)
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise MalformedDataError("empty_text", "each response must be a non-empty string",
                                     field=f"{cfg.responses_field}[{i}]")
    check_ranks(ranks, len(responses), cfg.ranks_field)
    if any(a == b and ra != rb for i, (a, ra) in enumerate(zip(responses, ranks))
           for b, rb in zip(responses[i + 1:], ranks[i + 1:])):
        raise FilteredRow("identical_pair", "the same response text ranked twice, differently")
    return Ranking(prompt, tuple(responses), tuple(ranks))


def check_ranks(ranks: Any, k: int, path: str = "ranks") -> None:
    """K integers in 1..K, 1 = best, ties allowed, not all tied (a ranking with no ordered pair teaches nothing)."""
    if not isinstance(ranks, list) or len(ranks) != k:
        raise MalformedDataError("bad_ranks", f"expected a list of {k} ranks (one per response)", field=path)
    if not all(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= k for r in ranks):
        raise MalformedDataError("bad_ranks", f"ranks must be integers in 1..{k} (1 = best), got {ranks}", field=path)
    if len(set(ranks)) < 2:
        raise MalformedDataError("bad_ranks", "all responses tie: no pair to learn from", field=path)


def row_to_record(row: Any, cfg: DataConfig):
    """Dispatch on cfg.format; returns str | list[Message] | Ranking."""
    if cfg.format == "text":
        return text_record(row, cfg)
    if isinstance(row, str):
        raise MalformedDataError("not_an_object", f"format {cfg.format!r} needs JSON/parquet rows, got a line of text")
    if cfg.format == "sft":
        return sft_record(row, cfg)
    if cfg.format == "prompt":
        return prompt_messages(row, cfg)
    return ranking_record(row, cfg)


def prompt_key(record) -> str:
    """The text that decides a record's train/eval side, so one prompt never lands on both sides."""
    if isinstance(record, str):
        return record
    if isinstance(record, Ranking):
        messages = list(record.prompt)
    else:
        messages = record[:-1] if record and record[-1]["role"] == "assistant" else record
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in messages)


# ----------------------------------------------------------------------------- Self-Instruct
# Field mapping for yizhongw/self-instruct seed tasks: {"instruction", "instances": [{"input", "output"}]}.
# Every seed task has one instance; the instruction and a non-empty input form the user turn.
SELF_INSTRUCT_FIELDS = {"format": "sft", "prompt_field": "instruction", "input_field": "instances[0].input",
                        "response_field": "instances[0].output", "messages_field": ""}


def self_instruct_config(path: str, **overrides) -> DataConfig:
    """A DataConfig reading Self-Instruct seed tasks (e.g. data/self_instruct_seed_tasks.jsonl) as SFT."""
    return DataConfig(source=path, **{**SELF_INSTRUCT_FIELDS, **overrides})
