"""Wilson, bootstrap, paired bootstrap and exact McNemar on data whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from medtune.evaluate.stats import (
    accuracy_summary,
    accuracy_table,
    bootstrap_ci,
    discordant_counts,
    group_items,
    mcnemar_exact,
    paired_bootstrap_ci,
    wilson_ci,
)


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        (5, 10, 0.236593, 0.763407),  # textbook values (e.g. Newcombe 1998, Table I style)
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
    ],
)
def test_wilson_known_values(k: int, n: int, lo: float, hi: float) -> None:
    got = wilson_ci(k, n)
    assert got == pytest.approx((lo, hi), abs=2e-5)


@pytest.mark.parametrize(("k", "n"), [(81, 263), (1, 3), (60, 60), (13, 1059), (500, 1000)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_ci(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_wilson_empty_is_uninformative() -> None:
    assert wilson_ci(0, 0) == (0.0, 1.0)


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_contains_estimate_and_stays_in_unit_interval(k: int, n: int) -> None:
    k = min(k, n)
    lo, hi = wilson_ci(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_bootstrap_is_seeded_and_close_to_wilson_for_large_n() -> None:
    rng = np.random.default_rng(1)
    values = (rng.random(600) < 0.7).astype(float)
    a = bootstrap_ci(values, 4000, seed=3)
    assert a == bootstrap_ci(values, 4000, seed=3)
    assert a != bootstrap_ci(values, 4000, seed=4)
    wl, wh = wilson_ci(int(values.sum()), len(values))
    assert a[0] == pytest.approx(wl, abs=0.01) and a[1] == pytest.approx(wh, abs=0.01)
    assert a[0] < values.mean() < a[1]


def test_bootstrap_of_constant_data_is_a_point() -> None:
    assert bootstrap_ci(np.ones(50), 500) == (1.0, 1.0)
    assert bootstrap_ci(np.zeros(50), 500) == (0.0, 0.0)


def test_bootstrap_sliced_resampling_matches_shape() -> None:
    # n large enough that resampling is done in several slices; still a sane interval
    values = np.tile([0.0, 1.0], 5000)
    lo, hi = bootstrap_ci(values, 1000, seed=0)
    assert 0.48 < lo < 0.5 < hi < 0.52


def test_paired_bootstrap_identical_is_zero() -> None:
    a = np.random.default_rng(0).random(200) < 0.5
    assert paired_bootstrap_ci(a, a, 1000) == (0.0, 0.0)


def test_paired_bootstrap_brackets_the_observed_delta() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(300) < 0.5
    b = a.copy()
    b[:40] = True  # B fixes some of A's mistakes
    delta = b.mean() - a.mean()
    lo, hi = paired_bootstrap_ci(a, b, 2000, seed=0)
    assert lo < delta < hi
    assert lo > 0  # only improvements: every resample has delta >= 0, and most > 0


def test_paired_bootstrap_rejects_unequal_lengths() -> None:
    with pytest.raises(ValueError):
        paired_bootstrap_ci([1, 0], [1, 0, 1])


def test_mcnemar_identical_is_one() -> None:
    a = [True, False, True, True]
    assert mcnemar_exact(a, a) == 1.0


def _paired(only_a: int, only_b: int, both: int = 20, neither: int = 7) -> tuple[list[bool], list[bool]]:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(("only_a", "only_b"), [(3, 12), (0, 10), (5, 5), (1, 0), (17, 9), (40, 61)])
def test_mcnemar_matches_scipy_binomtest(only_a: int, only_b: int) -> None:
    a, b = _paired(only_a, only_b)
    assert discordant_counts(a, b) == (only_a, only_b)
    expected = binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue
    assert mcnemar_exact(a, b) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=50)
@given(st.integers(0, 60), st.integers(0, 60))
def test_mcnemar_symmetric_and_in_range(only_a: int, only_b: int) -> None:
    a, b = _paired(only_a, only_b)
    p = mcnemar_exact(a, b)
    assert 0.0 < p <= 1.0
    assert p == mcnemar_exact(b, a)


def _item(i: int, correct: bool | None, lang: str, subject: str | None = None, tags=()) -> dict:
    return {
        "id": str(i),
        "correct": correct,
        "language": lang,
        "source": f"src-{lang}",
        "subject": subject,
        "tags": list(tags),
        "status": "unscorable" if correct is None else "ok",
    }


def test_grouping_and_macro_average() -> None:
    items = [_item(i, i % 2 == 0, "en") for i in range(10)]  # en: 5/10
    items += [_item(100 + i, True, "ko", "nurse", ["medical_law"]) for i in range(3)]  # ko: 3/3
    items += [_item(200, None, "ko", "nurse")]  # unscorable: counted apart, not wrong
    groups = group_items(items)
    assert (
        len(groups["all"]) == 14 and len(groups["language=ko"]) == 4 and len(groups["tag=medical_law"]) == 3
    )
    table = accuracy_table(items, n_samples=200)
    assert table["groups"]["all"]["n"] == 13 and table["groups"]["all"]["unscorable"] == 1
    assert table["groups"]["language=ko"]["accuracy"] == 1.0
    assert table["groups"]["all"]["accuracy"] == pytest.approx(8 / 13)
    assert table["macro"]["language"] == pytest.approx((0.5 + 1.0) / 2)
    assert table["macro"]["subject"] == 1.0


def test_summary_counts_unanswered_as_wrong_but_reports_them() -> None:
    items = [_item(0, True, "en"), {**_item(1, False, "en"), "status": "unanswered"}]
    summary = accuracy_summary(items, 200)
    assert summary["accuracy"] == 0.5 and summary["unanswered"] == 1 and summary["unscorable"] == 0
