"""Dedupe: real cross-source duplicates are found, first occurrence wins, near copies are caught,
reused stems with different options are kept."""

from __future__ import annotations

import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from medtune.config import DedupeConfig, SourceConfig
from medtune.data import dedupe
from medtune.data.dedupe import Deduper, normalise
from medtune.data.read import iter_source
from medtune.data.validate import build_record

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data not found at {SHARED}")


def mcqa(i: int, question: str, options: list[str]) -> dict:
    return build_record(
        source="t",
        split="train",
        row_id=str(i),
        provenance={"file": "f", "line": i},
        question=question,
        options=options,
        answer="A",
    )


def run(records: list[dict], **cfg) -> list[tuple[str, str, str]]:
    d = Deduper(DedupeConfig(**cfg))
    return [(r["id"], *found) for r in records if (found := d.check(r)) is not None]


@needs_shared
def test_mmlu_clinical_knowledge_vs_college_medicine_share_78_rows():
    recs = []
    for subject in ("clinical_knowledge", "college_medicine"):
        path = SHARED / "mmlu_medical" / "test" / f"{subject}_test.csv"
        recs += [r for r in iter_source(SourceConfig(path=path, format="mmlu"), "train")]
    dups = run(recs, near=False)
    assert len(dups) == 78
    # the later file's rows are the ones removed, each pointing at a clinical_knowledge row
    assert all("college_medicine" in d[0] and "clinical_knowledge" in d[2] for d in dups)


@needs_shared
def test_kormedmcqa_fewshot_duplicates_valid():
    valid = list(iter_source(SourceConfig(path=SHARED / "kormedmcqa", split="valid"), "eval"))
    few = list(iter_source(SourceConfig(path=SHARED / "kormedmcqa", split="fewshot"), "eval"))
    dups = run(valid + few)
    assert len(dups) == 20 and all(d[1] == "exact" and ":valid:" in d[2] for d in dups)
    assert {d[0].split(":")[-1] for d in dups} == {d[2].split(":")[-1] for d in dups}


def test_near_duplicate_found_with_the_id_it_duplicates():
    # A USMLE-length vignette (~90 words): one edited word changes 5 of ~90 shingles (Jaccard ~0.9).
    base = (
        "A 45-year-old man comes to the emergency department with crushing chest pain radiating to the "
        "left arm for two hours and diaphoresis after shoveling snow in the morning. He has a history of "
        "hypertension and type 2 diabetes mellitus treated with metformin and lisinopril. He has smoked one "
        "pack of cigarettes daily for 30 years. His pulse is 110/min and blood pressure is 150/95 mm Hg. "
        "An ECG shows ST-segment elevation in leads II, III and aVF. Which of the following is the most "
        "appropriate next step in management?"
    )
    opts = ["Aspirin", "Heparin", "Morphine", "Nitroglycerin"]
    a, b = mcqa(1, base, opts), mcqa(2, base.replace("two hours", "2 hours"), opts)
    unrelated = mcqa(
        3,
        "Which nerve innervates the deltoid muscle in the shoulder region of adults",
        ["Axillary", "Radial", "Ulnar", "Median"],
    )
    assert run([a, b, unrelated]) == [("t:train:2", "near", "t:train:1")]
    assert run([a, b, unrelated], near=False) == []
    # a short item with one edit (Jaccard ~0.6) is below the default 0.85, found at 0.45
    short = "crushing chest pain radiating to the left arm for two hours and diaphoresis after shoveling snow"
    c, d = mcqa(4, short, opts), mcqa(5, short.replace("two hours", "2 hours"), opts)
    assert run([c, d]) == []
    assert run([c, d], threshold=0.45) == [("t:train:5", "near", "t:train:4")]


def test_same_stem_with_different_options_is_not_a_duplicate():
    stem = "의사가 될 수 있는 사람은?"
    a = mcqa(
        1, stem, ["피성년후견인", "마약 중독자", "의학전문대학원 졸업자", "금고 이상의 형", "정신질환자"]
    )
    b = mcqa(2, stem, ["외국 의대 졸업자", "간호사", "조산사", "한의사", "약사"])
    assert run([a, b]) == []


def test_exact_match_ignores_case_punctuation_and_spacing():
    a = mcqa(1, "Major determinant of loading dose of a drug is:-", ["Half life", "Clearance"])
    b = mcqa(2, "major determinant of  loading dose of a drug is", ["half life", "clearance"])
    assert run([a, b], near=False) == [("t:train:2", "exact", "t:train:1")]
    assert normalise("A.  Foo!") == "a foo"


def test_first_occurrence_wins_in_order():
    a, b = mcqa(1, "Same question text here?", ["x", "y"]), mcqa(2, "Same question text here?", ["x", "y"])
    assert run([b, a]) == [("t:train:1", "exact", "t:train:2")]


def word_text(chars: int, seed: int = 0) -> str:
    """About `chars` characters of space-separated words from a 5,000-word vocabulary."""
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(chars // 6))


def test_near_dup_memory_for_a_multi_megabyte_field_is_bounded():
    # Before: every shingle x num_perm uint32 was materialised at once, ~345 MB for this 2 MB field
    # (2.7 GB for 5 MB). Now the permutations run over bounded batches: what is left grows with the
    # text by a small constant (normalising it peaks at ~15 bytes a character), not by num_perm.
    text = word_text(2_000_000)
    record = mcqa(1, text, ["a", "b"])
    deduper = Deduper(DedupeConfig())
    tracemalloc.start()  # numpy reports its buffers to tracemalloc too
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert deduper.check(record) is None
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 16 * len(text) + 16 * 2**20, f"{peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "text",
    [
        "short text",
        "one two three four five",
        word_text(3_000, seed=1),
        "x" * 500 + " tail of words here and more",
    ],
)
def test_signature_does_not_depend_on_how_the_text_is_batched(monkeypatch, text):
    reference = Deduper(DedupeConfig()).signature(normalise(text))
    monkeypatch.setattr(dedupe, "WORD_CHUNK_CHARS", 7)
    monkeypatch.setattr(dedupe, "SHINGLE_BATCH", 3)
    assert np.array_equal(Deduper(DedupeConfig()).signature(normalise(text)), reference)
