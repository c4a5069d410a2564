"""Seed-aware sweep statistics, checked by simulation: datasets with a known truth, many times over.

Each model is score[i] = ratio effect + item difficulty a_i (shared by every model) + a per-run offset
b_s (the seed) + per-item noise. Rates are asserted within 3 binomial standard errors of the nominal
rate, so a correct method fails these about 1 time in 700 per assertion; a method that ignored seed
variation (or used a normal quantile with three seeds) misses by far more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from medtune.evaluate.advise import (
    GroupScores,
    VarianceParts,
    compare_runs,
    contrast,
    recommend,
    size_needed,
    summarise_groups,
    variance_parts,
)
from medtune.evaluate.stats import paired_bootstrap_ci

POWER_80 = 0.8


def simulate(
    rng: np.random.Generator,
    effects: dict[str, float],
    n_items: int,
    n_seeds: int,
    item_sd: float = 1.0,
    seed_sd: float = 0.0,
    noise_sd: float = 1.0,
) -> GroupScores:
    """One group's scores: base at 0, each ratio at its effect, with seed and item variation."""
    difficulty = rng.normal(0, item_sd, n_items)
    base = difficulty + rng.normal(0, noise_sd, n_items)
    ratios = {
        label: effect
        + difficulty[None, :]
        + rng.normal(0, seed_sd, (n_seeds, 1))
        + rng.normal(0, noise_sd, (n_seeds, n_items))
        for label, effect in effects.items()
    }
    return GroupScores(base, ratios)


def _within(nominal: float, n: int) -> float:
    return 3 * math.sqrt(nominal * (1 - nominal) / n)


def test_no_effect_gives_no_recommendation_at_most_at_the_nominal_rate_when_seeds_dominate() -> None:
    """Two equal ratios, three seeds, seed variation far above the item part: the trap an items-only
    interval (or a normal quantile on three seeds) falls into."""
    rng = np.random.default_rng(1)
    n, recommended = 1000, 0
    for _ in range(n):
        g = simulate(rng, {"a": 0.0, "b": 0.0}, 60, 3, seed_sd=0.5, noise_sd=0.5)
        if recommend({"t": g}, "accuracy", "t")["recommended"] is not None:
            recommended += 1
    assert recommended / n <= 0.05 + _within(0.05, n)


@pytest.mark.parametrize("seeds, seed_sd", [(2, 0.0), (2, 0.1), (2, 0.3), (3, 0.1)])
def test_no_effect_at_two_or_three_seeds_when_seed_spread_is_like_item_noise(
    seeds: int, seed_sd: float
) -> None:
    """With two or three seeds the seed part's estimate often comes out at 0 by chance; an interval that
    then drops its degrees of freedom calls equal ratios different 7-9% of the time at these settings."""
    rng = np.random.default_rng(11 + seeds)
    n, recommended = 1000, 0
    for _ in range(n):
        g = simulate(rng, {"a": 0.0, "b": 0.0}, 100, seeds, seed_sd=seed_sd, noise_sd=1.0)
        recommended += recommend({"t": g}, "accuracy", "t")["recommended"] is not None
    assert recommended / n <= 0.05 + _within(0.05, n) / 3


def test_no_effect_one_seed_item_noise_only() -> None:
    rng = np.random.default_rng(2)
    n, recommended = 1000, 0
    for _ in range(n):
        g = simulate(rng, {"a": 0.0, "b": 0.0}, 80, 1)
        recommended += recommend({"t": g}, "accuracy", "t")["recommended"] is not None
    assert recommended / n <= 0.05 + _within(0.05, n)


