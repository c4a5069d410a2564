"""Uncertainty for accuracy numbers: Wilson and bootstrap intervals, paired tests, per-group tables.

A medical benchmark slice is often a few hundred items (KorMedMCQA's 60 law questions), where one
point of accuracy is noise. Every accuracy medtune prints therefore carries an interval, and every
"A beats B" claim is a paired test on the same items: a paired bootstrap interval of the difference
and an exact McNemar test on the discordant pairs.

Items are the per-item dicts `medtune.evaluate.score` writes (`correct` is True/False, or None when
the gold label is unusable; such items are counted separately, never as wrong).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.stats import binom

# Resampling works on a [samples, n] index matrix; above this many cells it is done in slices so a
# 10k-item eval with 10k resamples does not allocate 800 MB at once.
_MAX_CELLS = 1 << 22

GROUP_KEYS = ("language", "source", "subject", "tag")


def wilson_ci(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0/n and n/n, which
    small subject slices hit often. With n == 0 nothing is known: (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly 0 or 1; rounding would put it a hair inside.
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def _resampled_means(values: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """Means of `n_samples` bootstrap resamples of `values` (with replacement), vectorised."""
    rng = np.random.default_rng(seed)
    n = len(values)
    per_slice = max(1, _MAX_CELLS // max(n, 1))
    means = np.empty(n_samples, dtype=np.float64)
    for start in range(0, n_samples, per_slice):
        stop = min(n_samples, start + per_slice)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_samples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. 0/1 correctness)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return 0.0, 1.0
    means = _resampled_means(arr, n_samples, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_samples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(b) - mean(a) resampling *items* (pairs stay together).

    Resampling pairs rather than each side independently keeps the item-difficulty correlation, so
    the interval is much narrower than two unpaired intervals would suggest, and honest.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired data must have equal length, got {a_arr.shape} and {b_arr.shape}")
    if a_arr.size == 0:
        return 0.0, 0.0
    means = _resampled_means(b_arr - a_arr, n_samples, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def discordant_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """(items only A got right, items only B got right)."""
    a_arr, b_arr = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    return int(np.sum(a_arr & ~b_arr)), int(np.sum(~a_arr & b_arr))


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Two-sided exact McNemar p-value: a binomial(n01 + n10, 1/2) test on the discordant pairs.

    Concordant pairs carry no information about which model is better, so only disagreements count.
    No disagreements at all means no evidence of a difference: p = 1.
    """
    only_a, only_b = discordant_counts(a, b)
    n = only_a + only_b
    if n == 0:
        return 1.0
    # The null distribution is symmetric, so the two-sided p is twice the smaller tail (capped at 1);
    # this equals scipy.stats.binomtest(min, n, 0.5).pvalue.
    return float(min(1.0, 2.0 * binom.cdf(min(only_a, only_b), n, 0.5)))


def group_names(item: dict[str, Any], keys: Iterable[str] = GROUP_KEYS) -> list[str]:
    """The groups one item belongs to: `all`, `language=ko`, `source=...`, `subject=...`, `tag=...`."""
    names = ["all"]
    for key in keys:
        if key == "tag":
            names.extend(f"tag={t}" for t in item.get("tags") or [])
        elif item.get(key) is not None:
            names.append(f"{key}={item[key]}")
    return names


def group_items(items: Iterable[dict[str, Any]], keys: Iterable[str] = GROUP_KEYS) -> dict[str, list[dict]]:
    """Items per group name, groups in first-seen order (`all` first)."""
    keys = tuple(keys)
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        for name in group_names(item, keys):
            groups[name].append(item)
    return dict(groups)


def accuracy_summary(items: Sequence[dict[str, Any]], n_samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Accuracy of one group with both intervals; unscorable items are counted, not scored."""
    scorable = [it for it in items if it.get("correct") is not None]
    correct = np.array([bool(it["correct"]) for it in scorable], dtype=np.float64)
    k, n = int(correct.sum()), len(scorable)
    summary: dict[str, Any] = {
        "n": n,
        "correct": k,
        "accuracy": k / n if n else None,
        "wilson_95": list(wilson_ci(k, n)),
        "bootstrap_95": list(bootstrap_ci(correct, n_samples, seed)),
        "unscorable": len(items) - n,
        "unanswered": sum(1 for it in scorable if it.get("status") == "unanswered"),
    }
    norm = [it["correct_norm"] for it in scorable if it.get("correct_norm") is not None]
    if norm:
        summary["accuracy_norm"] = sum(map(bool, norm)) / len(norm)
    return summary


def accuracy_table(
    items: Sequence[dict[str, Any]], keys: Iterable[str] = GROUP_KEYS, n_samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per-group accuracy summaries plus, per grouping key, the macro average over its groups.

    The macro average weights every language (or subject) equally, so a large English set cannot hide
    a regression on a small Korean one.
    """
    keys = tuple(keys)
    groups = {
        name: accuracy_summary(members, n_samples, seed) for name, members in group_items(items, keys).items()
    }
    macro: dict[str, float | None] = {}
    for key in keys:
        accs = [g["accuracy"] for name, g in groups.items() if name.startswith(f"{key}=") and g["n"]]
        macro[key] = float(np.mean(accs)) if accs else None
    return {"groups": groups, "macro": macro}
