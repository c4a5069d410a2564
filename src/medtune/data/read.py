"""Read a `SourceConfig` (a file or folder, a generic format or a public layout) into `Record`s.

Every reader streams: one row in memory at a time, so a million-row JSONL never becomes a list.
Files are opened with `errors="surrogateescape"`: a row with bytes that are not UTF-8 is
quarantined by itself instead of aborting the whole file with a UnicodeDecodeError.
Readers yield `Record` or `Rejected`; whole-file problems (missing, empty, not JSON at all, a CSV
header without a needed column) raise `DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.config import SourceConfig
from medtune.data.validate import KNOWN_COLUMNS, Rejected, row_to_record
from medtune.errors import DataError

Row = dict[str, Any]
Item = Any  # Record | Rejected; kept loose so the hot loop does no isinstance on TypedDicts
KORMED_PROFESSIONS = ("doctor", "nurse", "pharm", "dentist")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # PubMedQA-sized abstracts in a user's CSV


def source_name(source: SourceConfig) -> str:
    """`name`, else the format of a public layout, else the file or folder stem."""
    if source.name:
        return source.name
    fmt = source.format if source.format != "auto" else detect_format(source.path)
    if fmt in ("jsonl", "json", "csv", "tsv", "parquet"):
        return source.path.stem
    return fmt


# ---------------------------------------------------------------- low-level file readers


# surrogateescape maps each undecodable byte to U+DC80..U+DCFF
_BAD_BYTES = re.compile("[\udc80-\udcff]")


def _has_bad_bytes(text: str) -> bool:
    return _BAD_BYTES.search(text) is not None


def _check_not_empty(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.strip().lstrip(b"\xef\xbb\xbf").strip():
        raise DataError(f"{path}: file is empty; remove it from the config or give it data")


def iter_jsonl(path: Path) -> Iterator[tuple[int, Row | str]]:
    """(line number, object) per non-blank line, or (line, reason) for a line that cannot be used."""
    _check_not_empty(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if _has_bad_bytes(line):
                yield lineno, "non-UTF-8 bytes in line"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, f"unparseable JSON line: {exc.msg} at column {exc.colno}"
                continue
            yield (
                lineno,
                obj if isinstance(obj, dict) else f"JSON line is a {type(obj).__name__}, not an object",
            )


def load_json(path: Path) -> Any:
    """A whole JSON document; a broken one is a `DataError` with line and column."""
    _check_not_empty(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not UTF-8 (bad byte at offset {exc.start}); re-save the file as UTF-8"
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None


def iter_json(path: Path) -> Iterator[tuple[int, str | None, Row | str]]:
    """(item index, key or None, object) for a JSON list of objects or an object of objects."""
    doc = load_json(path)
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, list):
        items: Iterator[tuple[str | None, Any]] = ((None, v) for v in doc)
    elif isinstance(doc, dict) and all(isinstance(v, dict) for v in doc.values()):
        items = iter(doc.items())
    else:
        raise DataError(f"{path}: expected a JSON list of objects or an object keyed by id")
    for i, (key, obj) in enumerate(items, start=1):
        yield i, key, obj if isinstance(obj, dict) else f"item is a {type(obj).__name__}, not an object"


def iter_csv(
    path: Path, delimiter: str = ",", header: bool | None = None, known: set[str] | None = None
) -> Iterator[tuple[int, Row | str]]:
    """(first physical line of the row, {column: value}) per row; positional columns are "0", "1"...

    Quoted fields may span lines, so the line is taken from the reader, not counted by hand.
    """
    _check_not_empty(path)
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            first = next(reader)
        except csv.Error as exc:
            raise DataError(f"{path}:1: cannot parse CSV: {exc}") from None
        if header is None:
            # Two known column names, not one: a headerless MMLU row ends in the answer `A`.
            header = sum(c.strip() in (known or ()) for c in first) >= min(2, len(first))
        columns = [c.strip() for c in first] if header else [str(i) for i in range(len(first))]
        if not header:
            yield 1, _row_or_reason(columns, first)
        start = reader.line_num + 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"{path}:{reader.line_num}: cannot parse CSV: {exc}") from None
            if values:  # a blank line between rows is not a record
                yield start, _row_or_reason(columns, values)
            start = reader.line_num + 1


def _row_or_reason(columns: list[str], values: list[str]) -> Row | str:
    if any(_has_bad_bytes(v) for v in values):
        return "non-UTF-8 bytes in row"
    if len(values) < len(columns):
        missing = columns[len(values)]
        return f"row has {len(values)} fields, header has {len(columns)} (missing column {missing!r})"
    if len(values) > len(columns):
        return f"row has {len(values)} fields, header has {len(columns)} (unquoted delimiter?)"
    return dict(zip(columns, values, strict=True))


def iter_parquet(path: Path) -> Iterator[tuple[int, Row | str]]:
    """(row number, row) in batches, so a large file never sits in memory whole."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, row


# ---------------------------------------------------------------- format detection


