"""The one normalised record every reader produces and every later stage consumes.

Records are plain dicts (JSON-serialisable, Arrow-friendly), so a million of them stream through
`datasets` without a class per row. `Record` documents and type-checks the shape.
"""

from __future__ import annotations

from typing import Literal, TypedDict

LETTERS = "ABCDEFGHIJ"


class Provenance(TypedDict):
    file: str
    line: int
    """1-based line (JSONL, CSV data row counting the header) or item index (JSON) in `file`."""


class Record(TypedDict):
    id: str
    """Unique across the run: `<source>:<split>:<native id or row>`."""
    source: str
    split: str
    kind: Literal["mcqa", "instruction"]
    language: Literal["ko", "en", "mixed", "other"]
    subject: str | None
    """Profession (KorMedMCQA), subject (MMLU), or None."""
    tags: list[str]
    """Derived tags, e.g. `medical_law` for KorMedMCQA's 보건의약관계법규 block."""
    question: str
    options: list[str]
    """Option texts in letter order (A, B, ...); empty for instruction data."""
    answer: str | None
    """Canonical answer letter (`A`...); None for instruction data."""
    explanation: str | None
    context: str | None
    """Supporting passage (PubMedQA abstract), shown before the question."""
    prompt: str | None
    response: str | None
    """Free-form instruction data: prompt and the response to train on."""
    provenance: Provenance


def answer_index(record: Record) -> int:
    """0-based index of the gold option."""
    assert record["answer"] is not None
    return LETTERS.index(record["answer"])
