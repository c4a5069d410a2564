"""Turn raw rows into `Record`s, and reject what cannot be trusted into the quarantine.

Nothing is dropped silently: every row that fails a check becomes a `Rejected` entry naming the
file, the line and the reason, and is written to `quarantine.jsonl` by the prepare stage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from medtune.data.schema import LETTERS, Provenance, Record

Row = dict[str, Any]

_LETTER = re.compile(r"^\(?([A-Za-z])[).:]?$")
_INDEX = re.compile(r"^-?[0-9]{1,9}$")  # not str.isdigit: "²" is a digit int() refuses, 5000 digits too


@dataclass(frozen=True, slots=True)
class Rejected:
    """One quarantined row: where it was and why it was refused."""

    source: str
    file: str
    line: int
    reason: str
    id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class RowError(ValueError):
    """A row-level problem; the reader turns it into a `Rejected` entry and goes on."""


def normalise_answer(raw: Any, options: list[str], index_base: int = 0) -> str:
    """The canonical letter of the gold option, from a letter, an integer index or the option text.

    `index_base` says how integers count: MedMCQA's `answer` is 0-based, KorMedMCQA fewshot's 1-based.
    """
    n = len(options)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RowError("missing answer")
    if isinstance(raw, bool):
        raise RowError(f"answer {raw!r} is not a letter, index or option text")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str) and _INDEX.match(raw.strip()):
        raw = int(raw.strip())
    if isinstance(raw, int):
        idx = raw - index_base
        if not 0 <= idx < n:
            raise RowError(f"answer index {raw} is out of range for {n} options ({index_base}-based)")
        return LETTERS[idx]
    text = str(raw).strip()
    m = _LETTER.match(text)
    if m and m.group(1).upper() in LETTERS[:n]:
        return m.group(1).upper()
    for i, option in enumerate(options):
        if option.strip() == text:
            return LETTERS[i]  # the option text itself (a letter out of range may still be a text: `z`)
    if m:
        raise RowError(f"answer {m.group(1).upper()!r} is not among the {n} options A-{LETTERS[n - 1]}")
    raise RowError(f"answer {text[:60]!r} is neither a letter, an index nor one of the option texts")


def _clean(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas/parquet
        return ""
    return str(value).strip()


def build_record(
    *,
    source: str,
    split: str,
    row_id: str,
    provenance: Provenance,
    question: Any = None,
    options: list[Any] | None = None,
    answer: Any = None,
    answer_index_base: int = 0,
    explanation: Any = None,
    context: Any = None,
    prompt: Any = None,
    response: Any = None,
    subject: str | None = None,
    min_question_chars: int = 1,
) -> Record:
    """A validated record (language is set later, by the prepare stage); raises `RowError`."""
    opts = [_clean(o) for o in (options or [])]
    while opts and not opts[-1]:
        opts.pop()  # trailing empty columns: a 4-option item in a 5-column layout
    is_mcqa = bool(opts) or answer not in (None, "")
    q, p, r = _clean(question), _clean(prompt), _clean(response)
    if is_mcqa:
        if len(q) < min_question_chars:
            raise RowError("empty question" if not q else f"question shorter than {min_question_chars} chars")
        if len(opts) < 2:
            raise RowError(f"needs at least 2 options, found {len(opts)}")
        if len(opts) > len(LETTERS):
            raise RowError(f"{len(opts)} options; at most {len(LETTERS)} are supported")
        if any(not o for o in opts):
            raise RowError(f"option {LETTERS[[bool(o) for o in opts].index(False)]} is empty")
        letter = normalise_answer(answer, opts, answer_index_base)
    else:
        if not p and q:
            p = q
        if not p:
            raise RowError("empty question/prompt")
        if not r:
            raise RowError("empty response")
        letter = None
    return Record(
        id=f"{source}:{split}:{row_id}",
        source=source,
        split=split,
        kind="mcqa" if is_mcqa else "instruction",
        language="other",
        subject=_clean(subject) or None,  # a JSON list or number is text here, like every field
        tags=[],
        question=q if is_mcqa else p,
        options=opts,
        answer=letter,
        explanation=_clean(explanation) or None,
        context=_clean(context) or None,
        prompt=None if is_mcqa else p,
        response=None if is_mcqa else r,
        provenance=provenance,
    )


def _text_fields(record: Record) -> Iterator[tuple[str, str]]:
    """(name, text) of every text field of a record, options named by their letter."""
    for name in ("prompt", "question"):
        yield name, record.get(name) or ""
    for letter, option in zip(LETTERS, record["options"], strict=False):
        yield f"option {letter}", option
    for name in ("context", "explanation", "response"):
        yield name, record.get(name) or ""


def check_field_lengths(record: Record, max_chars: int) -> None:
    """Raise `RowError` naming the first text field longer than `max_chars` (`data.max_field_chars`).

    No exam item or instruction needs that much text, a broken row often has it, and every later
    stage (PII scrub, dedupe, contamination, tokenising) costs memory in proportion to one field.
    """
    for name, text in _text_fields(record):
        if len(text) > max_chars:
            raise RowError(
                f"field too long: {name} has {len(text):,} chars (data.max_field_chars: {max_chars:,})"
            )


class DuplicateIds:
    """Remembers ids seen in this run; a second record with the same id is quarantined.

    Ids are the join key of predictions and reports, so two records with one id would silently
    overwrite each other downstream.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def check(self, record: Record) -> None:
        if record["id"] in self._seen:
            raise RowError(f"duplicate id {record['id']!r}")
        self._seen.add(record["id"])


