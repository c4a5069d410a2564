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


# ---------------------------------------------------------------- generated ids (sharded sources)

QUESTION = "Which organ number {k} of shard {s} makes the hormone?"


def shard_lines(layout: str, shard: int, n: int = 5) -> str:
    """`n` rows without an `id` column, each question distinct (no dedupe in prepare)."""
    if layout == "csv":
        rows = [f'"{QUESTION.format(k=k, s=shard)}",liver,pancreas,B' for k in range(n)]
        return "question,A,B,answer\n" + "\n".join(rows) + "\n"
    if layout == "medqa":
        row = {"options": {"A": "liver", "B": "pancreas"}, "answer_idx": "B"}
    else:
        row = {"options": ["liver", "pancreas"], "answer": 1}
    return "".join(json.dumps({"question": QUESTION.format(k=k, s=shard), **row}) + "\n" for k in range(n))


@pytest.mark.parametrize("layout", ["jsonl", "csv", "medqa"])
def test_sharded_folder_gives_every_row_a_distinct_id(tmp_path, layout):
    suffix = ".csv" if layout == "csv" else ".jsonl"
    for shard, name in enumerate(["shard-00001", "shard-00002", "sub/shard-00001"]):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"{name}{suffix}").write_text(shard_lines(layout, shard))
    records, rejected = read(tmp_path / "src", format=layout)
    assert not rejected and len(records) == 15
    assert len({r["id"] for r in records}) == 15
    ids = {r["id"].split(":", 2)[2] for r in records}
    assert {f"shard-00002{suffix}:4", f"sub/shard-00001{suffix}:4"} <= ids
    again, _ = read(tmp_path / "src", format=layout)
    assert [r["id"] for r in again] == [r["id"] for r in records]  # deterministic


def test_other_layouts_give_generated_ids_per_file(tmp_path):
    """MedMCQA rows without `id`, GenMedGPT shards, PubMedQA as a list: no two rows share an id."""
    for shard in (1, 2):
        (tmp_path / "mcqa" / f"part{shard}.jsonl").parent.mkdir(exist_ok=True)
        (tmp_path / "mcqa" / f"part{shard}.jsonl").write_text(shard_lines("jsonl", shard))
        gen = [{"instruction": f"Patient {shard}-{k} asks", "output": f"Advice {k}"} for k in range(3)]
        (tmp_path / "gen" / f"en{shard}.json").parent.mkdir(exist_ok=True)
        (tmp_path / "gen" / f"en{shard}.json").write_text(json.dumps(gen))
    pub = [{"QUESTION": f"Does drug {k} work?", "final_decision": "yes", "CONTEXTS": ["c"]} for k in range(3)]
    (tmp_path / "pub.json").write_text(json.dumps(pub))
    for path, fmt, n in (("mcqa", "medmcqa", 10), ("gen", "genmedgpt", 6), ("pub.json", "pubmedqa", 3)):
        records, rejected = read(tmp_path / path, format=fmt)
        assert not rejected and len({r["id"] for r in records}) == len(records) == n, fmt


def prepare_config(tmp_path: Path, *sources: dict) -> object:
    from medtune.config import validate_config

    return validate_config({"model": {"path": str(tmp_path / "no-model")}, "data": {"train": list(sources)}})


def test_prepare_keeps_every_row_of_shards_and_of_two_sources_of_one_layout(tmp_path):
    from medtune.data.prepare import run_prepare

    for shard in (1, 2):
        (tmp_path / "shards").mkdir(exist_ok=True)
        (tmp_path / "shards" / f"shard-{shard}.jsonl").write_text(shard_lines("medqa", shard))
        (tmp_path / f"medqa-{shard}.jsonl").write_text(shard_lines("medqa", 10 + shard))
    cfg = prepare_config(tmp_path, {"path": str(tmp_path / "shards"), "format": "medqa", "name": "shards"})
    shards = run_prepare(cfg, tmp_path / "out1")["sources"]["train/shards"]
    assert (shards["records_in"], shards["kept"], shards["quarantined"]) == (10, 10, 0)
    two = [{"path": str(tmp_path / f"medqa-{shard}.jsonl"), "format": "medqa"} for shard in (1, 2)]
    both = run_prepare(prepare_config(tmp_path, *two), tmp_path / "out2")["sources"]
    for shard in (1, 2):  # the same default name, told apart by the file
        one = both[f"train/medqa/medqa-{shard}"]
        assert (one["records_in"], one["kept"], one["quarantined"]) == (5, 5, 0)


# ---------------------------------------------------------------- KorMedMCQA subjects and the law block

KOR_HEADER = ",subject,year,period,q_number,question,A,B,C,D,E,answer,cot\n"


def kor_rows(subject: str, year: int, period: int, questions: range) -> str:
    return "".join(
        f"{q},{subject},{year},{period},{q},법 문항 {subject} {year} {period} {q}?,a,b,c,d,e,A,\n"
        for q in questions
    )