def detect_format(path: Path) -> str:
    """Guess a format from the extension and, for folders and JSON, the contents."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _detect_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        first = next((o for _, o in iter_jsonl(path) if isinstance(o, dict)), {})
        if isinstance(first.get("options"), dict) and "answer_idx" in first:
            return "medqa"
        if isinstance(first.get("choices"), list) and isinstance(first.get("answer"), int):
            return "medmcqa"
        return "jsonl"
    if suffix == ".json":
        head = path.read_text(encoding="utf-8", errors="replace")[:4000]
        if '"QUESTION"' in head and '"final_decision"' in head:
            return "pubmedqa"
        if '"instruction"' in head and '"output"' in head:
            return "genmedgpt"
        return "json"
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            first_line = f.readline()
        cols = {c.strip().strip('"') for c in first_line.rstrip("\r\n").split(",")}
        if {"q_number", "period", "question"} <= cols:
            return "kormedmcqa"
        if cols == {"input", "output"}:
            return "genmedgpt"
        return suffix[1:]
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(f"{path}: cannot guess the format from {suffix!r}; set `format:` in the source config")


def _detect_folder(path: Path) -> str:
    if (path / "ori_pqal.json").is_file():
        return "pubmedqa"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder holds no .jsonl/.json/.csv/.tsv/.parquet files")
    if any(p.parent.name in ("dev", "val", "test") and p.stem.endswith(f"_{p.parent.name}") for p in files):
        return "mmlu"
    kinds = {detect_format(p) for p in files if p.suffix.lower() != ".md"}
    if "genmedgpt" in kinds:
        return "genmedgpt"
    if len(kinds) == 1:
        return kinds.pop()
    raise DataError(f"{path}: folder mixes formats {sorted(kinds)}; use one source per format")


_DATA_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pq"}


def data_files(path: Path, split: str | None, pattern: str = "*") -> list[Path]:
    """Files of a folder source in sorted (deterministic) order; `split` keeps names containing it."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob(pattern) if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)
    if split:
        files = [p for p in files if split in (p.stem, p.parent.name) or p.stem.endswith(f"_{split}")]
    if not files:
        raise DataError(f"{path}: no data files{f' for split {split!r}' if split else ''}")
    return files


# ---------------------------------------------------------------- layouts


def _rows_to_records(
    rows: Iterator[tuple[int, Row | str]], path: Path, ctx: dict[str, Any]
) -> Iterator[Item]:
    for line, row in rows:
        if isinstance(row, str):
            yield Rejected(ctx["source"], str(path), line, row)
        else:
            yield row_to_record(row, ctx, (str(path), line), f"{ctx.get('id_prefix', '')}{line}")


def _read_generic(src: SourceConfig, ctx: dict[str, Any], fmt: str) -> Iterator[Item]:
    known = KNOWN_COLUMNS | {c for v in src.fields.values() for c in ([v] if isinstance(v, str) else v)}
    for path in data_files(src.path, src.split):
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = iter_jsonl(path)
        elif suffix == ".json":
            rows = ((i, {"id": k, **o} if k and isinstance(o, dict) else o) for i, k, o in iter_json(path))
        elif suffix in (".csv", ".tsv"):
            rows = iter_csv(path, "\t" if suffix == ".tsv" or fmt == "tsv" else ",", src.header, known)
        else:
            rows = iter_parquet(path)
        yield from _rows_to_records(rows, path, ctx)


def _split_of(path: Path, default: str) -> str:
    """`train` from `train.csv`, `test` from `anatomy_test.csv`, `dev` from `phrases_no_exclude_dev.jsonl`."""
    for name in ("train", "valid", "validation", "val", "dev", "test", "fewshot"):
        if path.stem == name or path.stem.endswith(f"_{name}"):
            return name
    return default


def _read_kormedmcqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split, "*.csv"):
        split = _split_of(path, ctx["split"])
        c = {**ctx, "split": split, "answer_index_base": 1}  # fewshot answers are 1-5
        for line, row in iter_csv(path, header=True):
            if isinstance(row, str):
                yield Rejected(ctx["source"], str(path), line, row)
                continue
            row.pop("", None)  # the unnamed pandas index column of 15 of the 16 files
            if not {"subject", "year", "period", "q_number"} <= row.keys():
                raise DataError(f"{path}: KorMedMCQA header needs subject, year, period, q_number")
            native = f"{row['subject']}-{row['year']}-{row['period']}-{row['q_number']}"
            rec = row_to_record(
                {**row, "id": native}, {**c, "subject": row["subject"]}, (str(path), line), native
            )
            if not isinstance(rec, Rejected) and is_medical_law(row):
                rec["tags"].append("medical_law")
            yield rec


