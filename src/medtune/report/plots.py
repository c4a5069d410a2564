"""The report's charts: accuracy with confidence intervals, training loss, efficiency ratios.

Each function takes plain numbers and writes one PNG, so the report builder decides what to plot
and these only decide how. The Agg backend is forced: reports are built on headless machines and
inside test runs, where an interactive backend would need a display or hang.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# PNG metadata carries the matplotlib version and a timestamp by default; dropping it makes the
# same inputs give the same bytes (principle 9).
_PNG_META = {"Software": None}


class Bar(NamedTuple):
    """One accuracy bar: the group it belongs to, the accuracy and its 95% interval (fractions)."""

    group: str
    accuracy: float
    low: float | None
    high: float | None


def accuracy_chart(series: Mapping[str, Sequence[Bar]], path: Path, title: str) -> Path:
    """Grouped bars (one group per language/subject, one bar per model or sweep cell) with CI whiskers.

    A bar without an interval is drawn without a whisker rather than with a made-up one.
    """
    groups = list(dict.fromkeys(bar.group for bars in series.values() for bar in bars))
    n_series = max(len(series), 1)
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(groups) * (0.45 + 0.18 * n_series)), 3.8))
    for i, (label, bars) in enumerate(series.items()):
        by_group = {bar.group: bar for bar in bars}
        xs, ys, errs = [], [], [[], []]
        for j, group in enumerate(groups):
            bar = by_group.get(group)
            if bar is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(100 * bar.accuracy)
            errs[0].append(100 * (bar.accuracy - bar.low) if bar.low is not None else 0.0)
            errs[1].append(100 * (bar.high - bar.accuracy) if bar.high is not None else 0.0)
        ax.bar(xs, ys, width=width * 0.95, label=label, yerr=errs, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(
        range(len(groups)),
        groups,
        rotation=20 if len(groups) > 4 else 0,
        ha="right" if len(groups) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel("accuracy (%), 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # Outside the axes: inside, the legend hides the whiskers of bars near 60-100%.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def loss_chart(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: Path, title: str) -> Path:
    """Training loss against optimizer step, one line per run or sweep cell."""
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    for label, (steps, losses) in curves.items():
        ax.plot(steps, losses, label=label, linewidth=1.2, marker="." if len(steps) < 40 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.25 on short runs
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def efficiency_chart(
    names: Sequence[str], ratios: Mapping[str, Sequence[float | None]], path: Path, baseline: str
) -> Path:
    """Horizontal bars of each bench cell's metric as a ratio to the baseline cell (1.0 = same).

    Ratios rather than absolute numbers: CPU timings on a shared machine only mean something
    relative to a baseline measured in the same run.
    """
    metrics = list(ratios)
    height = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(names) * max(len(metrics), 1) / 1.5))
    for i, metric in enumerate(metrics):
        ys = [j - 0.4 + height * (i + 0.5) for j in range(len(names))]
        values = [v if v is not None else 0.0 for v in ratios[metric]]
        ax.barh(ys, values, height=height * 0.95, label=metric)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio to baseline ({baseline})")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


class SharePoint(NamedTuple):
    """One ratio on a score-vs-mix chart: its English share, the change vs base and its 95% interval."""

    share: float
    change: float
    low: float
    high: float


def share_chart(series: Mapping[str, Sequence[SharePoint]], path: Path, title: str, ylabel: str) -> Path:
    """Each group's change against the base as the English share of the training mix grows, with CIs.

    The base model sits at 0: a point whose whisker crosses 0 is not distinguishable from it.
    """
    fig, ax = plt.subplots(figsize=(7.0, 3.8))
    for label, points in series.items():
        points = sorted(points)
        xs = [100 * p.share for p in points]
        ys = [p.change for p in points]
        errs = [[p.change - p.low for p in points], [p.high - p.change for p in points]]
        ax.errorbar(xs, ys, yerr=errs, label=label, marker="o", capsize=3, linewidth=1.2)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("English share of the training mix (%)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110, metadata=_PNG_META)
    plt.close(fig)
    return path
