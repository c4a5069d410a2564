"""Read a `SourceConfig` (a file or folder, a generic format or a public layout) into `Record`s.

The declared `format:` decides how a file is read; the extension only guesses when it is `auto`.
Every reader streams one row at a time (`medtune.data.files`), after whole-file checks that turn
a file that cannot be data at all (binary, another encoding, empty) into one `DataError` naming it.
Readers yield `Record` or `Rejected`.

Ids are the join key of predictions and reports. A row without an id of its own gets one made of
its file (relative to the source path) and line, `shard-00002.jsonl:4`: unique by construction
across the files of a folder and across sources of one layout, and the same on every run.

Finding files, the generic readers and the public layouts stay in one module (~400 lines): the
layouts are a few lines each on top of the same file-finding and row helpers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.config import SourceConfig
from medtune.data.files import iter_csv, iter_json, iter_parquet, load_json, open_text
from medtune.data.validate import KNOWN_COLUMNS, Rejected, row_to_record
from medtune.errors import DataError

Row = dict[str, Any]
Rows = Iterator[tuple[int, Row | str]]
Item = Any  # Record | Rejected; kept loose so the hot loop does no isinstance on TypedDicts
KORMED_PROFESSIONS = ("doctor", "nurse", "pharm", "dentist")
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]

GENERIC_SUFFIXES = {
    "jsonl": (".jsonl",),
    "json": (".json",),
    "csv": (".csv",),
    "tsv": (".tsv",),
    "parquet": (".parquet", ".pq"),
}
"""Files a folder source of a generic format reads; a file named directly is read whatever its name."""
_SUFFIX_FORMAT = {suffix: fmt for fmt, suffixes in GENERIC_SUFFIXES.items() for suffix in suffixes}
_DATA_SUFFIXES = set(_SUFFIX_FORMAT)
_LAYOUT_SUFFIXES = {
    "kormedmcqa": (".csv",),
    "mmlu": (".csv",),
    "medqa": (".jsonl", ".json"),
    "medmcqa": (".jsonl", ".json"),
    "genmedgpt": (".csv", ".json", ".jsonl"),
}

SUBJECT_ALIASES = {"kormedmcqa": {"pharmacy": "pharm"}}
"""Per layout, subject names that mean one subject: KorMedMCQA's 2024 pharmacist rows say
`pharmacy` where every other year says `pharm` (data/kormedmcqa/SOURCE.md)."""


def normalise_subject(layout: str, subject: Any) -> str:
    name = str(subject if subject is not None else "").strip()
    return SUBJECT_ALIASES.get(layout, {}).get(name, name)


def source_name(source: SourceConfig) -> str:
    """`name`, else the format of a public layout, else the file or folder stem."""
    if source.name:
        return source.name
    fmt = source.format if source.format != "auto" else detect_format(source.path, source.encoding)
    if fmt in GENERIC_SUFFIXES:
        return source.path.stem
    return fmt


# ---------------------------------------------------------------- format detection (format: auto)


def detect_format(path: Path, encoding: str = "utf-8") -> str:
    """Guess a format from the extension and, for folders and JSON, the contents."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        return _detect_folder(path, encoding)
    suffix = path.suffix.lower()
    fmt = _SUFFIX_FORMAT.get(suffix)
    if fmt is None:
        raise DataError(
            f"{path}: cannot guess the format from {suffix!r}; set `format:` in the source config"
        )
    if fmt == "parquet":
        return fmt
    with open_text(path, encoding) as f:
        head = f.read(4000)
    if fmt == "jsonl":
        first = _first_object(head)
        if isinstance(first.get("options"), dict) and "answer_idx" in first:
            return "medqa"
        if isinstance(first.get("choices"), list) and isinstance(first.get("answer"), int):
            return "medmcqa"
    if fmt == "json":
        if '"QUESTION"' in head and '"final_decision"' in head:
            return "pubmedqa"
        if '"instruction"' in head and '"output"' in head:
            return "genmedgpt"
    if fmt in ("csv", "tsv"):
        first_line = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
        cols = {c.strip().strip('"') for c in first_line.split("," if fmt == "csv" else "\t")}
        if {"q_number", "period", "question"} <= cols:
            return "kormedmcqa"
        if cols == {"input", "output"}:
            return "genmedgpt"
    return fmt


