"""Seed-aware intervals for a ratio sweep, and the ratio `medtune sweep --target` recommends.

A sweep cell is one training run, so two cells of the same ratio differ by the seed alone (data order,
LoRA init, the mixer's sample). An interval over eval items only says how sure we are *of this run*;
the question a user asks is about the ratio. Every interval here therefore covers both sources.

The design is crossed, not nested: every seed of every ratio, and the base, score the same items. A
model's per-item score is then effect + item difficulty + run offset (the seed) + run-by-item noise,
and the variance of a contrast between models (a cell's mean minus the base's, or one ratio's minus
another's) splits into
- a seed part, sigma_seed^2 / S per ratio, from the two-way mean squares (MS_seed - MS_residual) / (S
  items), so the per-item noise already counted below is not counted again: a two-level bootstrap
  (seeds, then items) counts it at both levels and is conservative by up to twice the variance here;
- an item part, the variance over items of the per-item contrast (item difficulty cancels, as in
  `stats.paired_bootstrap_ci`) divided by the item count.
The interval does not add those two estimates as they stand: with two or three seeds the seed part
often comes out at 0 by chance (MS_seed below MS_residual), its few degrees of freedom then drop out
of the Welch-Satterthwaite sum, and t falls to ~1.96 exactly when the data cannot tell seed variation
from none (equal ratios were called different 7-10% of the time at a nominal 5%). It uses instead
- the variance of each model's run means, MS_seed / (S items), never truncated, with S - 1 degrees of
  freedom: seed variation plus the run-by-item noise of that model's mean (a Welch test on run means);
- plus what the item part holds beyond that run-by-item noise (item-by-model interaction: which items
  suit which model), max(0, item part - MS_residual / (S items) per model), with items - 1 degrees.
Both are unbiased, so their sum is the contrast's variance; the t quantile comes from their
Welch-Satterthwaite degrees of freedom: t(2) = 4.3 for two seeds a side when run means dominate, as a
t-test on run means would use. A single-seed model adds nothing to the first term and all its noise
stays in the item part. tests/test_advise.py simulates equal ratios at 2 and 3 seeds.

The same split says when seed variation dominates and how many items or seeds would resolve a
difference (80% power at alpha = 0.05). This is numpy on per-item scores, torch-free;
`medtune.evaluate.sweep_advice` feeds it a sweep directory's files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import norm
from scipy.stats import t as student_t

from medtune.evaluate.stats import GROUP_KEYS, group_names

ALPHA = 0.05
POWER = 0.8

Metric = Literal["accuracy", "nll"]
"""accuracy: percent, higher is better; nll: held-out nats per token, lower is better."""


@dataclass(frozen=True)
class VarianceParts:
    """Variance of a contrast's estimate due to seeds and due to items (for the seed share and sizing),
    and the variance and degrees of freedom its interval uses.

    `seed_var` is 0 with `seeds_known` False when every model has one seed: one run cannot show how
    far another seed would land.
    """

    seed_var: float
    item_var: float
    seeds_known: bool
    interval_var: float
    """The estimate's variance the interval uses (run means + item-by-model part; module docstring)."""
    interval_df: float

    @property
    def seed_share(self) -> float | None:
        total = self.seed_var + self.item_var
        return self.seed_var / total if self.seeds_known and total > 0 else None


def mean_squares(m: np.ndarray) -> tuple[float, float]:
    """MS_seed and MS_residual of one seeds x items matrix (two-way layout without replication)."""
    s, n = m.shape
    rows, cols = m.mean(axis=1, keepdims=True), m.mean(axis=0, keepdims=True)
    ms_seed = n * float(np.var(rows, ddof=1))
    residual = m - rows - cols + m.mean()
    ms_res = float((residual**2).sum()) / ((s - 1) * (n - 1)) if n > 1 else 0.0
    return ms_seed, ms_res


def _satterthwaite(terms: Sequence[tuple[float, float]]) -> float:
    """Degrees of freedom of a sum of independent variance estimates (value, df); inf when it is 0."""
    terms = [(v, d) for v, d in terms if v > 0]
    if not terms:
        return math.inf
    return sum(v for v, _ in terms) ** 2 / sum(v * v / d for v, d in terms)


