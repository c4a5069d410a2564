"""Low-level file readers: whole-file checks first, then rows one at a time.

A file that cannot be data as a whole (missing, empty, binary, in another text encoding than the
source's `encoding`, not JSON at all, a CSV header without rows) raises one `DataError` naming the
file and what to do, before any row is read: one clear message instead of a quarantine row per
line followed by a generic "no training records survived". A bad row inside an otherwise good file
is yielded as a reason string and quarantined by itself.

Text is decoded with `errors="surrogateescape"`, so one row with foreign bytes is a reason, not a
UnicodeDecodeError that aborts the whole file. Every reader streams, except a JSON document (one
array or object), which the json module can only parse whole.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from medtune.errors import DataError

Row = dict[str, Any]
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # PubMedQA-sized abstracts in a user's CSV

HEAD_BYTES = 1 << 20
"""The whole-file checks read this much (all of most files): enough lines to tell a file in another
encoding from a few bad rows, and cheap next to reading the rows."""
SNIFF_LINES = 50
"""Lines that decide whether a file is JSON lines at all."""
BINARY_WINDOW = 8000
"""A NUL byte this early means binary content (git's rule); text never holds one (UTF-16 aside)."""

# surrogateescape maps each undecodable byte to U+DC80..U+DCFF
_BAD_BYTES = re.compile("[\udc80-\udcff]")
_HANGUL = re.compile("[\uac00-\ud7a3]")
_BINARY_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive (an .xlsx workbook or zipped data): export the sheet as CSV, or unzip it"),
    (b"PAR1", "a Parquet file: set `format: parquet`"),
    (b"\x1f\x8b", "gzip-compressed data: decompress it first"),
    (b"\xd0\xcf\x11\xe0", "an old Office file (.xls): export the sheet as CSV"),
    (b"SQLite format 3\x00", "an SQLite database: export the table as CSV or JSONL"),
    (b"%PDF", "a PDF: medtune reads CSV, TSV, JSON, JSON lines and Parquet"),
)


def has_bad_bytes(text: str) -> bool:
    return _BAD_BYTES.search(text) is not None


def bad_bytes_reason(encoding: str, where: str) -> str:
    """The quarantine reason for a row with bytes `encoding` cannot decode (`reason_class` keys on it)."""
    name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
    return f"non-{name} bytes in {where} (if the whole file is in another encoding, set `encoding:`)"


def _codec(encoding: str) -> str:
    """utf-8 reads as utf-8-sig: a BOM (Excel's UTF-8 CSV export) is accepted, not glued to a name."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _wide(encoding: str) -> bool:
    return codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))


def open_text(path: Path, encoding: str, newline: str | None = None) -> IO[str]:
    return path.open(encoding=_codec(encoding), errors="surrogateescape", newline=newline)


# ---------------------------------------------------------------- whole-file checks


def check_text_file(path: Path, encoding: str = "utf-8") -> list[str]:
    """The non-blank lines of the file's head, once the file passed the whole-file checks.

    Raises `DataError` for a missing, empty or binary file (UTF-16 under another `encoding`
    included), and for one whose lines mostly do not decode with `encoding` but do with UTF-8 or
    cp949 (the message names it). Other bad lines are left to the row readers, which quarantine
    them one by one.
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
        complete = not f.read(1)
    problem = _binary_problem(head, encoding)
    if problem:
        raise DataError(f"{path}: {problem}")
    decoder = codecs.getincrementaldecoder(_codec(encoding))(errors="surrogateescape")
    try:
        text = decoder.decode(head, final=complete).lstrip("\ufeff")
    except UnicodeError as exc:  # not a byte the error handler can take: plain `utf-16` needs its BOM
        raise DataError(
            f"{path}: not {encoding} text ({exc}); set `encoding:` to the file's encoding"
        ) from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if not complete:
        cut = lines.pop()  # cut by the head window
        if not any(line.strip() for line in lines):
            lines.append(cut)  # one line longer than the window (minified JSON): keep its start
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(f"{path}: file is empty; remove it from the config or give it data")
    bad = sum(has_bad_bytes(line) for line in lines)
    # Most lines, and another encoding reads them all: the file is in that encoding. Otherwise
    # (a few pasted rows, stray bytes no encoding explains) the rows are quarantined one by one.
    sample = head if complete else head[: head.rfind(b"\n") + 1]
    if bad * 2 > len(lines) and (guess := _likely_encoding(sample, encoding)):
        raise DataError(
            f"{path}: {bad} of the first {len(lines)} lines are not valid {encoding} text; it looks like "
            f"{guess}: set `encoding: {guess}` on this source, or re-save the file as UTF-8"
        )
    return lines