def _first_object(head: str) -> dict[str, Any]:
    """The first line as a JSON object, or {} (a pretty-printed file, a broken line: no layout)."""
    line = next((x for x in head.splitlines() if x.strip()), "")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _detect_folder(path: Path, encoding: str) -> str:
    if (path / "ori_pqal.json").is_file():
        return "pubmedqa"
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _DATA_SUFFIXES)
    if not files:
        raise DataError(f"{path}: folder holds no .jsonl/.json/.csv/.tsv/.parquet files")
    if any(p.parent.name in ("dev", "val", "test") and p.stem.endswith(f"_{p.parent.name}") for p in files):
        return "mmlu"
    kinds = {detect_format(p, encoding) for p in files}
    if "genmedgpt" in kinds:
        return "genmedgpt"
    if len(kinds) == 1:
        return kinds.pop()
    raise DataError(f"{path}: folder mixes formats {sorted(kinds)}; use one source per format")


def _in_split(path: Path, split: str | None) -> bool:
    return not split or split in (path.stem, path.parent.name) or path.stem.endswith(f"_{split}")


def data_files(path: Path, split: str | None, suffixes: tuple[str, ...]) -> list[Path]:
    """Files of a folder source in sorted (deterministic) order; `split` keeps names containing it."""
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes and _in_split(p, split)
    )
    if not files:
        where = f" for split {split!r}" if split else ""
        raise DataError(f"{path}: no {'/'.join(suffixes)} files{where}")
    return files


def _check_no_other_data(path: Path, split: str | None, fmt: str) -> None:
    """A folder read as one generic format holds no data files of another: they would be skipped."""
    suffixes = GENERIC_SUFFIXES[fmt]
    other = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in _DATA_SUFFIXES
        and p.suffix.lower() not in suffixes
        and _in_split(p, split)
    )
    if other:
        more = f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise DataError(
            f"{path}: format {fmt} reads only its {'/'.join(suffixes)} files, but the folder also holds "
            f"{other[0].relative_to(path)}{more}; give those a source of their own, or move them out"
        )


# ---------------------------------------------------------------- generic formats


def _file_rows(path: Path, fmt: str, src: SourceConfig) -> Rows:
    """The rows of one file read as generic format `fmt`, whatever the file is called."""
    if fmt in ("jsonl", "json"):
        # An object keyed by id (PubMedQA-style) gives each row its key as `id`.
        return (
            (n, {"id": key, **obj} if key is not None and isinstance(obj, dict) else obj)
            for n, key, obj in iter_json(path, src.encoding)
        )
    if fmt in ("csv", "tsv"):
        # Column names that tell a header row from a data row, when `header:` is not given.
        known = KNOWN_COLUMNS | {c for v in src.fields.values() for c in ([v] if isinstance(v, str) else v)}
        return iter_csv(path, "\t" if fmt == "tsv" else ",", src.header, known, src.encoding)
    return iter_parquet(path)


def _file_key(path: Path, ctx: dict[str, Any]) -> str:
    """The file part of a generated row id: its path under a folder source, else its name.

    Record ids are `source:split:row_id` and source names are unique per role
    (`named_sources`), so with the file's path in the row id, generated ids are unique by
    construction: shards of one folder, or `ko/train.jsonl` and `en/train.jsonl` as two sources.
    """
    root = ctx["root"]
    return path.relative_to(root).as_posix() if path != root else path.name


def named_sources(sources: list[SourceConfig], key: str) -> list[SourceConfig]:
    """The sources of one role, each with a distinct `name` (ids and counts are keyed by it).

    Two sources whose default names collide (two MedQA folders, or `ko/train.jsonl` and
    `en/train.jsonl`) are told apart by the end of their paths: `medqa/us`, `train/ko/train`.
    Two explicit `name:`s that repeat, or one path given twice, are errors naming both entries.
    """
    names = [source_name(src) for src in sources]
    for name in sorted(set(names)):
        group = [i for i, n in enumerate(names) if n == name]
        if len(group) == 1:
            continue
        explicit = [i for i in group if sources[i].name]
        if explicit or len({sources[i].path for i in group}) < len(group):
            a, b = group[:2]
            raise DataError(
                f"{key}[{a}] and {key}[{b}] are both named {name!r} ({sources[a].path} and "
                f"{sources[b].path}); give each a distinct `name:`"
            )
        for depth in range(1, max(len(sources[i].path.parts) for i in group) + 1):
            tails = ["/".join(sources[i].path.with_suffix("").parts[-depth:]) for i in group]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(group, tails, strict=True):
            names[i] = f"{name}/{tail}"
    return [src.model_copy(update={"name": n}) for src, n in zip(sources, names, strict=True)]