@needs_shared
def test_medical_law_block_has_20_items_in_every_exam_year_that_has_one():
    """SOURCE.md: nurse, pharm, dentist have a 20-item block every year; doctor only from 2022."""
    records = [r for split in ("train", "valid") for r in read(SHARED / "kormedmcqa", split=split)[0]]
    law: Counter[tuple[str, str]] = Counter()
    for r in records:
        law[r["subject"], r["id"].split(":")[2].split("-")[1]] += "medical_law" in r["tags"]
    assert set(law) >= {("nurse", "2019"), ("pharm", "2021"), ("dentist", "2020"), ("doctor", "2012")}
    for (subject, year), n in law.items():
        has_block = subject != "doctor" or int(year) >= 2022
        assert n == (20 if has_block else 0), (subject, year)


def test_medical_law_rule_on_test_years_and_the_2024_pharmacy_subject(tmp_path):
    """The held-back test years (2022-2024): 2024 pharmacist rows are named `pharmacy`."""
    blocks = {"doctor": (1, range(1, 21)), "nurse": (3, range(66, 86)), "dentist": (4, range(66, 86))}
    for year in (2022, 2023, 2024):
        blocks_y = {**blocks, "pharm" if year < 2024 else "pharmacy": (4, range(64, 84))}
        if year == 2022:
            blocks_y["dentist"] = (4, range(76, 96))
        for subject, (period, law_qs) in blocks_y.items():
            folder = tmp_path / ("pharm" if subject == "pharmacy" else subject)  # upstream folder names
            folder.mkdir(exist_ok=True)
            path = folder / "test.csv"
            body = kor_rows(subject, year, period, range(1, 101)) + kor_rows(
                subject, year, period % 4 + 1, law_qs
            )
            path.write_text((path.read_text() if path.exists() else KOR_HEADER) + body)
    records, rejected = read(tmp_path, format="kormedmcqa")
    assert not rejected
    assert {r["subject"] for r in records} == {"doctor", "nurse", "pharm", "dentist"}
    law = Counter(
        (r["subject"], r["id"].split(":")[2].split("-")[1]) for r in records if "medical_law" in r["tags"]
    )
    assert law == {
        (s, str(y)): 20 for s in ("doctor", "nurse", "pharm", "dentist") for y in (2022, 2023, 2024)
    }
    assert "kormedmcqa:test:pharm-2024-4-64" in {r["id"] for r in records}


# ---------------------------------------------------------------- declared format decides the reader

ROWS = [
    {"question": f"Which option is number {k}?", "options": ["x", "y", "z"], "answer": k % 3}
    for k in range(4)
]


def test_declared_format_wins_over_the_extension(tmp_path):
    (tmp_path / "a.txt").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records, rejected = read(tmp_path / "a.txt", format="jsonl")
    assert not rejected and [r["answer"] for r in records] == ["A", "B", "C", "A"]
    (tmp_path / "doc.jsonl").write_text(json.dumps(ROWS, indent=2))
    records, rejected = read(tmp_path / "doc.jsonl", format="json")
    assert not rejected and [r["provenance"]["line"] for r in records] == [1, 2, 3, 4]
    (tmp_path / "commas.tsv").write_text("question,A,B,answer\nWhich one is it?,x,y,B\n")
    records, rejected = read(tmp_path / "commas.tsv", format="csv")
    assert not rejected and records[0]["options"] == ["x", "y"]
    (tmp_path / "table.txt").write_text("question\tA\tB\tanswer\nWhich one is it?\tx\ty\tA\n")
    assert read(tmp_path / "table.txt", format="tsv")[0][0]["answer"] == "A"


def test_folder_with_a_declared_format_reads_the_files_of_that_format(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d" / "notes.txt").write_text("not data")
    records, rejected = read(tmp_path / "d", format="jsonl")
    assert not rejected and len(records) == 4
    (tmp_path / "d" / "b.csv").write_text("question,A,B,answer\nWhich one is it?,x,y,B\n")
    with pytest.raises(DataError, match=r"format jsonl.*also holds b\.csv"):
        read(tmp_path / "d", format="jsonl")


# ---------------------------------------------------------------- whole-file checks

KO_ROWS = [
    {"question": f"다음 중 옳은 것은 {k}번?", "options": ["가", "나"], "answer": "A"} for k in range(6)
]
KO_CSV = "question,A,B,answer\n" + "".join(f"{r['question']},가,나,A\n" for r in KO_ROWS)
KO_JSONL = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in KO_ROWS)


@pytest.mark.parametrize(
    "name,text",
    [("ko.csv", KO_CSV), ("ko.jsonl", KO_JSONL), ("ko.json", json.dumps(KO_ROWS, ensure_ascii=False))],
)
@pytest.mark.parametrize("codec", ["cp949", "euc-kr"])
def test_a_korean_legacy_encoding_is_one_error_that_suggests_the_fix(tmp_path, name, text, codec):
    path = tmp_path / name
    path.write_bytes(text.encode(codec))
    with pytest.raises(DataError, match=rf"{name}.*encoding: cp949"):
        read(path)
    records, rejected = read(path, encoding=codec)
    assert not rejected and [r["question"] for r in records] == [r["question"] for r in KO_ROWS]


