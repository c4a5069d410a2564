"""A sweep directory's advice: seed-aware tables per metric and the recommendation, and the same in words.

`medtune sweep` calls `sweep_advice` once its cells are done and stores the result in sweep.json under
`advice`; the terminal lines (`advice_lines`) and the sweep report render that record, so the report
computes nothing of its own. The statistics are `medtune.evaluate.advise`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.config import SweepConfig
from medtune.evaluate.advise import GroupScores, Metric, group_scores, recommend, summarise_groups
from medtune.evaluate.stats import GROUP_KEYS

METRIC_FILES: tuple[tuple[Metric, str], ...] = (("accuracy", "predictions.jsonl"), ("nll", "nll.jsonl"))


def read_items(path: Path) -> dict[str, dict[str, Any]]:
    """Per item id, a predictions.jsonl item or an nll.jsonl row."""
    from medtune.evaluate.compare import load_predictions
    from medtune.evaluate.nll import read_nll

    if path.name == "nll.jsonl":
        return {row["id"]: row for row in read_nll(path)}
    return load_predictions(path)


def sweep_advice(sweep_dir: Path, sweep: dict[str, Any], settings: SweepConfig) -> dict[str, Any]:
    """Seed-aware tables for every metric the base and all finished cells scored, and the recommendation
    when `settings.target` is set. A cell that did not finish is left out and listed."""
    cells = [c for c in sweep.get("cells", []) if c.get("status") in ("ok", "skipped")]
    base_eval = sweep_dir / "base" / "eval" / "base"
    out: dict[str, Any] = {
        "ratios": _ratio_info(cells),
        "left_out": [c["name"] for c in sweep.get("cells", []) if c not in cells],
        "metrics": {},
    }
    scores: dict[str, dict[str, GroupScores]] = {}
    for metric, file in METRIC_FILES:
        paths = [sweep_dir / c["dir"] / "eval" / "tuned" / file for c in cells]
        if not cells or not all(p.is_file() for p in [base_eval / file, *paths]):
            continue
        runs: dict[str, list[dict[str, dict]]] = {}
        for c, path in zip(cells, paths, strict=True):
            runs.setdefault(c["ratio_label"], []).append(read_items(path))
        scores[metric] = group_scores(read_items(base_eval / file), runs, metric, GROUP_KEYS)
        out["metrics"][metric] = summarise_groups(scores[metric], metric)
    out["recommendation"] = _recommendation(scores, settings)
    return out


def _ratio_info(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ratio label: the shares, the seeds that finished, and the English share (the chart's x axis)."""
    info: dict[str, dict[str, Any]] = {}
    for c in cells:
        ratio = c["ratio"]
        total = sum(ratio.values())
        entry = info.setdefault(
            c["ratio_label"],
            {"ratio": ratio, "english_share": ratio.get("en", 0.0) / total if total else None, "seeds": []},
        )
        entry["seeds"].append(c["seed"])
    return info


def _recommendation(
    scores: dict[str, dict[str, GroupScores]], settings: SweepConfig
) -> dict[str, Any] | None:
    if settings.target is None:
        return None
    if settings.metric not in scores:
        files = "nll.jsonl (eval.nll: true)" if settings.metric == "nll" else "predictions.jsonl"
        why = f"the base and every finished cell need {files}"
        return {
            "target": settings.target,
            "recommended": None,
            "message": f"no {settings.metric} scores: {why}",
        }
    try:
        return recommend(
            scores[settings.metric], settings.metric, settings.target, settings.protect, settings.margin
        )
    except KeyError as exc:
        return {"target": settings.target, "recommended": None, "message": str(exc.args[0])}


# ---------------------------------------------------------------- in words


def headline_groups(summary: dict[str, Any], recommendation: dict[str, Any] | None) -> list[str]:
    """The groups worth a line: all, each language, and the target and protected groups."""
    chosen = [g for g in summary["groups"] if g == "all" or g.startswith("language=")]
    if recommendation and recommendation.get("target"):
        chosen += [recommendation["target"], *recommendation.get("protect", [])]
    return [g for g in dict.fromkeys(chosen) if g in summary["groups"]]


def format_change(row: dict[str, Any], metric: str) -> str:
    """`+3.2 [-1.0, +7.4]` (pp) or `-0.050 [-0.090, -0.010]` (nats), with the seed note."""
    digits = 1 if metric == "accuracy" else 3
    lo, hi = row["ci95"]
    text = f"{row['delta_vs_base']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return text + (" seed-dominated" if row["seed_dominates"] else "")


def advice_lines(advice: dict[str, Any]) -> list[str]:
    """The sweep's seed-aware tables and recommendation as plain lines for the terminal."""
    lines = []
    seeds = {label: info["seeds"] for label, info in advice["ratios"].items()}
    one_seed = all(len(s) == 1 for s in seeds.values())
    for metric, summary in advice["metrics"].items():
        unit = "accuracy %, change in pp" if metric == "accuracy" else "NLL nats/token, lower is better"
        lines.append(f"\n{metric} ({unit}); change vs base with a 95% CI over items and seeds:")
        for group in headline_groups(summary, advice.get("recommendation")):
            g = summary["groups"][group]
            cells = [
                f"{label} ({len(seeds[label])} seed{'s' * (len(seeds[label]) > 1)}) {r['mean']:.3g}: "
                f"{format_change(r, metric)}"
                for label, r in g["ratios"].items()
            ]
            lines.append(f"  {group} (n={g['n']}, base {g['base']:.3g}): " + "; ".join(cells))
    if one_seed and advice["metrics"]:
        lines.append("  one seed per ratio: the intervals cover items only, not training-run variation")
    rec = advice.get("recommendation")
    if rec:
        lines.append(rec["message"])
        lines += [f"  excluded {label}: {'; '.join(why)}" for label, why in rec.get("excluded", {}).items()]
    return lines