def is_medical_law(row: Row) -> bool:
    """KorMedMCQA's 보건의약관계법규 block, by (profession, year, period, q_number).

    The table is in data/kormedmcqa/SOURCE.md (observed, not upstream). The dentist block moved
    from q76-95 to q66-85 in 2023; the doctor exam has a fixed block only from 2022.
    """
    try:
        year, period, q = int(row["year"]), int(row["period"]), int(row["q_number"])
    except (KeyError, ValueError):
        return False
    profession = row.get("subject")
    if profession == "nurse":
        return period == 3 and 66 <= q <= 85
    if profession == "pharm":
        return period == 4 and 64 <= q <= 83
    if profession == "dentist":
        return period == 4 and ((76 <= q <= 95) if year <= 2022 else (66 <= q <= 85))
    if profession == "doctor":
        return year >= 2022 and period == 1 and 1 <= q <= 20
    return False


def _read_pubmedqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    folder = src.path if src.path.is_dir() else src.path.parent
    main = src.path if src.path.is_file() else folder / "ori_pqal.json"
    # Test membership exists only as the id list in test_ground_truth.json; the rest is `train`.
    truth = folder / "test_ground_truth.json"
    if src.split in ("test", "train") and not truth.is_file():
        raise DataError(f"{truth}: needed to select PubMedQA split {src.split!r}")
    test_ids = set(load_json(truth)) if truth.is_file() else None
    for i, pmid, item in iter_json(main):
        split = ctx["split"] if test_ids is None else ("test" if str(pmid) in test_ids else "train")
        if src.split and split != src.split:
            continue
        if isinstance(item, str):
            yield Rejected(ctx["source"], str(main), i, item)
            continue
        row = {
            "id": pmid,
            "question": item.get("QUESTION"),
            "options": PUBMEDQA_OPTIONS,
            "answer": item.get("final_decision"),
            "context": item.get("CONTEXTS"),
            "explanation": item.get("LONG_ANSWER"),
        }
        yield row_to_record(row, {**ctx, "split": split}, (str(main), i), str(pmid))


def _read_mmlu(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split, "*.csv"):
        split = _split_of(path, ctx["split"])
        subject = path.stem.removesuffix(f"_{split}")
        c = {**ctx, "split": split, "subject": subject}
        for line, row in iter_csv(path, header=False):
            where = (str(path), line)
            # Native row ids would collide across subjects: the id carries the subject.
            yield (
                Rejected(ctx["source"], *where, row)
                if isinstance(row, str)
                else row_to_record(row, c, where, f"{subject}-{line}")
            )


def _read_medmcqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split):
        c = {**ctx, "split": _split_of(path, ctx["split"])}
        for line, row in iter_jsonl(path):
            if isinstance(row, dict) and isinstance(row.get("choices"), list):
                # "A. Impulse through..." -> "Impulse through..."
                row["choices"] = [_strip_letter(str(ch), i) for i, ch in enumerate(row["choices"])]
            yield from _rows_to_records(iter([(line, row)]), path, c)


def _strip_letter(text: str, i: int) -> str:
    prefix = f"{'ABCDEFGHIJ'[i]}. "
    return text[len(prefix) :] if text.startswith(prefix) else text


def _read_by_split(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    """MedQA and GenMedGPT: generic rows, split taken from each file name."""
    for path in data_files(src.path, src.split):
        sub = SourceConfig(path=path, format="auto", fields=src.fields, header=src.header)
        c = {**ctx, "split": _split_of(path, ctx["split"])}
        if ctx["format"] == "medqa":
            c["fields"] = {"answer": "answer_idx", **src.fields}  # `answer` holds the option text
        if ctx["format"] == "genmedgpt":
            # ko CSV and en JSON share split `train`: the language prefix keeps their row ids apart
            c["id_prefix"] = "ko-" if path.suffix.lower() == ".csv" else "en-"
            if path.suffix.lower() == ".csv":
                c["fields"] = {"prompt": "input", "response": "output", **src.fields}
        yield from _read_generic(sub, c, "auto")


_LAYOUTS = {
    "kormedmcqa": _read_kormedmcqa,
    "pubmedqa": _read_pubmedqa,
    "mmlu": _read_mmlu,
    "medmcqa": _read_medmcqa,
    "medqa": _read_by_split,
    "genmedgpt": _read_by_split,
}


def iter_source(src: SourceConfig, role: str, min_question_chars: int = 1) -> Iterator[Item]:
    """Every row of a source as a `Record` or `Rejected`, in file order (folders sorted by name).

    `role` ("train" or "eval") is the split of files that do not name one.
    """
    if not src.path.exists():
        raise DataError(f"{src.path}: no such file or folder (source {src.name or src.path.name!r})")
    fmt = src.format if src.format != "auto" else detect_format(src.path)
    ctx: dict[str, Any] = {
        "source": source_name(src),
        "split": src.split or role,
        "fields": src.fields,
        "answer_index_base": src.answer_index_base,
        "min_question_chars": min_question_chars,
        "format": fmt,
    }
    if fmt in _LAYOUTS:
        yield from _LAYOUTS[fmt](src, ctx)
    else:
        yield from _read_generic(src, ctx, fmt)
