"""Bookkeeping for the prepare stage: per-source counts that must add up, and the manifest file.

The manifest is the audit trail of a prepared dataset: where each record went (kept, quarantined,
deduplicated, removed as contamination), what the mix achieved, and the sha256 of every output,
so a training run can prove which data it saw. It holds no timestamps, so the same config and
seed give a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"


FLOW_KEYS = (
    "records_in",
    "quarantined",
    "duplicates_exact",
    "duplicates_near",
    "contaminated_removed",
    "kept",
)
"""The `SourceCounts` fields that say where records went, in table order: `records_in` is the sum of
the other five (`SourceCounts.check`)."""


@dataclass
class SourceCounts:
    """Where every record read from one source went. `records_in` is everything read."""

    role: str
    records_in: int = 0
    quarantined: int = 0
    duplicates_exact: int = 0
    duplicates_near: int = 0
    contaminated_removed: int = 0
    kept: int = 0
    """Survivors of every filter: the candidates the mixer chooses from (train) or the eval set."""
    mixed: int = 0
    """Records of this source in the final train.jsonl (can exceed `kept` when up-sampled)."""
    languages: Counter[str] = field(default_factory=Counter)
    pii: Counter[str] = field(default_factory=Counter)
    quarantine_reasons: Counter[str] = field(default_factory=Counter)
    quarantine_examples: dict[str, str] = field(default_factory=dict)
    """The first reject of each reason class, in full (`file:line: reason`): what to fix first."""

    @property
    def deduplicated(self) -> int:
        return self.duplicates_exact + self.duplicates_near

    def check(self, name: str) -> None:
        """records_in == kept + quarantined + deduplicated + contaminated_removed, or a bug."""
        total = self.kept + self.quarantined + self.deduplicated + self.contaminated_removed
        if total != self.records_in:
            raise AssertionError(f"source {name!r}: {self.records_in} records in but {total} accounted for")

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs and counts the pairs.
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["deduplicated"] = self.deduplicated
        for key in ("languages", "pii", "quarantine_reasons", "quarantine_examples"):
            out[key] = dict(sorted(out[key].items()))
        return out


def reason_class(reason: str) -> str:
    """`answer 'F' is not among the 4 options A-D` -> `answer 'F' is not among ...`: a short histogram key."""
    for stem in ("unparseable JSON", "non-UTF-8", "row has", "answer", "empty", "duplicate id", "missing"):
        if reason.startswith(stem):
            return stem
    return reason.split(":")[0][:40]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """Stable JSON: sorted keys, UTF-8 text, trailing newline (byte-identical across runs)."""
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def output_hashes(out_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """sha256, size and line count of each output file."""
    result = {}
    for name in names:
        path = out_dir / name
        with path.open("rb") as f:
            lines = sum(1 for _ in f)
        result[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "lines": lines}
    return result