def variance_parts(matrices: Sequence[np.ndarray], weights: Sequence[float]) -> VarianceParts:
    """Seed and item parts of Var(sum_k w_k mean(M_k)); each M_k is seeds x items, items shared."""
    pairs = zip(weights, matrices, strict=True)
    seeded = [(w * w, len(m) - 1, m.size, *mean_squares(m)) for w, m in pairs if len(m) > 1]
    # sigma_seed^2 / S per model: (MS_seed - MS_residual) / (S * items), at least 0
    seed_var = sum(w2 * max(0.0, ms_seed - ms_res) / size for w2, _, size, ms_seed, ms_res in seeded)
    run_terms = [(w2 * ms_seed / size, df) for w2, df, size, ms_seed, _ in seeded]
    per_item = sum(w * m.mean(axis=0) for w, m in zip(weights, matrices, strict=True))
    n_items = per_item.shape[0]
    item_var = float(np.var(per_item, ddof=1) / n_items) if n_items > 1 else 0.0
    run_noise = sum(w2 * ms_res / size for w2, _, size, _, ms_res in seeded)
    interaction = (max(0.0, item_var - run_noise), n_items - 1)
    interval_var = float(sum(v for v, _ in run_terms) + interaction[0])
    interval_df = _satterthwaite([*run_terms, interaction])
    return VarianceParts(float(seed_var), item_var, bool(seeded), interval_var, interval_df)


def contrast(
    matrices: Sequence[np.ndarray], weights: Sequence[float], alpha: float = ALPHA
) -> dict[str, Any]:
    """Estimate of sum_k w_k mean(M_k), its interval covering seeds and items, and the variance split."""
    estimate = float(sum(w * m.mean() for w, m in zip(weights, matrices, strict=True)))
    parts = variance_parts(matrices, weights)
    half = float(student_t.ppf(1 - alpha / 2, parts.interval_df)) * math.sqrt(parts.interval_var)
    share = parts.seed_share
    return {
        "estimate": estimate,
        "ci95": [estimate - half, estimate + half],
        "df": parts.interval_df,
        "significant": bool(half < abs(estimate)),
        "seed_share": share,
        "seed_dominates": share is not None and share > 0.5,
        "parts": parts,
    }


def size_needed(effect: float, parts: VarianceParts, n_items: int, n_seeds: int) -> dict[str, Any]:
    """Items (at the present seeds) or seeds per ratio (at the present items) that would resolve `effect`
    with 80% power at alpha = 0.05, scaling each variance part by its own count. None where that
    lever alone cannot get there (the other part is already too large) or cannot be judged.

    The sizing uses normal quantiles; with two or three seeds the interval's t quantile is larger, so
    these are the least that could do, not a guarantee.
    """
    if effect == 0:
        return {"effect": 0.0, "items": None, "seeds": None}
    target = (abs(effect) / (norm.ppf(1 - ALPHA / 2) + norm.ppf(POWER))) ** 2
    items = seeds = None
    if parts.seed_var < target and parts.item_var > 0:
        items = math.ceil(n_items * parts.item_var / (target - parts.seed_var))
    if parts.seeds_known and parts.seed_var > 0 and parts.item_var < target:
        seeds = max(2, math.ceil(n_seeds * parts.seed_var / (target - parts.item_var)))
    return {"effect": abs(effect), "items": items, "seeds": seeds}


# ---------------------------------------------------------------- scores per group, ratio and seed


def item_scores(items: Mapping[str, dict[str, Any]], metric: Metric) -> dict[str, float]:
    """Per item id the score of one model: accuracy in percent (0/100) or NLL per token; unscorable
    items (no usable gold, no target token) are left out."""
    out = {}
    for item_id, item in items.items():
        if metric == "accuracy":
            if item.get("correct") is not None:
                out[item_id] = 100.0 if item["correct"] else 0.0
        elif item.get("tokens"):
            out[item_id] = item["nll"] / item["tokens"]
    return out


@dataclass(frozen=True)
class GroupScores:
    """One group's scores on the items every model scored: the base vector and seeds x items per ratio."""

    base: np.ndarray
    ratios: dict[str, np.ndarray]


