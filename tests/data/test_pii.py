"""PII scrubbing: the labelled benchmark meets its targets; clinical numbers are never touched."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from medtune.data.pii import scrub_record, scrub_text
from medtune.data.validate import build_record

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "pii.py"


def _bench():
    spec = importlib.util.spec_from_file_location("pii_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labelled_cases_meet_recall_and_precision_targets():
    bench = _bench()
    result = bench.score_cases()
    assert result["positive_cases"] >= 90 and result["negative_cases"] >= 60 and result["cases"] >= 150
    for kind, m in result["per_type"].items():
        assert m["tp"] >= 10, f"too few {kind} cases to measure"
        assert m["recall"] >= bench.TARGET_RECALL, (kind, m, result["errors"])
        assert m["precision"] >= bench.TARGET_PRECISION, (kind, m, result["errors"])


@pytest.mark.parametrize(
    "text",
    [
        "혈압 120/80 mmHg, 맥박 80회/분",
        "아목시실린 500 mg 1일 3회",
        "2019년 1교시 45번",
        "칼륨 3.5-5.0 mEq/L",
        "Sonic frequency range is 1500-6000 Hz",
        "karyotype 47,XX,+21",
        "between 1975-1990",
        "Dose 250-500-1000 mg",
        "admitted on 03/14/2021",
        "혈소판 150,000-450,000/mm^3",
    ],
)
def test_clinical_numbers_survive(text):
    assert scrub_text(text) == (text, {})


def test_typed_placeholders_and_counts():
    text = "홍길동(주민번호 900101-1234567, 생년월일 1990.01.01, 등록번호 12345678) 010-1234-5678 a@b.com"
    clean, counts = scrub_text(text)
    assert clean == "홍길동(주민번호 [RRN], 생년월일 [DOB], 등록번호 [MRN]) [PHONE] [EMAIL]"
    assert counts == {"RRN": 1, "DOB": 1, "MRN": 1, "PHONE": 1, "EMAIL": 1}


def test_scrub_record_covers_every_training_field():
    rec = build_record(
        source="s",
        split="train",
        row_id="1",
        provenance={"file": "f", "line": 1},
        question="Call 555-123-4567?",
        options=["MRN: 1234567", "b"],
        answer="A",
        explanation="mail x@y.org",
    )
    counts = scrub_record(rec)
    assert rec["question"] == "Call [PHONE]?" and rec["options"][0] == "MRN: [MRN]"
    assert rec["explanation"] == "mail [EMAIL]" and counts == {"PHONE": 1, "MRN": 1, "EMAIL": 1}
