"""Mixer: achieved language ratio within 0.5% of the target, by examples and by tokens; seeded."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medtune.config import MixConfig
from medtune.data.mix import plan_mix
from medtune.errors import DataError


def pool(n_ko: int, n_en: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    langs = ["ko"] * n_ko + ["en"] * n_en + ["mixed"] * 7
    strata = [f"src{i % 3}" for i in range(len(langs))]
    tokens = rng.integers(20, 600, len(langs))
    return langs, strata, tokens


def shares(result, langs, weights):
    got = Counter()
    for i in result.indices:
        got[langs[i]] += int(weights[i])
    total = sum(got.values())
    return {k: v / total for k, v in got.items()}


@settings(max_examples=30, deadline=None)
@given(
    ko=st.integers(1, 10),
    en=st.integers(1, 10),
    by=st.sampled_from(["examples", "tokens"]),
    replacement=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_achieved_ratio_within_half_a_percent(ko, en, by, replacement, seed):
    langs, strata, tokens = pool(3000, 5000, seed % 7)
    weights = tokens if by == "tokens" else np.ones(len(langs), dtype=np.int64)
    total = (6000 if by == "examples" else 1_500_000) if replacement else None
    cfg = MixConfig(ratio={"ko": ko, "en": en}, by=by, total=total, replacement=replacement)
    result = plan_mix(langs, strata, weights, cfg, seed)
    got = shares(result, langs, weights)
    for lang, r in (("ko", ko), ("en", en)):
        assert abs(got.get(lang, 0) - r / (ko + en)) <= 0.005, (got, cfg)
    assert result.achieved_share == {k: round(v, 6) for k, v in sorted(got.items())}
    assert "mixed" not in got and result.excluded == {"mixed": 7}
    if not replacement:
        assert len(set(result.indices)) == len(result.indices), "no up-sampling without replacement"
        # the largest mix without up-sampling uses (almost) all of the scarcer language
        scarce = min(
            ("ko", "en"),
            key=lambda k: (
                sum(w for w, lg in zip(weights, langs, strict=True) if lg == k) / (ko if k == "ko" else en)
            ),
        )
        used = sum(int(weights[i]) for i in result.indices if langs[i] == scarce)
        avail = sum(int(w) for w, lg in zip(weights, langs, strict=True) if lg == scarce)
        assert used >= 0.99 * avail


def test_total_budget_and_upsampling():
    langs, strata, tokens = pool(100, 1000)
    result = plan_mix(
        langs,
        strata,
        np.ones(len(langs), int),
        MixConfig(ratio={"ko": 1, "en": 1}, total=800, replacement=True),
        0,
    )
    counts = Counter(langs[i] for i in result.indices)
    assert counts == {"ko": 400, "en": 400}
    assert max(Counter(result.indices).values()) == 4  # 100 ko records, each used 4 times
    capped = plan_mix(
        langs, strata, np.ones(len(langs), int), MixConfig(ratio={"ko": 1, "en": 1}, total=800), 0
    )
    assert capped.total_reduced and Counter(langs[i] for i in capped.indices) == {"ko": 100, "en": 100}


def test_stratified_by_source_keeps_proportions():
    langs = ["en"] * 1000 + ["ko"] * 400
    strata = ["big"] * 800 + ["small"] * 200 + ["k"] * 400
    result = plan_mix(langs, strata, np.ones(1400, int), MixConfig(ratio={"ko": 1, "en": 1}), 0)
    per = Counter(strata[i] for i in result.indices)
    assert per == {"k": 400, "big": 320, "small": 80}


def test_seed_determinism():
    langs, strata, tokens = pool(2000, 4000)
    cfg = MixConfig(ratio={"ko": 1, "en": 1})
    a = plan_mix(langs, strata, np.ones(len(langs), int), cfg, 1).indices
    assert a == plan_mix(langs, strata, np.ones(len(langs), int), cfg, 1).indices
    assert a != plan_mix(langs, strata, np.ones(len(langs), int), cfg, 2).indices
    assert a == sorted(a)


def test_no_ratio_keeps_everything_and_missing_language_is_an_error():
    langs, strata, tokens = pool(10, 10)
    assert plan_mix(langs, strata, tokens, MixConfig(), 0).indices == list(range(len(langs)))
    with pytest.raises(DataError, match=r"no training records in language\(s\) \['ja'\]"):
        plan_mix(langs, strata, tokens, MixConfig(ratio={"ko": 1, "ja": 1}), 0)
