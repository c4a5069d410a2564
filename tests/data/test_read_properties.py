"""Hostile files: whatever the bytes, a reader yields records and rejects, or raises one
`MedtuneError` that names the file; never another exception type, never a non-string id."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from medtune.config import SourceConfig
from medtune.data.read import iter_source
from medtune.data.validate import Rejected
from medtune.errors import MedtuneError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = [
    "jsonl",
    "json",
    "csv",
    "tsv",
    "parquet",
    "medqa",
    "medmcqa",
    "genmedgpt",
    "pubmedqa",
    "kormedmcqa",
    "mmlu",
]
SUFFIX = {
    "json": ".json",
    "csv": ".csv",
    "tsv": ".tsv",
    "parquet": ".parquet",
    "kormedmcqa": ".csv",
    "mmlu": ".csv",
}
ENCODINGS = ["utf-8", "utf-8-sig", "cp949", "utf-16", "latin-1"]
COLUMNS = [
    "0",
    "1",
    "id",
    "question",
    "options",
    "choices",
    "answer",
    "answer_idx",
    "A",
    "B",
    "C",
    "prompt",
    "response",
]
COLUMNS += [
    "instruction",
    "input",
    "output",
    "subject",
    "year",
    "period",
    "q_number",
    "QUESTION",
    "final_decision",
]
HUGE_INT = "1" + "0" * 5000  # past Python's int/str digit limit: json raises ValueError, not JSONDecodeError
ODD_TEXT = [
    "",
    " ",
    "A",
    "²",
    "١",
    "-3",
    "99999999999999999999",
    HUGE_INT,
    "NaN",
    "[1, 2]",
    '{"A": 1}',
    "a\x00b",
]


def consume(path: Path, fmt: str, encoding: str = "utf-8", **kw) -> None:
    """Read the whole source; the property is what may come out, and how it may fail."""
    try:
        items = list(iter_source(SourceConfig(path=path, format=fmt, encoding=encoding, **kw), "train"))
    except MedtuneError as exc:
        assert path.name in str(exc), exc
        return
    for item in items:
        if isinstance(item, Rejected):
            assert item.file.endswith(path.name) and item.line >= 1 and item.reason
        else:
            assert isinstance(item["id"], str) and item["id"]
            assert item["kind"] in ("mcqa", "instruction")
            assert all(isinstance(o, str) for o in item["options"]) and isinstance(item["question"], str)
            for key in ("subject", "answer", "explanation", "context", "prompt", "response"):
                assert item[key] is None or isinstance(item[key], str), (key, item[key])
    ids = [i["id"] for i in items if not isinstance(i, Rejected)]
    assert len(ids) == len(set(ids)) or fmt in ("kormedmcqa", "pubmedqa"), "generated ids must be unique"


def write(name: str, data: bytes) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory()
    path = Path(tmp.name) / name
    path.write_bytes(data)
    return tmp, path


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(ODD_TEXT)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
    max_leaves=12,
)
rows = st.lists(st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=6), max_size=8)


@SETTINGS
@given(
    fmt=st.sampled_from(["auto", *FORMATS]),
    suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"]),
    data=st.binary(max_size=3000),
)
def test_random_bytes(fmt, suffix, data):
    tmp, path = write(f"data{suffix}", data)
    with tmp:
        consume(path, fmt)


def _json_text(items: list[dict], lines: bool) -> str:
    def dump(obj: object) -> str:  # json.dumps itself refuses HUGE_INT: splice it in as text
        return json.dumps(obj, ensure_ascii=False).replace(json.dumps(HUGE_INT), HUGE_INT)

    return "".join(dump(r) + "\n" for r in items) if lines else dump(items)


@SETTINGS
@given(
    fmt=st.sampled_from(["jsonl", "json", "medqa", "medmcqa", "genmedgpt", "pubmedqa"]),
    items=rows,
    lines=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=3),
    written=st.sampled_from(ENCODINGS),
    declared=st.sampled_from(ENCODINGS),
)
def test_json_rows_with_odd_values_truncations_and_encodings(fmt, items, lines, cuts, written, declared):
    raw = _json_text(items, lines).encode(written, errors="replace")
    for cut in cuts:  # truncate a line (or the document) somewhere
        raw = raw[: cut % (len(raw) + 1)] + raw[cut % (len(raw) + 1) :].partition(b"\n")[2]
    tmp, path = write(f"data{SUFFIX.get(fmt, '.jsonl')}", raw)
    with tmp:
        consume(path, fmt, declared)


cells = st.text(max_size=15) | st.sampled_from(ODD_TEXT + ['"', "a,b", "x\ny", "\r\n", "\t"])


@SETTINGS
@given(
    fmt=st.sampled_from(["csv", "tsv", "kormedmcqa", "mmlu", "genmedgpt"]),
    header=st.lists(st.sampled_from(["", *COLUMNS]), max_size=8),
    table=st.lists(st.lists(cells, max_size=9), max_size=8),
    written=st.sampled_from(ENCODINGS),
    declared=st.sampled_from(ENCODINGS),
    has_header=st.sampled_from([None, True, False]),
)
def test_csv_rows_with_odd_cells_and_encodings(fmt, header, table, written, declared, has_header):
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\r\n")
    writer.writerows([header, *table] if header else table)
    tmp, path = write(f"data{SUFFIX.get(fmt, '.csv')}", buf.getvalue().encode(written, errors="replace"))
    with tmp:
        consume(path, fmt, declared, **({"header": has_header} if fmt in ("csv", "tsv") else {}))


parquet_values = st.one_of(
    st.lists(st.text(max_size=10), max_size=3),
    st.dictionaries(st.sampled_from(["A", "B"]), st.text(max_size=5), min_size=1),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=10),
    st.none(),
)


@SETTINGS
@given(table=st.lists(st.dictionaries(st.sampled_from(COLUMNS), parquet_values, max_size=6), max_size=8))
def test_parquet_rows_with_odd_values(table):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        arrow = pa.Table.from_pylist(table)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        assume(False)  # pyarrow cannot write a column of mixed types: not a file anyone has
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        pq.write_table(arrow, path)
        consume(path, "parquet")


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_survives_a_file_of_nul_bytes_and_a_huge_line(tmp_path, fmt):
    for name, data in (("nul", bytes(100)), ("huge", b'{"question": ' + HUGE_INT.encode() + b"}\n" * 2)):
        path = tmp_path / f"{name}{SUFFIX.get(fmt, '.jsonl')}"
        path.write_bytes(data)
        consume(path, fmt)


@pytest.mark.parametrize("answer", ODD_TEXT)
@pytest.mark.parametrize(
    "options", ["x|y", "5", "null", '"xy"', '{"A": "x", "B": "y"}', "[[1], {}]", f"[{HUGE_INT}]"]
)
def test_odd_answers_and_options_of_an_otherwise_valid_row(tmp_path, answer, options):
    """The values the random tests rarely combine with a valid row: each is a record or a reject."""
    rows = [["question", "options", "answer", "subject"], ["Which one is it?", options, answer, answer]]
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    (tmp_path / "odd.csv").write_text(buf.getvalue())
    consume(tmp_path / "odd.csv", "csv")
    (tmp_path / "odd.jsonl").write_text(json.dumps(dict(zip(*rows, strict=True))) + "\n")
    consume(tmp_path / "odd.jsonl", "jsonl")


@pytest.mark.parametrize("value", [5, 2.5, ["a"], {"x": 1}, True, None, float("nan")])
def test_non_string_values_in_string_fields_become_text_or_a_reject(tmp_path, value):
    row = {
        "question": "Which one?",
        "options": ["x", "y"],
        "answer": "A",
        "explanation": value,
        "subject": value,
    }
    instruction = {"prompt": value, "response": value, "context": value, "id": value}
    (tmp_path / "odd.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(instruction) + "\n")
    consume(tmp_path / "odd.jsonl", "jsonl")
