"""Validation loses nothing: malformed rows land in the quarantine with file, line and reason,
and per source records_in == kept + quarantined + deduplicated + contaminated."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medtune.config import DataConfig, validate_config
from medtune.data.prepare import run_prepare
from medtune.data.validate import RowError, normalise_answer
from medtune.errors import DataError

FAULTS = ["ok", "bad_answer", "empty_question", "dup_id", "non_utf8", "broken"]
# what each fault must say in the quarantine (broken = truncated JSON line / CSV row missing a column)
REASON = {
    "bad_answer": "answer 'F' is not among the 4 options",
    "empty_question": "empty question",
    "dup_id": "duplicate id",
    "non_utf8": "non-UTF-8 bytes",
    "broken": {"jsonl": "unparseable JSON line", "csv": "missing column 'answer'"},
}
STEM = st.text(alphabet="abcdefghij 가나다라마바사 ,.?\"'()", min_size=3, max_size=30).filter(
    lambda s: s.strip()
)


def _row(i: int, fault: str, stem: str) -> dict:
    return {
        "id": "r0" if fault == "dup_id" else f"r{i}",
        "question": "" if fault == "empty_question" else f"{stem} #{i}~",
        "A": "a",
        "B": "b",
        "C": "c",
        "D": "d",
        "answer": "F" if fault == "bad_answer" else "ABCD"[i % 4],
    }


def _jsonl(rows: list[tuple[dict, str]]) -> bytes:
    out = b""
    for row, fault in rows:
        line = json.dumps({**row, "options": [row.pop(k) for k in "ABCD"]}, ensure_ascii=False).encode()
        if fault == "broken":
            line = line[: len(line) // 2]
        if fault == "non_utf8":
            line = line.replace(b"#", b"\xff\xfe#", 1)  # the only # in the line
        out += line + b"\n"
    return out


def _csv(rows: list[tuple[dict, str]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
    for row, fault in rows:
        values = list(row.values())
        w.writerow(values[:-1] if fault == "broken" else values)
    data = buf.getvalue().encode()
    for i, (_, fault) in enumerate(rows):
        if fault == "non_utf8":
            data = data.replace(f"#{i}~".encode(), f"\xff#{i}~".encode("latin-1"), 1)
    return data


def _prepare(path: Path, out: Path, **data) -> dict:
    cfg = validate_config(
        {
            "model": {"path": str(out / "no-model")},
            "data": {
                "train": [{"path": str(path), "name": "gen"}],
                "dedupe": {"exact": False, "near": False},
                **data,
            },
        }
    )
    return run_prepare(cfg, out)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(["jsonl", "csv"]),
    faults=st.lists(st.sampled_from(FAULTS), min_size=1, max_size=12),
    stem=STEM,
)
def test_malformed_rows_are_quarantined_and_counted(tmp_path_factory, fmt, faults, stem):
    tmp = tmp_path_factory.mktemp("gen")
    faults = ["ok", *faults]  # the first row is valid (and owns id r0 that dup_id rows reuse)
    rows = [(_row(i, f, stem), f) for i, f in enumerate(faults)]
    path = tmp / f"data.{fmt}"
    path.write_bytes(_jsonl(rows) if fmt == "jsonl" else _csv(rows))
    manifest = _prepare(path, tmp / "out")

    counts = manifest["sources"]["train/gen"]
    assert counts["records_in"] == len(faults)
    assert counts["kept"] == faults.count("ok")
    assert (
        counts["records_in"]
        == counts["kept"] + counts["quarantined"] + counts["deduplicated"] + counts["contaminated_removed"]
    )
    quarantine = [json.loads(x) for x in (tmp / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert len(quarantine) == len(faults) - faults.count("ok")
    by_line = {q["line"]: q for q in quarantine}
    first_line = 1 if fmt == "jsonl" else 2
    for i, fault in enumerate(faults):
        if fault == "ok":
            continue
        entry = by_line[first_line + i]
        assert entry["file"] == str(path)
        expected = REASON[fault] if isinstance(REASON[fault], str) else REASON[fault][fmt]
        assert expected in entry["reason"], (fault, entry)
    kept = [json.loads(x) for x in (tmp / "out" / "train.jsonl").read_text().splitlines()]
    assert len(kept) == faults.count("ok")


def test_empty_file_is_a_clear_data_error(tmp_path):
    (tmp_path / "empty.csv").write_bytes(b"\xef\xbb\xbf\r\n")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        _prepare(tmp_path / "empty.csv", tmp_path / "out")


def test_all_rows_bad_is_a_data_error_not_an_empty_dataset(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "options": ["a", "b"], "answer": "Z"}\n')
    with pytest.raises(DataError, match="no training record survived") as error:
        _prepare(tmp_path / "bad.jsonl", tmp_path / "out")
    # The message itself names the file, line and reason: a failed stage leaves no quarantine to read.
    assert f"{tmp_path / 'bad.jsonl'}:1: answer 'Z' is not among the 2 options" in str(error.value)


def test_a_field_over_max_field_chars_is_quarantined_naming_field_and_length(tmp_path):
    rows = [
        {"id": "fits", "question": "q" * 5000, "options": ["a", "b"], "answer": "A"},
        {"id": "long_q", "question": "q" * 5001, "options": ["a", "b"], "answer": "A"},
        {"id": "long_opt", "question": "q", "options": ["a", "b" * 9000], "answer": "A"},
        {"id": "long_resp", "prompt": "p", "response": "r" * 6000},
    ]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = _prepare(path, tmp_path / "out", max_field_chars=5000)
    reasons = {
        q["id"]: q["reason"]
        for q in map(json.loads, (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines())
    }
    assert reasons == {
        "gen:train:long_q": "field too long: question has 5,001 chars (data.max_field_chars: 5,000)",
        "gen:train:long_opt": "field too long: option B has 9,000 chars (data.max_field_chars: 5,000)",
        "gen:train:long_resp": "field too long: response has 6,000 chars (data.max_field_chars: 5,000)",
    }
    counts = manifest["sources"]["train/gen"]
    assert (counts["kept"], counts["quarantine_reasons"]) == (1, {"field too long": 3})
    assert DataConfig().max_field_chars == 100_000


@pytest.mark.parametrize(
    "raw,base,expected",
    [("B", 0, "B"), ("(c)", 0, "C"), (2, 0, "C"), ("3", 1, "C"), (1.0, 0, "B"), ("beta", 0, "B")],
)
def test_normalise_answer_accepts_letters_indices_and_text(raw, base, expected):
    assert normalise_answer(raw, ["alpha", "beta", "gamma", "delta"], base) == expected


@pytest.mark.parametrize(
    "raw,message",
    [
        ("F", "not among the 4 options A-D"),
        (4, "out of range"),
        ("", "missing answer"),
        ("omega", "neither a letter"),
        (True, "not a letter"),
    ],
)
def test_normalise_answer_rejects_with_reason(raw, message):
    with pytest.raises(RowError, match=message):
        normalise_answer(raw, ["alpha", "beta", "gamma", "delta"])