# ---------------------------------------------------------------- generic rows -> records

_DEFAULTS = {
    "question": ["question", "stem", "query", "Question"],
    "options": ["options", "choices", "Options"],
    "answer": ["answer", "answer_idx", "label", "cop", "gold", "Answer"],
    "explanation": ["explanation", "cot", "rationale", "exp"],
    "context": ["context", "contexts", "passage"],
    "prompt": ["prompt"],
    "response": ["response", "output", "completion"],
    "id": ["id", "qid", "uid"],
    "subject": ["subject", "subject_name", "category"],
}
KNOWN_COLUMNS = {c for cols in _DEFAULTS.values() for c in cols} | set("ABCDE") | {"instruction", "input"}


def _pick(row: Row, key: str, fields: dict[str, str | list[str]]) -> Any:
    if key in fields:
        col = fields[key]
        if isinstance(col, list):
            return [row.get(c) for c in col]
        if col not in row:
            raise RowError(f"missing column {col!r} (mapped by fields.{key})")
        return row[col]
    return next((row[c] for c in _DEFAULTS[key] if c in row), None)


def _options_of(row: Row, fields: dict[str, str | list[str]]) -> list[Any]:
    value = _pick(row, "options", fields)
    if value is None:  # letter columns A, B, ... as in KorMedMCQA and many user CSVs
        value = [row[c] for c in "ABCDEFGHIJ" if c in row]
    if isinstance(value, dict):
        value = [value[k] for k in sorted(value)]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # JSONDecodeError, and ints past the digit limit
            raise RowError("options column is a string, not a list") from None
    if value is not None and not isinstance(value, list | tuple):
        raise RowError(f"options is a {type(value).__name__}, not a list")
    return list(value or [])


def _positional(row: Row) -> Row:
    """Headerless rows (MMLU): question, options..., answer letter last."""
    n = len(row)
    return {
        "question": row["0"],
        "options": [row[str(i)] for i in range(1, n - 1)],
        "answer": row[str(n - 1)],
    }


def row_to_record(row: Row, ctx: dict[str, Any], where: tuple[str, int], row_id: str) -> Record | Rejected:
    """One raw row to a `Record` (or `Rejected`) through the source's `fields` mapping."""
    source, split = ctx["source"], ctx["split"]
    fields: dict[str, str | list[str]] = ctx.get("fields") or {}
    try:
        if "0" in row and "question" not in fields and all(str(i) in row for i in range(len(row))):
            row = _positional(row)
        prompt = _pick(row, "prompt", fields)
        if prompt is None and ("instruction" in row or "input" in row):
            prompt = "\n\n".join(str(row[k]).strip() for k in ("instruction", "input") if row.get(k))
        native = _pick(row, "id", fields)
        context = _pick(row, "context", fields)
        return build_record(
            source=source,
            split=split,
            row_id=str(native) if native not in (None, "") else row_id,
            provenance={"file": where[0], "line": where[1]},
            question=_pick(row, "question", fields),
            options=_options_of(row, fields),
            answer=_pick(row, "answer", fields),
            answer_index_base=ctx.get("answer_index_base", 0),
            explanation=_pick(row, "explanation", fields),
            context="\n".join(map(str, context)) if isinstance(context, list) else context,
            prompt=prompt,
            response=_pick(row, "response", fields),
            subject=ctx.get("subject") or _pick(row, "subject", fields),
            min_question_chars=ctx.get("min_question_chars", 1),
        )
    except RowError as exc:
        return Rejected(source, where[0], where[1], str(exc), f"{source}:{split}:{row_id}")
