"""Contamination: copied eval stems are caught, shared vignette boilerplate is not; recurring exam
stems (same stem, other options) are listed, and removed only when asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medtune.config import ContaminationConfig, SourceConfig, validate_config
from medtune.data.contamination import RECURRING_JACCARD, ContaminationIndex, short_stem_grams
from medtune.data.prepare import read_prepared, run_prepare
from medtune.data.read import iter_source
from medtune.data.validate import build_record
from medtune.report.build import run_report

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data not found at {SHARED}")


def rec(source: str, i: int, question: str, options: list[str] | None = None) -> dict:
    return build_record(
        source=source,
        split="x",
        row_id=str(i),
        provenance={"file": "f", "line": i},
        question=question,
        options=options or ["a", "b", "c", "d"],
        answer="A",
    )


EVAL_STEM = (
    "A 21-year-old sexually active male complains of fever, pain during urination, and inflammation "
    "and pain in the right knee. A culture of the joint fluid shows a bacteria that does not ferment maltose."
)


def index(*evals: dict) -> ContaminationIndex:
    idx = ContaminationIndex(ContaminationConfig())
    for e in evals:
        idx.add_eval(e)
    return idx


def test_copied_stem_is_caught_even_inside_longer_text():
    idx = index(rec("medqa", 1, EVAL_STEM))
    assert idx.check(rec("train", 1, "Case study. " + EVAL_STEM + " What next?", ["w", "x", "y", "z"])) == [
        "medqa:x:1"
    ]
    assert idx.report()["medqa"] == {
        "eval_items": 1,
        "train_records_overlapping": 1,
        "eval_items_overlapped": 1,
    }


def test_shared_boilerplate_is_not_contamination():
    idx = index(
        rec(
            "medqa",
            1,
            "A 36-year-old woman comes to the physician because of a 2-month history of "
            "progressively worsening lower back pain and weakness in the lower extremities.",
        )
    )
    other = (
        "A 73-year-old woman comes to the physician because of a 2-month history of diffuse weakness and "
        "tingling of her arms and legs; neurologic examination shows weakness of the extensor muscles."
    )
    assert idx.check(rec("train", 1, other)) == []


def test_short_korean_stems_use_characters_and_short_ones_need_their_options():
    long_ko = (
        "65세 여자가 혀의 통증으로 내원하였다. 혈액검사 결과 혈색소 수치가 10.5 g/dL이고 "
        "평균적혈구용적이 증가하였다. 원인은?"
    )
    short = "의사가 될 수 있는 사람은?"
    idx = index(rec("kmq", 1, long_ko), rec("kmq", 2, short, ["가", "나", "다", "라"]))
    assert idx.check(rec("train", 1, long_ko.replace("원인은?", "가능성이 높은 원인은?"))) == ["kmq:x:1"]
    assert idx.check(rec("train", 2, short, ["라", "다", "나", "가"])) == ["kmq:x:2"]  # same item, shuffled
    assert idx.check(rec("train", 3, short, ["마", "바", "사", "아"])) == []  # same stem, other options


@needs_shared
def test_real_generic_stem_is_not_contamination_but_a_copied_item_is():
    # SOURCE.md: one MMLU question text, "Which of the following is true?", also opens a MedMCQA item;
    # the options differ, so it is a different question and must not be reported.
    mmlu = list(iter_source(SourceConfig(path=SHARED / "mmlu_medical"), "eval"))
    idx = index(*mmlu)
    hits = [r["id"] for r in iter_source(SourceConfig(path=SHARED / "medmcqa"), "train") if idx.check(r)]
    assert hits == []
    copied = dict(mmlu[500], source="train", id="train:x:1")
    assert mmlu[500]["id"] in idx.check(copied)  # (plus its twin, when it is one of the 78 shared rows)


KO_STEM = "의사가 될 수 있는 사람은?"
KO_OPTIONS = ["피성년후견인", "마약 중독자", "의학전문대학원 졸업자", "금고 이상의 형", "정신질환자"]
EN_STEM = "Drug of choice for absence seizures in children is:"
EN_OPTIONS = ["Ethosuximide", "Phenytoin", "Carbamazepine", "Phenobarbital"]


def test_recurring_stem_with_other_options_is_listed_not_contamination():
    idx = index(rec("kmq", 1, KO_STEM, KO_OPTIONS), rec("mmlu", 2, EN_STEM, EN_OPTIONS))
    ko = rec(
        "train", 1, "의사가 될 수 있는  사람은 ?", ["외국 의대 졸업자", "간호사", "조산사", "한의사", "약사"]
    )
    en = rec("train", 2, "DRUG OF CHOICE for absence seizures in children is", ["Valproate", "a", "b", "c"])
    unrelated = rec("train", 3, "간호사가 될 수 있는 사람은?", ["가", "나", "다", "라"])
    assert [idx.check(r) for r in (ko, en, unrelated)] == [[], [], []]
    assert idx.recurring_stems(ko) == [("kmq", "kmq:x:1")]
    assert idx.recurring_stems(en) == [("mmlu", "mmlu:x:2")]
    assert idx.recurring_stems(unrelated) == []
    assert idx.recurring_report() == {
        "train_records": 2,
        "per_eval_source": {
            "kmq": {"train_records": 1, "eval_items": 1},
            "mmlu": {"train_records": 1, "eval_items": 1},
        },
        "pairs": [
            {"train_id": "train:x:1", "eval_id": "kmq:x:1", "eval_source": "kmq"},
            {"train_id": "train:x:2", "eval_id": "mmlu:x:2", "eval_source": "mmlu"},
        ],
    }


@pytest.mark.parametrize(
    "eval_stem,train_stem,same",
    [
        # a KorMedMCQA law item, asked again with the act named (char 5-gram Jaccard 0.86)
        (
            "「의료법」상 250병상을 갖춘 종합병원에 반드시 설치하여야 하는 진료과목은?",
            "250병상을 갖춘 종합병원에 반드시 설치하여야 하는 진료과목은?",
            True,
        ),
        # MMLU and MedMCQA: one stem in British and American spelling (0.80)
        (
            "Which of the following is not a tumour suppressor gene?",
            "Which of the following is not a tumor suppressor gene?",
            True,
        ),
        # the same frame about two different lesions is not one stem (0.67)
        ("골육종에 관한 설명으로 옳은 것은?", "혈관종에 관한 설명으로 옳은 것은?", False),
        (
            "Which of the following statements is false?",
            "Which of the following statements is false about apoptosis?",
            False,
        ),
    ],
)
def test_near_same_short_stems_recur(eval_stem, train_stem, same):
    idx = index(rec("exam", 1, eval_stem, ["대동맥판막 협착", "승모판막 역류", "심방세동", "심낭염"]))
    train = rec("train", 1, train_stem, ["Apoptosis", "Necrosis", "Autophagy", "Pyroptosis"])
    assert idx.check(train) == []
    assert idx.recurring_stems(train) == ([("exam", "exam:x:1")] if same else [])


STEMS = st.text(alphabet="abc 가나", min_size=1, max_size=14).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(
    evals=st.lists(STEMS, min_size=1, max_size=12),
    train=STEMS,
)
def test_recurring_stems_match_a_brute_force_jaccard(evals, train):
    """The prefix-filtered index finds exactly the eval stems a full pairwise comparison finds."""
    idx = index(*[rec("exam", i, q, ["o1", "o2"]) for i, q in enumerate(evals)])
    record = rec("train", 0, train, ["o3", "o4"])
    grams = short_stem_grams(record, ContaminationConfig())
    expected = []
    for i, q in enumerate(evals):
        other = short_stem_grams(rec("exam", i, q, ["o1", "o2"]), ContaminationConfig())
        if grams and other:
            shared = len(grams & other)
            if shared >= RECURRING_JACCARD * len(grams | other):
                expected.append(("exam", f"exam:x:{i}"))
    assert idx.recurring_stems(record) == expected


def _write(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    path.write_text(
        "".join(json.dumps({"id": i, "question": q, "options": o, "answer": "A"}) + "\n" for i, q, o in rows)
    )
    return path


@pytest.mark.parametrize("action", ["flag", "remove"])
def test_prepare_flags_or_removes_recurring_stems(tmp_path, action):
    evals = _write(tmp_path / "exam.jsonl", [("ko1", KO_STEM, KO_OPTIONS), ("en1", EN_STEM, EN_OPTIONS)])
    train = _write(
        tmp_path / "bank.jsonl",
        [
            ("ko_other", KO_STEM, ["외국 의대 졸업자", "간호사", "조산사", "한의사", "약사"]),
            ("ko_copy", KO_STEM, list(reversed(KO_OPTIONS))),  # the eval item, shuffled: contamination
            ("en_other", EN_STEM.upper(), ["Valproate", "Lamotrigine", "Topiramate", "Diazepam"]),
            ("clean", "Which nerve innervates the deltoid?", ["Axillary", "Radial"]),
        ],
    )
    cfg = validate_config(
        {
            "model": {"path": str(tmp_path / "no-model")},
            "data": {
                "train": [{"path": str(train), "name": "bank"}],
                "eval": [{"path": str(evals), "name": "exam"}],
                "contamination": {"recurring_stems": action},
            },
        }
    )
    out = tmp_path / "run" / "prepare"
    manifest = run_prepare(cfg, out)
    removed = action == "remove"
    recurring = manifest["contamination"]["recurring_stems"]
    assert recurring == {
        "action": action,
        "file": "recurring_stems.jsonl",
        "train_records": 2,
        "per_eval_source": {"exam": {"train_records": 2, "eval_items": 2}},
        "pairs": [
            {"train_id": "bank:train:ko_other", "eval_id": "exam:eval:ko1", "eval_source": "exam"},
            {"train_id": "bank:train:en_other", "eval_id": "exam:eval:en1", "eval_source": "exam"},
        ],
    }
    lines = [json.loads(x) for x in (out / "recurring_stems.jsonl").read_text().splitlines()]
    assert lines == [dict(p, removed=removed) for p in recurring["pairs"]]
    assert "recurring_stems.jsonl" in manifest["files"]
    kept = {r["id"].split(":")[-1] for r in read_prepared(out, "train")}
    assert kept == ({"clean"} if removed else {"clean", "ko_other", "en_other"})  # ko_copy: contamination
    counts = manifest["sources"]["train/bank"]
    assert counts["contaminated_removed"] == (3 if removed else 1)
    page = (run_report(tmp_path / "run", tmp_path / "report") / "report.md").read_text(encoding="utf-8")
    overlap = page.split("### Eval/train overlap")[1].split("###")[0]
    assert "| exam | 2 | 1 | 2 |" in overlap  # eval items, near-copies, recurring stems
    assert f"action {action}, 2 training records" in overlap
    assert "| bank:train:ko_other | exam:eval:ko1 | exam |" in overlap
