"""What happened to every row: the named error for malformed input, and the counts a run reports.

Two kinds of unusable rows:
  * malformed (bad JSON, not UTF-8, a missing field, empty text, ...): `data.on_malformed` decides
    whether the run stops with a MalformedDataError naming file, line and field, or counts a skip;
  * filtered (a well-formed row the task can't use, e.g. an HH pair whose two answers are
    identical): always skipped and counted, whatever the policy, because such rows are expected
    in real data and stopping on them would make the real file unusable.
Over-length examples are truncated or dropped per `data.on_overlength`, and counted too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

# How many locations per skip reason the report quotes, so a user can open the file at one.
_EXAMPLES_PER_REASON = 3


class MalformedDataError(ValueError):
    """A row that can't be used. `where` is "file:line" (or "name[split]:row i"), `field` the field path.

    Parsers raise it without a location (they see one row); the reader adds it with `at(where)`.
    """

    def __init__(self, reason: str, detail: str, field: Optional[str] = None, where: str = ""):
        self.reason, self.detail, self.field, self.where = reason, detail, field, where
        parts = [where] if where else []
        if field:
            parts.append(f"field '{field}'")
        parts.append(detail)
        super().__init__(": ".join(parts))

    def at(self, where: str) -> "MalformedDataError":
        return MalformedDataError(self.reason, self.detail, self.field, where)


class FilteredRow(Exception):
    """A well-formed row the format can't use; skipped and counted under `reason` regardless of policy."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(detail or reason)


@dataclass
class DataStats:
    """Counts for one source (or several, merged). Printed at the end of a run with `report()`."""

    name: str = "data"
    rows: int = 0  # rows read (kept + skipped)
    kept: int = 0  # rows that became at least one example
    examples: int = 0  # token examples made (a long text document becomes several)
    tokens: int = 0  # tokens in those examples
    truncated: int = 0  # examples cut to fit the sequence (on_overlength="truncate")
    skipped: collections.Counter = field(default_factory=collections.Counter)  # reason -> rows
    dropped: collections.Counter = field(default_factory=collections.Counter)  # reason -> examples
    where: dict = field(default_factory=dict)  # reason -> first few locations, for the report

    def skip(self, reason: str, where: str) -> None:
        self.rows += 1
        self.skipped[reason] += 1
        self._remember(reason, where)

    def drop(self, reason: str, where: str = "") -> None:
        self.dropped[reason] += 1
        self._remember(reason, where)

    def _remember(self, reason: str, where: str) -> None:
        seen = self.where.setdefault(reason, [])
        if where and len(seen) < _EXAMPLES_PER_REASON:
            seen.append(where)

    def merge(self, other: "DataStats") -> "DataStats":
        """A new DataStats holding both counts (e.g. train + eval, or several files)."""
        out = DataStats(name=self.name)
        for s in (self, other):
            out.rows += s.rows
            out.kept += s.kept
            out.examples += s.examples
            out.tokens += s.tokens
            out.truncated += s.truncated
            out.skipped.update(s.skipped)
            out.dropped.update(s.dropped)
            for reason, places in s.where.items():
                for w in places:
                    out._remember(reason, w)
        return out

    def as_dict(self) -> dict:
        return {"name": self.name, "rows": self.rows, "kept": self.kept, "examples": self.examples,
                "tokens": self.tokens, "truncated": self.truncated, "skipped": dict(self.skipped),
                "dropped": dict(self.dropped)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        """The inverse of `as_dict` (plus `where`, when the dict holds it): stats written beside a data store."""
        return cls(name=d["name"], rows=d["rows"], kept=d["kept"], examples=d["examples"], tokens=d["tokens"],
                   truncated=d["truncated"], skipped=collections.Counter(d["skipped"]),
                   dropped=collections.Counter(d["dropped"]), where={k: list(v) for k, v in d.get("where", {}).items()})

    def report(self) -> str:
        """Human-readable summary, e.g.

            data 'train': 2354 rows, 2190 kept -> 2190 examples, 512,301 tokens; 3 truncated
              skipped identical_pair: 18   (e.g. hh.jsonl.gz:41, hh.jsonl.gz:907)
              dropped overlength: 2
        """
        lines = [f"data {self.name!r}: {self.rows} rows, {self.kept} kept -> {self.examples} examples, "
                 f"{self.tokens:,} tokens; {self.truncated} truncated"]
        for label, counter in (("skipped", self.skipped), ("dropped", self.dropped)):
            for reason, n in sorted(counter.items()):
                places = self.where.get(reason, [])
                hint = f"   (e.g. {', '.join(places)})" if places else ""
                lines.append(f"  {label} {reason}: {n}{hint}")
        return "\n".join(lines)