def _rows_to_records(rows: Rows, path: Path, ctx: dict[str, Any]) -> Iterator[Item]:
    key = _file_key(path, ctx)
    for line, row in rows:
        if isinstance(row, str):
            yield Rejected(ctx["source"], str(path), line, row)
        else:
            yield row_to_record(row, ctx, (str(path), line), f"{key}:{line}")


def _read_generic(src: SourceConfig, ctx: dict[str, Any], fmt: str) -> Iterator[Item]:
    if src.path.is_dir():
        _check_no_other_data(src.path, src.split, fmt)
    for path in data_files(src.path, src.split, GENERIC_SUFFIXES[fmt]):
        yield from _rows_to_records(_file_rows(path, fmt, src), path, ctx)


# ---------------------------------------------------------------- layouts


def _split_of(path: Path, default: str) -> str:
    """`train` from `train.csv`, `test` from `anatomy_test.csv`, `dev` from `phrases_no_exclude_dev.jsonl`."""
    for name in ("train", "valid", "validation", "val", "dev", "test", "fewshot"):
        if path.stem == name or path.stem.endswith(f"_{name}"):
            return name
    return default


def _read_kormedmcqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split, _LAYOUT_SUFFIXES["kormedmcqa"]):
        split = _split_of(path, ctx["split"])
        c = {**ctx, "split": split, "answer_index_base": 1}  # fewshot answers are 1-5
        for line, row in iter_csv(path, header=True, encoding=src.encoding):
            if isinstance(row, str):
                yield Rejected(ctx["source"], str(path), line, row)
                continue
            row.pop("", None)  # the unnamed pandas index column of 15 of the 16 files
            if not {"subject", "year", "period", "q_number"} <= row.keys():
                raise DataError(f"{path}: KorMedMCQA header needs subject, year, period, q_number")
            row["subject"] = subject = normalise_subject("kormedmcqa", row["subject"])
            native = f"{subject}-{row['year']}-{row['period']}-{row['q_number']}"
            rec = row_to_record({**row, "id": native}, {**c, "subject": subject}, (str(path), line), native)
            if not isinstance(rec, Rejected) and is_medical_law(row):
                rec["tags"].append("medical_law")
            yield rec


def is_medical_law(row: Row) -> bool:
    """KorMedMCQA's 보건의약관계법규 block, by (profession, year, period, q_number).

    The table is in data/kormedmcqa/SOURCE.md (observed, not upstream). The dentist block moved
    from q76-95 to q66-85 in 2023; the doctor exam has a fixed block only from 2022. `subject` may
    be raw (`pharmacy` in 2024): it is normalised here too.
    """
    try:
        year, period, q = int(row["year"]), int(row["period"]), int(row["q_number"])
    except (KeyError, ValueError, TypeError):
        return False
    profession = normalise_subject("kormedmcqa", row.get("subject"))
    if profession == "nurse":
        return period == 3 and 66 <= q <= 85
    if profession == "pharm":
        return period == 4 and 64 <= q <= 83
    if profession == "dentist":
        return period == 4 and ((76 <= q <= 95) if year <= 2022 else (66 <= q <= 85))
    if profession == "doctor":
        return year >= 2022 and period == 1 and 1 <= q <= 20
    return False


def _pubmedqa_test_ids(truth: Path, encoding: str) -> set[str]:
    """PMIDs of the official test list: the keys of `test_ground_truth.json` (or its items)."""
    doc = load_json(truth, encoding)
    ids = doc.keys() if isinstance(doc, dict) else doc if isinstance(doc, list) else [doc]
    if not all(isinstance(x, str | int) for x in ids):
        raise DataError(f"{truth}: expected PMIDs as object keys or a list of ids")
    return {str(x) for x in ids}