def _binary_problem(head: bytes, encoding: str) -> str | None:
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            return f"binary content, not text: it looks like {what}"
    window = head[:BINARY_WINDOW]
    if _wide(encoding) or b"\x00" not in window:
        return None
    wide = _utf16_flavour(window)
    if wide:
        return (
            f"is UTF-16 text, not {encoding}: set `encoding: {wide}` on this source, or re-save it as UTF-8"
        )
    return (
        f"binary content, not text (a NUL byte at offset {window.index(0)}); "
        "check that this is the data file and that `format:` names its format"
    )


def _utf16_flavour(window: bytes) -> str | None:
    """`utf-16` with a BOM; without one, the byte order whose high bytes are the NULs of ASCII text."""
    if window.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if window[1::2].count(0) * 4 > len(window):
        return "utf-16-le"
    if window[::2].count(0) * 4 > len(window):
        return "utf-16-be"
    return None


def _likely_encoding(sample: bytes, declared: str) -> str | None:
    """UTF-8 or cp949, when it decodes the whole sample and `declared` does not: for the error message.

    cp949 (a superset of euc-kr, what Korean Windows and Excel write) must also yield mostly Hangul,
    since many Latin-1 byte pairs are valid cp949 too. Single-byte encodings decode any bytes, so they
    prove nothing and are not guessed (UTF-16 is recognised by its NUL bytes, in `_binary_problem`).
    """
    for candidate in ("utf-8", "cp949"):
        if codecs.lookup(candidate).name == codecs.lookup(declared).name:
            continue
        try:
            text = sample.decode(candidate)
        except UnicodeDecodeError:
            continue
        if candidate == "utf-8" or len(_HANGUL.findall(text)) * 2 > sum(ord(c) > 127 for c in text):
            return candidate
    return None


# ---------------------------------------------------------------- JSON


_FAIL = object()