def test_a_known_effect_is_found_at_the_power_size_needed_promises() -> None:
    """size_needed says how many items give 80% power; at that many items the effect is found ~80% of
    the time. One seed, so the interval's t quantile has the items' degrees of freedom, as the sizing
    assumes; with two or three seeds the seed part's few degrees of freedom widen it (a larger t), so
    the sizes it states are the least that could do."""
    effect, seeds, noise = 0.25, 1, 0.5**0.5
    # The true variance of (mean b - mean a) at 100 items: 2 noise^2 / seeds / 100, all from items.
    item_var = 2 * noise**2 / seeds / 100
    parts = VarianceParts(0.0, item_var, True, interval_var=item_var, interval_df=99)
    n_items = size_needed(effect, parts, 100, seeds)["items"]
    assert n_items == 126  # (2.80 / 0.25)^2 * 2 * 0.5 / 1
    rng = np.random.default_rng(3)
    n, found = 500, 0
    for _ in range(n):
        g = simulate(rng, {"a": 0.0, "b": effect}, n_items, seeds, item_sd=1.0, noise_sd=noise)
        found += recommend({"t": g}, "accuracy", "t")["recommended"] == "b"
    assert abs(found / n - POWER_80) <= _within(POWER_80, n)


def test_seed_aware_interval_covers_the_truth_where_an_items_only_one_does_not() -> None:
    rng = np.random.default_rng(4)
    n, covered, covered_items_only = 200, 0, 0
    for k in range(n):
        g = simulate(rng, {"a": 0.3}, 50, 3, seed_sd=0.4, noise_sd=0.3)
        lo, hi = contrast([g.ratios["a"], g.base[None, :]], [1.0, -1.0])["ci95"]
        covered += lo <= 0.3 <= hi
        ilo, ihi = paired_bootstrap_ci(g.base, g.ratios["a"].mean(axis=0), 300, k)
        covered_items_only += ilo <= 0.3 <= ihi
    assert covered / n >= 0.95 - _within(0.95, n)
    assert covered_items_only / n < 0.7  # why seeds must be in the interval


def test_seed_dominance_is_reported() -> None:
    rng = np.random.default_rng(5)
    noisy_seeds = simulate(rng, {"a": 0.0}, 100, 4, seed_sd=1.0, noise_sd=0.2)
    quiet_seeds = simulate(rng, {"a": 0.0}, 100, 4, seed_sd=0.0, noise_sd=1.0)
    one_seed = simulate(rng, {"a": 0.0}, 100, 1)
    table = summarise_groups({"noisy": noisy_seeds, "quiet": quiet_seeds, "one": one_seed}, "nll")
    rows = {g: t["ratios"]["a"] for g, t in table["groups"].items()}
    assert rows["noisy"]["seed_dominates"] and rows["noisy"]["seed_share"] > 0.8
    assert not rows["quiet"]["seed_dominates"] and rows["quiet"]["seed_share"] < 0.3
    assert rows["one"]["seed_share"] is None and not rows["one"]["seed_dominates"]
    assert len(rows["noisy"]["seed_means"]) == 4 and table["higher_is_better"] is False


def test_a_ratio_that_harms_a_protected_group_is_not_recommended() -> None:
    """`en` is clearly best on the target but costs the protected group 1.0; `mid` costs 0.1."""
    rng = np.random.default_rng(6)
    target = simulate(rng, {"ko": 0.0, "mid": 0.5, "en": 1.5}, 200, 2, noise_sd=0.3)
    guarded = simulate(rng, {"ko": 0.0, "mid": -0.1, "en": -1.0}, 200, 2, noise_sd=0.3)
    groups = {"language=ko": target, "language=en": guarded}
    advice = recommend(groups, "accuracy", "language=ko", ["language=en"], margin=0.5)
    assert list(advice["excluded"]) == ["en"] and "language=en" in advice["excluded"]["en"][0]
    assert advice["recommended"] == "mid" and advice["tied_with_best"] == []
    # Without the margin, `mid`'s small harm excludes it too, and `ko` is what is left.
    strict = recommend(groups, "accuracy", "language=ko", ["language=en"], margin=0.0)
    assert set(strict["excluded"]) == {"en", "mid"} and strict["recommended"] == "ko"