def _read_pubmedqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    folder = src.path if src.path.is_dir() else src.path.parent
    main = src.path if src.path.is_file() else folder / "ori_pqal.json"
    # Test membership exists only as the id list in test_ground_truth.json; the rest is `train`.
    truth = folder / "test_ground_truth.json"
    if src.split in ("test", "train") and not truth.is_file():
        raise DataError(f"{truth}: needed to select PubMedQA split {src.split!r}")
    test_ids = _pubmedqa_test_ids(truth, src.encoding) if truth.is_file() else None
    key = _file_key(main, ctx)
    for i, pmid, item in iter_json(main, src.encoding):
        row_id = f"{key}:{i}" if pmid is None else str(pmid)  # a list, not an object keyed by PMID
        split = ctx["split"] if test_ids is None else ("test" if row_id in test_ids else "train")
        if src.split and split != src.split:
            continue
        if isinstance(item, str):
            yield Rejected(ctx["source"], str(main), i, item)
            continue
        row = {
            "id": row_id,
            "question": item.get("QUESTION"),
            "options": PUBMEDQA_OPTIONS,
            "answer": item.get("final_decision"),
            "context": item.get("CONTEXTS"),
            "explanation": item.get("LONG_ANSWER"),
        }
        yield row_to_record(row, {**ctx, "split": split}, (str(main), i), row_id)


def _read_mmlu(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split, _LAYOUT_SUFFIXES["mmlu"]):
        split = _split_of(path, ctx["split"])
        c = {**ctx, "split": split, "subject": path.stem.removesuffix(f"_{split}")}
        yield from _rows_to_records(iter_csv(path, header=False, encoding=src.encoding), path, c)


def _read_medmcqa(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    for path in data_files(src.path, src.split, _LAYOUT_SUFFIXES["medmcqa"]):
        c = {**ctx, "split": _split_of(path, ctx["split"])}
        yield from _rows_to_records(map(_strip_choice_letters, _file_rows(path, "json", src)), path, c)


def _strip_choice_letters(item: tuple[int, Row | str]) -> tuple[int, Row | str]:
    """MedMCQA's "A. Impulse through..." -> "Impulse through..."."""
    line, row = item
    if isinstance(row, dict) and isinstance(row.get("choices"), list):
        row["choices"] = [_strip_letter(ch, i) for i, ch in enumerate(row["choices"])]
    return line, row


def _strip_letter(choice: Any, i: int) -> Any:
    return choice.removeprefix(f"{chr(ord('A') + i)}. ") if isinstance(choice, str) else choice


def _read_by_split(src: SourceConfig, ctx: dict[str, Any]) -> Iterator[Item]:
    """MedQA and GenMedGPT: generic rows, split taken from each file name.

    MedQA files are JSON (lines or one array); GenMedGPT's Korean half is a CSV of `input,output`.
    """
    fmt = ctx["format"]
    for path in data_files(src.path, src.split, _LAYOUT_SUFFIXES[fmt]):
        c = {**ctx, "split": _split_of(path, ctx["split"])}
        file_fmt = "json"
        if fmt == "medqa":
            c["fields"] = {"answer": "answer_idx", **src.fields}  # `answer` holds the option text
        elif _SUFFIX_FORMAT.get(path.suffix.lower()) in ("csv", "tsv"):
            file_fmt = _SUFFIX_FORMAT[path.suffix.lower()]
            c["fields"] = {"prompt": "input", "response": "output", **src.fields}
        yield from _rows_to_records(_file_rows(path, file_fmt, src), path, c)


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
    fmt = src.format if src.format != "auto" else detect_format(src.path, src.encoding)
    ctx: dict[str, Any] = {
        "source": source_name(src),
        "split": src.split or role,
        "fields": src.fields,
        "answer_index_base": src.answer_index_base,
        "min_question_chars": min_question_chars,
        "format": fmt,
        "root": src.path,
    }
    if fmt in _LAYOUTS:
        yield from _LAYOUTS[fmt](src, ctx)
    else:
        yield from _read_generic(src, ctx, fmt)
