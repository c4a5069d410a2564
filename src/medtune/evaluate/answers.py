"""What a scored item says: whether its gold answer is usable, which letter a free-text reply chose,
and the per-item result line written to predictions.jsonl.

Torch-free, so the statistics, the comparison and the report read predictions without loading torch.
"""

from __future__ import annotations

import re
from typing import Any

from medtune.data.schema import LETTERS, Record


def gold_is_valid(record: Record) -> bool:
    """True when the record has >= 2 options and its answer is one of their letters."""
    options = record.get("options") or []
    answer = record.get("answer")
    return len(options) >= 2 and isinstance(answer, str) and answer in LETTERS[: len(options)]


_LETTER = r"([A-J])"
# Most specific first: an explicit "answer is X" beats a stray "(B)" in a restated option.
_ANSWER_PATTERNS = [
    re.compile(r"정답\s*(?:은|는|:|：)?\s*[:：]?\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?:답|선택지)\s*(?:은|는|:|：)\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?i:answer)\s*(?:is|:)?\s*(?:option\s*)?[:：]?\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"(?i:correct (?:option|choice) is)\s*\(?" + _LETTER + r"\)?(?![A-Za-z])"),
    re.compile(r"^\s*\(?" + _LETTER + r"\)?\s*(?:[.):：\]]|$|\s)"),
    re.compile(r"\(" + _LETTER + r"\)"),
    re.compile(r"(?<![A-Za-z])" + _LETTER + r"\s*(?:번|입니다|이다|가 정답|이 정답)"),
]
_NUMBER_ANSWER = re.compile(r"정답\s*(?:은|는|:)?\s*([1-9])\s*번|([1-9])\s*번\s*(?:입니다|이 정답|이다)")


def extract_answer(text: str, n_options: int) -> str | None:
    """The option letter a free-text reply chooses, or None when none is recognisable.

    Handles "Answer: B", "The answer is (B)", "정답: B", "정답은 B입니다", "(B)", "B.", a bare "B",
    and Korean option numbers ("정답은 2번" -> B). Only letters of existing options count.
    """
    valid = LETTERS[:n_options]
    for pattern in _ANSWER_PATTERNS:
        for match in pattern.finditer(text):
            if match.group(1) in valid:
                return match.group(1)
    for match in _NUMBER_ANSWER.finditer(text):
        number = int(match.group(1) or match.group(2))
        if 1 <= number <= n_options:
            return LETTERS[number - 1]
    return None


def item_result(record: Record, scores: list[float] | None, predicted: str | None, **extra: Any) -> dict:
    """The per-item output line: identity, gold, prediction, scores and grouping fields."""
    valid = gold_is_valid(record)
    if not valid:
        status, correct = "unscorable", None
    elif predicted is None:
        status, correct = "unanswered", False
    else:
        status, correct = "ok", predicted == record["answer"]
    return {
        "id": record["id"],
        "gold": record.get("answer"),
        "predicted": predicted,
        "correct": correct,
        "status": status,
        "scores": None if scores is None else [round(s, 6) for s in scores],
        "language": record.get("language"),
        "source": record.get("source"),
        "subject": record.get("subject"),
        "tags": list(record.get("tags") or []),
        **extra,
    }
