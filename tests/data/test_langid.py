"""Language id: Korean stems with English glosses stay Korean; English sets are English."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medtune.config import SourceConfig
from medtune.data.langid import detect_language, record_language
from medtune.data.read import iter_source

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared real data not found at {SHARED}")


@pytest.mark.parametrize(
    "text,lang",
    [
        ("항문압 측정 검사에서 항문 압력이 증가하는 경우는?", "ko"),
        ("직장질루(rectovaginal fistula)", "ko"),
        ("평균적혈구용적(mean corpuscular volume, MCV)이 증가하였다", "ko"),
        ("Porphyromonas gingivalis와 Aggregatibacter actinomycetemcomitans의 공통점은?", "ko"),
        ("Which of the following is not true for myelinated nerve fibers:", "en"),
        ("The patient said 감사합니다 after the procedure was finished today.", "en"),
        ("Troponin 수치 elevated, ECG 소견 normal, 흉통 persistent", "mixed"),
        ("120/80 mmHg", "en"),
        ("12.5 / 30 %", "other"),
    ],
)
def test_detect_language(text, lang):
    assert detect_language(text) == lang


@needs_shared
@pytest.mark.parametrize(
    "folder,lang,min_share",
    [("kormedmcqa", "ko", 0.999), ("medqa", "en", 1.0), ("medmcqa", "en", 1.0), ("mmlu_medical", "en", 1.0)],
)
def test_real_sets_are_their_language(folder, lang, min_share):
    langs = Counter(record_language(r) for r in iter_source(SourceConfig(path=SHARED / folder), "train"))
    assert langs[lang] / sum(langs.values()) >= min_share, langs


@needs_shared
def test_genmedgpt_ko_and_en_files_split_cleanly():
    langs = Counter(
        (Path(r["provenance"]["file"]).suffix, record_language(r))
        for r in iter_source(SourceConfig(path=SHARED / "genmedgpt_5k_ko_en"), "train")
    )
    assert langs[(".csv", "ko")] >= 5450 and langs[(".json", "en")] == 5452