def test_utf16_and_utf8_bom_files(tmp_path):
    (tmp_path / "u16.csv").write_bytes(KO_CSV.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.csv.*encoding: utf-16"):
        read(tmp_path / "u16.csv")
    assert len(read(tmp_path / "u16.csv", encoding="utf-16")[0]) == 6
    (tmp_path / "le.jsonl").write_bytes(KO_JSONL.encode("utf-16-le"))  # no BOM
    with pytest.raises(DataError, match=r"le\.jsonl.*encoding: utf-16-le"):
        read(tmp_path / "le.jsonl")
    assert len(read(tmp_path / "le.jsonl", encoding="utf-16-le")[0]) == 6
    (tmp_path / "bom.jsonl").write_bytes(KO_JSONL.encode("utf-8-sig"))
    assert len(read(tmp_path / "bom.jsonl")[0]) == 6


def test_isolated_bad_lines_are_still_quarantined_one_by_one(tmp_path):
    lines = KO_JSONL.encode().splitlines(keepends=True)
    lines[2] = lines[2].decode().encode("cp949")  # one row saved in another encoding
    lines[4] = lines[4][:20] + b"\n"  # one truncated row
    (tmp_path / "mixed.jsonl").write_bytes(b"".join(lines))
    records, rejected = read(tmp_path / "mixed.jsonl")
    assert len(records) == 4 and [(r.line, r.reason.split()[0]) for r in rejected] == [
        (3, "non-UTF-8"),
        (5, "unparseable"),
    ]


@pytest.mark.parametrize(
    "content,fmt,message",
    [
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00" + bytes(200), "csv", "binary.*ZIP"),
        (b"PAR1\x15\x04\x15\x10\x15\x14L\x15\x02\x15\x00" + bytes(200), "jsonl", "binary.*format: parquet"),
        (b"\x1f\x8b\x08\x00" + bytes(100), "json", "binary.*gzip"),
    ],
)
def test_binary_content_is_one_error(tmp_path, content, fmt, message):
    path = tmp_path / f"data.{fmt}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=rf"data\.{fmt}.*{message}"):
        read(path, format=fmt)


def test_json_array_in_a_jsonl_file_and_json_lines_in_a_json_file(tmp_path):
    for name, text in (
        ("pretty.jsonl", json.dumps(ROWS, indent=2)),
        ("oneline.jsonl", json.dumps(ROWS)),
        ("keyed.jsonl", json.dumps({f"k{i}": r for i, r in enumerate(ROWS)}, indent=1)),
    ):
        (tmp_path / name).write_text(text)
        records, rejected = read(tmp_path / name)
        assert not rejected and [r["provenance"]["line"] for r in records] == [1, 2, 3, 4], name
    assert read(tmp_path / "keyed.jsonl")[0][0]["id"] == "keyed:train:k0"
    (tmp_path / "lines.json").write_text("\n" + "".join(json.dumps(r) + "\n\n" for r in ROWS))
    records, rejected = read(tmp_path / "lines.json")
    assert not rejected and [r["provenance"]["line"] for r in records] == [2, 4, 6, 8]


@pytest.mark.parametrize(
    "name,text,message",
    [
        ("blank.jsonl", " \n\n\t\n", "is empty"),
        ("bom.csv", "\ufeff\r\n", "is empty"),
        ("header.csv", "question,A,B,answer\r\n", "has a header but no rows"),
        ("header.tsv", "question\tA\tB\tanswer\n\n", "has a header but no rows"),
        ("none.json", "[]", "holds no items"),
        ("none.jsonl", "{}\n", None),
        ("text.jsonl", "this is\nnot json\nat all\n", "not JSON"),
    ],
)
def test_empty_header_only_and_not_json_files_are_one_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    if message is None:  # one empty object is a row: quarantined, not a whole-file problem
        assert len(read(tmp_path / name)[1]) == 1
        return
    with pytest.raises(DataError, match=rf"{name}.*{message}"):
        read(tmp_path / name)


def test_empty_parquet_is_one_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(DataError, match=r"none\.parquet: holds no rows"):
        read(tmp_path / "none.parquet")


@pytest.mark.parametrize("name", ["one_line.json", "one_line.jsonl"])
def test_a_json_document_on_one_line_longer_than_the_sniffed_head_is_read(tmp_path, monkeypatch, name):
    """`json.dumps(items)` writes one line; past the head window the whole-file check cut that line off
    and called the file empty (a 2.7 MB minified GenMedGPT split did this)."""
    monkeypatch.setattr("medtune.data.files.HEAD_BYTES", 256)
    items = [{"input": f"What is item {i} about, in a few words?", "output": "x" * 40} for i in range(20)]
    (tmp_path / name).write_text(json.dumps(items))
    records, rejected = read(tmp_path / name)
    assert len(records) == 20 and not rejected