def _parse(text: str) -> Any:
    """A JSON value, or `_FAIL`; json raises ValueError beyond 4300-digit ints, RecursionError when deep."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _FAIL


def _parse_error(text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"{exc.msg} at column {exc.colno}"
    except RecursionError:
        return "nested too deeply"
    except ValueError as exc:
        return str(exc).split(";")[0]
    return ""


def _is_document(obj: Any) -> bool:
    """A whole data set in one value: a list, `{"data": [...]}`, or an object of objects keyed by id."""
    if isinstance(obj, list):
        return True
    if not isinstance(obj, dict) or not obj:
        return False
    return isinstance(obj.get("data"), list) or all(isinstance(v, dict) for v in obj.values())


def iter_json(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str | None, Row | str]]:
    """(number, key or None, object or reason) from JSON lines or one JSON document.

    The content decides, not the extension: a `.jsonl` holding one pretty-printed array and a `.json`
    holding one object per line are both common. JSON lines stream and are numbered by line; a
    document (a list of objects, an object keyed by id, or `{"data": [...]}`) is numbered by item.
    """
    lines = check_text_file(path, encoding)
    first = lines[0].strip()
    head_obj = _parse(first)
    if first[:1] in ("[", "{") and (_is_document(head_obj) or head_obj is _FAIL):
        doc = _load_document(path, encoding, lines)
        if doc is not _FAIL:
            yield from _document_items(path, doc)
            return
    _check_json_lines(path, lines)
    yield from _iter_json_lines(path, encoding)


def _check_json_lines(path: Path, lines: list[str]) -> None:
    """Not one JSON object among the first lines: not JSON lines at all (a CSV, a text file)."""
    sample = lines[:SNIFF_LINES]
    if not any(isinstance(_parse(line), dict) for line in sample):
        parsed = _parse(sample[0])
        why = _parse_error(sample[0]) if parsed is _FAIL else f"a {type(parsed).__name__}"
        raise DataError(
            f"{path}: not JSON lines: none of the first {len(sample)} lines is a JSON object "
            f"(line 1: {why}); check the file and its `format:`"
        )


def _iter_json_lines(path: Path, encoding: str) -> Iterator[tuple[int, None, Row | str]]:
    with open_text(path, encoding) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if has_bad_bytes(line):
                yield lineno, None, bad_bytes_reason(encoding, "line")
                continue
            obj = _parse(line)
            if obj is _FAIL:
                yield lineno, None, f"unparseable JSON line: {_parse_error(line)}"
            elif isinstance(obj, dict):
                yield lineno, None, obj
            else:
                yield lineno, None, f"JSON line is a {type(obj).__name__}, not an object"


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _DuplicateKey(dup)
    return obj


def load_json(path: Path, encoding: str = "utf-8") -> Any:
    """A whole JSON document; a broken one is a `DataError` with line and column."""
    check_text_file(path, encoding)
    return _load_document(path, encoding, [])


def _load_document(path: Path, encoding: str, head_lines: list[str]) -> Any:
    """The parsed document, or `_FAIL` when it does not parse but `head_lines` look like JSON lines
    (a JSONL file whose first line is broken)."""
    raw = path.read_bytes()
    try:
        text = raw.decode(_codec(encoding))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: bytes that are not {encoding} text; set `encoding:` or re-save it"
        ) from None
    try:
        # A repeated key (two items under one PMID) would silently keep only the last.
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise DataError(
            f"{path}: key {exc.args[0]!r} appears twice in one JSON object; one would be lost"
        ) from None
    except json.JSONDecodeError as exc:
        if any(isinstance(_parse(line), dict) for line in head_lines[1:SNIFF_LINES]):
            return _FAIL
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(
            f"{path}: not readable JSON: {str(exc).split(';')[0] or 'nested too deeply'}"
        ) from None


def _document_items(path: Path, doc: Any) -> Iterator[tuple[int, str | None, Row | str]]:
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, list):
        items: Any = ((None, v) for v in doc)
    elif _is_document(doc):
        items = iter(doc.items())
    else:
        raise DataError(f"{path}: expected a JSON list of objects or an object keyed by id")
    if not doc:
        raise DataError(f"{path}: holds no items (an empty JSON {type(doc).__name__})")
    for i, (key, obj) in enumerate(items, start=1):
        yield i, key, obj if isinstance(obj, dict) else f"item is a {type(obj).__name__}, not an object"


# ---------------------------------------------------------------- CSV / TSV


def iter_csv(
    path: Path,
    delimiter: str = ",",
    header: bool | None = None,
    known: set[str] | None = None,
    encoding: str = "utf-8",
) -> Iterator[tuple[int, Row | str]]:
    """(first physical line of the row, {column: value}) per row; positional columns are "0", "1"...

    Quoted fields may span lines, so the line is taken from the reader, not counted by hand.
    """
    check_text_file(path, encoding)
    with open_text(path, encoding, newline="") as f:
        rows = _csv_rows(csv.reader(f, delimiter=delimiter), path)
        line, first = next(rows)
        if header is None:
            # Two known column names, not one: a headerless MMLU row ends in the answer `A`.
            header = sum(c.strip() in (known or ()) for c in first) >= min(2, len(first))
        if header:
            columns = [c.strip() for c in first]
            _check_header(path, line, columns)
        else:
            columns = [str(i) for i in range(len(first))]
            yield line, _row_or_reason(columns, first, encoding)
        n = 0
        for line, values in rows:
            n += 1
            yield line, _row_or_reason(columns, values, encoding)
        if header and not n:
            raise DataError(f"{path}: has a header but no rows")


def _csv_rows(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """Non-blank rows with the line each starts on; a CSV syntax error names its line."""
    start = 1
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot parse CSV: {exc}") from None
        if values:  # a blank line between rows is not a record
            yield start, values
        start = reader.line_num + 1


def _check_header(path: Path, line: int, columns: list[str]) -> None:
    twice = [c for c, n in Counter(columns).items() if c and n > 1]
    if twice:
        raise DataError(f"{path}:{line}: column {twice[0]!r} appears twice in the header; rename one")


def _row_or_reason(columns: list[str], values: list[str], encoding: str) -> Row | str:
    if any(has_bad_bytes(v) for v in values):
        return bad_bytes_reason(encoding, "row")
    if len(values) < len(columns):
        missing = columns[len(values)]
        return f"row has {len(values)} fields, header has {len(columns)} (missing column {missing!r})"
    if len(values) > len(columns):
        return f"row has {len(values)} fields, header has {len(columns)} (unquoted delimiter?)"
    return dict(zip(columns, values, strict=True))


# ---------------------------------------------------------------- Parquet


def iter_parquet(path: Path) -> Iterator[tuple[int, Row | str]]:
    """(row number, row) in batches, so a large file never sits in memory whole."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    if pf.metadata.num_rows == 0:
        raise DataError(f"{path}: holds no rows")
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
    except Exception as exc:  # a corrupt page: pyarrow's OSError, ArrowInvalid, ...
        raise DataError(f"{path}: row {n + 1}: cannot read the Parquet data: {exc}") from None