def group_scores(
    base: Mapping[str, dict[str, Any]],
    runs: Mapping[str, Sequence[Mapping[str, dict[str, Any]]]],
    metric: Metric,
    keys: Sequence[str],
) -> dict[str, GroupScores]:
    """Align the base and every ratio's runs (one per seed) on the items all of them scored, per group.

    `base` and each run map item id -> prediction or NLL row (with the grouping fields). A group with
    fewer than two common items is left out: one item has no variance to judge a difference by.
    """
    scored = item_scores(base, metric)
    per_run = {label: [item_scores(r, metric) for r in seeds] for label, seeds in runs.items()}
    common = [i for i in scored if all(i in s for seeds in per_run.values() for s in seeds)]
    members: dict[str, list[str]] = {}
    for item_id in common:
        for name in group_names(base[item_id], keys):
            members.setdefault(name, []).append(item_id)
    return {
        name: GroupScores(
            np.array([scored[i] for i in ids]),
            {label: np.array([[s[i] for i in ids] for s in seeds]) for label, seeds in per_run.items()},
        )
        for name, ids in members.items()
        if len(ids) > 1
    }


def gain_sign(metric: Metric) -> float:
    """+1 where a higher score is better (accuracy), -1 where lower is (NLL)."""
    return -1.0 if metric == "nll" else 1.0


def summarise_groups(groups: Mapping[str, GroupScores], metric: Metric) -> dict[str, Any]:
    """Per group and ratio: mean score over seeds and items, and score - base with its seed-aware CI."""
    out: dict[str, Any] = {}
    for name, g in groups.items():
        base = g.base[None, :]
        rows = {}
        for label, m in g.ratios.items():
            c = contrast([m, base], [1.0, -1.0])
            rows[label] = {
                "mean": float(m.mean()),
                "seed_means": [float(x) for x in m.mean(axis=1)],
                "delta_vs_base": c["estimate"],
                "ci95": c["ci95"],
                "significant": c["significant"],
                "seed_share": c["seed_share"],
                "seed_dominates": c["seed_dominates"],
            }
        out[name] = {"n": int(g.base.shape[0]), "base": float(g.base.mean()), "ratios": rows}
    return {"metric": metric, "higher_is_better": metric != "nll", "groups": out}


def compare_runs(
    a_runs: Sequence[Mapping[str, dict[str, Any]]],
    b_runs: Sequence[Mapping[str, dict[str, Any]]],
    metric: Metric = "accuracy",
    keys: Sequence[str] = GROUP_KEYS,
) -> dict[str, dict[str, Any]]:
    """`compare` across runs: B's seeds against A's seeds, per group, on the items all runs scored.

    Each run maps item id -> prediction (or NLL row); the interval covers items and both sides' seeds.
    Each run's own mean is listed too: the spread behind the interval, in the metric's units.
    """
    groups = group_scores(a_runs[0], {"A": a_runs, "B": b_runs}, metric, keys)
    out = {}
    for name, g in groups.items():
        a, b = g.ratios["A"], g.ratios["B"]
        c = contrast([b, a], [1.0, -1.0])
        out[name] = {
            "n": int(g.base.shape[0]),
            "a": float(a.mean()),
            "b": float(b.mean()),
            "a_seed_means": [float(x) for x in a.mean(axis=1)],
            "b_seed_means": [float(x) for x in b.mean(axis=1)],
            "seeds": [len(a_runs), len(b_runs)],
        } | {k: c[k] for k in ("estimate", "ci95", "significant", "seed_share", "seed_dominates")}
    return out


# ---------------------------------------------------------------- recommendation