def test_nll_is_lower_is_better() -> None:
    rng = np.random.default_rng(7)
    g = simulate(rng, {"more_ko": -0.5, "less_ko": 0.0}, 150, 2, noise_sd=0.2)
    advice = recommend({"language=ko": g}, "nll", "language=ko")
    assert advice["recommended"] == "more_ko" and advice["gain_vs_base"]["more_ko"] > 0


def test_undistinguishable_ratios_say_so_with_the_size_needed() -> None:
    rng = np.random.default_rng(8)
    g = simulate(rng, {"a": 0.0, "b": 0.05}, 40, 2, seed_sd=0.05)
    advice = recommend({"t": g}, "accuracy", "t")
    assert advice["recommended"] is None and set([advice["best"], *advice["tied_with_best"]]) == {"a", "b"}
    assert advice["message"].startswith("the data cannot tell these ratios apart at this size")
    needed = advice["needed"]
    assert needed["items"] is None or needed["items"] > 40
    assert "run more items or seeds" in advice["message"]


def test_one_seed_says_seed_variation_is_unmeasured() -> None:
    rng = np.random.default_rng(9)
    g = simulate(rng, {"a": 0.0, "b": 0.01}, 30, 1)
    advice = recommend({"t": g}, "accuracy", "t")
    assert advice["needed"]["seeds"] is None and "one seed per ratio" in advice["message"]


def test_unknown_group_is_named() -> None:
    g = simulate(np.random.default_rng(0), {"a": 0.0}, 10, 1)
    with pytest.raises(KeyError, match="language=xx"):
        recommend({"all": g}, "accuracy", "language=xx")


def test_size_needed_scales_each_part_by_its_own_count() -> None:
    parts = variance_parts([np.array([[0.0, 1.0] * 50, [0.2, 1.2] * 50])], [1.0])
    assert parts.seeds_known and parts.seed_var == pytest.approx(0.01)
    sized = size_needed(0.5, parts, 100, 2)
    assert sized["items"] is not None and sized["seeds"] is not None
    assert size_needed(0.0, parts, 100, 2)["items"] is None


def test_compare_runs_covers_seed_variation_across_runs() -> None:
    """Two models with three seeds each, equal on average but with runs that land far apart."""
    rng = np.random.default_rng(10)
    langs = ["ko", "en"] * 100

    def runs(offsets: list[float]) -> list[dict[str, dict]]:
        return [
            {
                f"q{i}": {"id": f"q{i}", "correct": bool(rng.random() < 0.5 + off), "language": lang}
                for i, lang in enumerate(langs)
            }
            for off in offsets
        ]

    table = compare_runs(runs([-0.15, 0.0, 0.15]), runs([0.15, 0.0, -0.15]), "accuracy", ["language"])
    assert set(table) == {"all", "language=ko", "language=en"} and table["all"]["seeds"] == [3, 3]
    assert table["all"]["seed_dominates"] and not table["all"]["significant"]
    lo, hi = table["all"]["ci95"]
    assert hi - lo > 25  # pp: three runs per side cannot pin down a 15 pp run-to-run spread


def test_compare_runs_gives_each_seeds_mean() -> None:
    """The spread a reader can see: each run's own score, on the items every run scored."""
    runs_a = [{f"q{i}": {"id": f"q{i}", "correct": i < k} for i in range(10)} for k in (2, 5)]
    runs_b = [{f"q{i}": {"id": f"q{i}", "correct": i < k} for i in range(10)} for k in (7, 8, 9)]
    runs_b[0]["q9"]["correct"] = None  # unscorable in one run: left out of every run's mean
    row = compare_runs(runs_a, runs_b, "accuracy", [])["all"]
    assert row["n"] == 9
    assert row["a_seed_means"] == pytest.approx([200 / 9, 500 / 9])
    assert row["b_seed_means"] == pytest.approx([700 / 9, 800 / 9, 900 / 9])
    assert row["b"] == pytest.approx(800 / 9)
