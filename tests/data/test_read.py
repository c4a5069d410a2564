"""Readers: every real shared dataset ingests with the documented counts; generic formats and quirks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from medtune.config import SourceConfig
from medtune.data.read import detect_format, iter_source
from medtune.data.validate import Rejected
from medtune.errors import DataError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data not found at {SHARED}")


def read(path: Path, **kw) -> tuple[list[dict], list[Rejected]]:
    items = list(iter_source(SourceConfig(path=path, **kw), "train"))
    return [i for i in items if not isinstance(i, Rejected)], [i for i in items if isinstance(i, Rejected)]


# (folder, config, expected records by split) from each SOURCE.md
REAL = [
    ("kormedmcqa", {}, {"train": 3401, "valid": 1059, "fewshot": 20}),
    ("kormedmcqa", {"split": "valid"}, {"valid": 1059}),
    ("medqa", {}, {"dev": 1272}),
    ("medmcqa", {}, {"validation": 4183}),
    ("pubmedqa", {}, {"train": 500, "test": 500}),
    ("pubmedqa", {"split": "test"}, {"test": 500}),
    ("mmlu_medical", {}, {"dev": 25, "val": 107, "test": 945}),
    ("genmedgpt_5k_ko_en", {}, {"train": 5451 + 5452}),
]


@needs_shared
@pytest.mark.parametrize("folder,kw,expected", REAL, ids=[f"{r[0]}-{r[1].get('split', 'all')}" for r in REAL])
def test_real_dataset_ingests_completely(folder, kw, expected):
    records, rejected = read(SHARED / folder, **kw)
    assert rejected == [], rejected[:3]
    assert dict(Counter(r["split"] for r in records)) == expected
    assert len({r["id"] for r in records}) == len(records), "ids must be unique"
    for r in records:
        assert r["provenance"]["file"].startswith(str(SHARED)) and r["provenance"]["line"] >= 1
        if r["kind"] == "mcqa":
            assert r["answer"] in "ABCDE"[: len(r["options"])]


@needs_shared
def test_layout_quirks_are_normalised():
    medmcqa, _ = read(SHARED / "medmcqa")
    assert (
        medmcqa[0]["options"][0] == "Impulse through myelinated fibers is slower than non-myelinated fibers"
    )
    raw = [json.loads(line) for line in (SHARED / "medmcqa" / "validation.jsonl").read_text().splitlines()]
    assert all(r["options"] == [c[3:] for c in x["choices"]] for r, x in zip(medmcqa, raw, strict=True))
    assert medmcqa[0]["answer"] == "A"  # 0-based int 0
    medqa, _ = read(SHARED / "medqa")
    assert medqa[0]["answer"] == "C" and medqa[0]["options"][2] == "Ceftriaxone"
    pub, _ = read(SHARED / "pubmedqa", split="test")
    assert all(r["options"] == ["yes", "no", "maybe"] and r["context"] for r in pub)
    assert Counter(r["answer"] for r in pub) == {"A": 276, "B": 169, "C": 55}
    mmlu, _ = read(SHARED / "mmlu_medical", split="test")
    assert Counter(r["subject"] for r in mmlu)["professional_medicine"] == 272
    few, _ = read(SHARED / "kormedmcqa", split="fewshot")
    assert all(r["explanation"] for r in few) and all(r["answer"] in "ABCDE" for r in few)
    gen, _ = read(SHARED / "genmedgpt_5k_ko_en")
    assert {r["kind"] for r in gen} == {"instruction"} and all(r["response"] for r in gen)
    doctor_train, _ = read(SHARED / "kormedmcqa" / "doctor" / "train.csv")  # the file without index column
    assert doctor_train[0]["question"] == "항문압 측정 검사에서 항문 압력이 증가하는 경우는?"
    assert (
        doctor_train[0]["options"][0] == "직장질루(rectovaginal fistula)" and doctor_train[0]["answer"] == "B"
    )


@needs_shared
def test_kormedmcqa_medical_law_tags_match_source_md():
    for split, expected in (("train", 100), ("valid", 60)):
        records, _ = read(SHARED / "kormedmcqa", split=split)
        law = [r for r in records if "medical_law" in r["tags"]]
        assert len(law) == expected
        # inside the nurse/pharm/dentist blocks every question names a statute
        assert all("법" in r["question"] + "".join(r["options"]) for r in law)


@needs_shared
def test_format_auto_detection():
    expect = {
        "kormedmcqa": "kormedmcqa",
        "medqa": "medqa",
        "medmcqa": "medmcqa",
        "pubmedqa": "pubmedqa",
        "mmlu_medical": "mmlu",
        "genmedgpt_5k_ko_en": "genmedgpt",
    }
    for folder, fmt in expect.items():
        assert detect_format(SHARED / folder) == fmt


def test_csv_crlf_quoted_multiline_and_line_numbers():
    records, rejected = read(FIXTURES / "crlf_header.csv", answer_index_base=1)
    assert not rejected
    assert [r["id"] for r in records] == ["crlf_header:train:q1", "crlf_header:train:q2"]
    assert records[0]["question"] == "Which is a\r\nmulti-line stem?"
    assert [r["provenance"]["line"] for r in records] == [2, 4]  # q2 starts after the 2-line field
    assert records[1]["answer"] == "A"  # 1-based integer answer


def test_headerless_csv_positional_and_tsv_list_column():
    records, _ = read(FIXTURES / "noheader.csv")
    assert [r["answer"] for r in records] == ["A", "B"] and records[1]["options"][3] == "four"
    assert [r["provenance"]["line"] for r in records] == [1, 2]
    tsv, rej = read(FIXTURES / "user.tsv")
    assert not rej and tsv[0]["options"] == ["x", "y", "z"] and tsv[0]["answer"] == "C"


def test_generic_fields_mapping():
    fields = {"id": "uid", "question": "stem", "options": "choices", "answer": "gold", "explanation": "why"}
    records, rejected = read(FIXTURES / "user.jsonl", fields=fields, name="mine")
    assert not rejected
    assert records[0]["id"] == "mine:train:u1" and records[0]["answer"] == "B"
    assert (
        records[0]["options"] == ["Liver", "Pancreas", "Kidney"]
        and records[0]["explanation"] == "Beta cells."
    )
    _, rejected = read(FIXTURES / "user.jsonl", fields={**fields, "question": "nope"})
    assert all("missing column 'nope'" in r.reason for r in rejected) and len(rejected) == 2


def test_json_and_parquet(tmp_path):
    items = [{"question": f"Q{i}?", "options": ["a", "b"], "answer": i % 2} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps(items))
    (tmp_path / "keyed.json").write_text(json.dumps({f"k{i}": it for i, it in enumerate(items)}))
    assert [r["answer"] for r in read(tmp_path / "list.json")[0]] == ["A", "B", "A"]
    assert [r["id"] for r in read(tmp_path / "keyed.json")[0]][0] == "keyed:train:k0"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(items), tmp_path / "t.parquet")
    recs, rej = read(tmp_path / "t.parquet")
    assert not rej and [r["provenance"]["line"] for r in recs] == [1, 2, 3]


def test_whole_file_errors_are_data_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.jsonl: file is empty"):
        read(tmp_path / "empty.jsonl")
    (tmp_path / "bad.json").write_text('[{"question": "x",\n  oops]')
    with pytest.raises(DataError, match=r"bad.json:2:\d+: not valid JSON"):
        read(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no such file"):
        read(tmp_path / "missing.csv")
    (tmp_path / "x.weird").write_text("data")
    with pytest.raises(DataError, match="cannot guess the format"):
        read(tmp_path / "x.weird")