def recommend(
    groups: Mapping[str, GroupScores],
    metric: Metric,
    target: str,
    protect: Sequence[str] = (),
    margin: float = 0.0,
) -> dict[str, Any]:
    """The ratio best on `target` among those not significantly worse than the base beyond `margin` on
    any `protect` group; None with the reason when the data cannot single one out.

    A ratio is excluded when the whole 95% interval of its change against the base on a protected group
    lies beyond -margin (pp of accuracy, or +margin nats/token of NLL). The best remaining ratio is
    recommended only if it beats every other remaining ratio with an interval excluding 0; otherwise
    the ratios it cannot be told from are listed with the items or seeds that would separate them.
    """
    missing = [g for g in (target, *protect) if g not in groups]
    if missing:
        raise KeyError(
            f"fewer than two scored items in group(s) {', '.join(missing)}; groups: {', '.join(groups)}"
        )
    sign = gain_sign(metric)
    labels = list(groups[target].ratios)
    excluded = _harmful(groups, labels, protect, margin, sign)
    admissible = [lab for lab in labels if lab not in excluded]
    target_g = groups[target]
    gains = {lab: sign * float(target_g.ratios[lab].mean() - target_g.base.mean()) for lab in labels}
    record: dict[str, Any] = {
        "metric": metric,
        "target": target,
        "protect": list(protect),
        "margin": margin,
        "gain_vs_base": gains,
        "excluded": excluded,
        "admissible": admissible,
        "best": None,
        "recommended": None,
        "tied_with_best": [],
        "versus_best": {},
        "needed": None,
    }
    if not admissible:
        record["message"] = "every ratio harms a protected group beyond the margin: none is recommended"
        return record
    best = max(admissible, key=lambda lab: gains[lab])
    record["best"] = best
    record["versus_best"] = _versus_best(target_g, best, admissible, sign)
    record["tied_with_best"] = [lab for lab, c in record["versus_best"].items() if not c["significant"]]
    if record["tied_with_best"]:
        runner_up = max(record["tied_with_best"], key=lambda lab: gains[lab])
        record["needed"] = _needed(target_g, best, runner_up)
        record["message"] = _undecided_message(record, target_g)
    else:
        record["recommended"] = best
        record["message"] = (
            f"recommended: {best} (best on {target} among ratios that spare the protected groups)"
        )
    return record


def _versus_best(g: GroupScores, best: str, labels: Sequence[str], sign: float) -> dict[str, dict[str, Any]]:
    """The best ratio against each other admissible one on the target group (gain-oriented contrast)."""
    out = {}
    for other in (lab for lab in labels if lab != best):
        c = contrast([g.ratios[best], g.ratios[other]], [sign, -sign])
        out[other] = {k: c[k] for k in ("estimate", "ci95", "significant", "seed_share")}
    return out


def _harmful(
    groups: Mapping[str, GroupScores],
    labels: list[str],
    protect: Sequence[str],
    margin: float,
    sign: float,
) -> dict[str, list[str]]:
    """Per ratio, the protected groups it significantly harms beyond the margin (with the figures)."""
    excluded: dict[str, list[str]] = {}
    for group in protect:
        g = groups[group]
        for label in labels:
            c = contrast([g.ratios[label], g.base[None, :]], [sign, -sign])
            if c["ci95"][1] < -margin:  # in natural units (NLL: up is worse) for the message
                lo, hi = sorted(sign * x for x in c["ci95"])
                change = f"{sign * c['estimate']:+.3g} [{lo:+.3g}, {hi:+.3g}]"
                excluded.setdefault(label, []).append(f"{group}: change vs base {change}")
    return excluded


def _needed(g: GroupScores, best: str, runner_up: str) -> dict[str, Any]:
    a, b = g.ratios[best], g.ratios[runner_up]
    parts = variance_parts([a, b], [1.0, -1.0])
    needed = size_needed(float(a.mean() - b.mean()), parts, a.shape[1], min(a.shape[0], b.shape[0]))
    return needed | {"between": [best, runner_up], "items_now": int(a.shape[1]), "seeds_now": int(a.shape[0])}


def _undecided_message(record: dict[str, Any], g: GroupScores) -> str:
    tied = [record["best"], *record["tied_with_best"]]
    needed = record["needed"]
    levers = []
    if needed["items"]:
        levers.append(f"about {needed['items']} items in {record['target']} (now {needed['items_now']})")
    if needed["seeds"]:
        levers.append(f"about {needed['seeds']} seeds per ratio (now {needed['seeds_now']})")
    if not levers:
        how = "no realistic item or seed count would resolve the observed difference"
    else:
        how = " or ".join(levers) + f" to resolve the observed {needed['effect']:.3g}"
    seeds = {m.shape[0] for m in g.ratios.values()}
    note = " (one seed per ratio: seed variation is not measured; run at least two)" if seeds == {1} else ""
    return (
        f"the data cannot tell these ratios apart at this size ({', '.join(tied)}): run more items or "
        f"seeds; {how}{note}"
    )
