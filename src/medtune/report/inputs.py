"""What the report reads: stage outputs as written, in the shapes older and newer runs use.

A file an older run lacks reads as None or an empty list, never as made-up numbers, so each section
can say what is missing instead of filling it in.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SIGNIFICANCE_LEVEL = 0.05


def read_json(path: Path) -> Any | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


CONFIG_STAGES = ("eval", "train", "prepare")
"""Where a run's resolved config is read from, latest stage first (every stage records the same one)."""


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config from the latest stage manifest that has one (eval, then train, then prepare)."""
    return config_from({stage: read_json(run_dir / stage / "run.json") for stage in CONFIG_STAGES})


def config_from(manifests: Mapping[str, dict[str, Any] | None]) -> dict[str, Any] | None:
    """`run_config` from stage manifests already read (`{stage: run.json or None}`)."""
    for stage in CONFIG_STAGES:
        manifest = manifests.get(stage)
        if manifest and manifest.get("config"):
            return manifest["config"]
    return None


def reported_config_hash(run_dir: Path) -> str | None:
    """The config hash of what a report reads: the sweep's, or the latest finished stage's."""
    for name in ("sweep.json", "eval/run.json", "train/run.json", "prepare/run.json"):
        found = read_json(run_dir / name)
        if found and found.get("config_hash"):
            return found["config_hash"]
    return None


def model_groups(metrics: dict[str, Any] | None) -> dict[str, dict[str, dict[str, Any]]]:
    """`eval/metrics.json` as {model: {group: summary}}, accepting `{base: {groups: ...}}` or bare groups."""
    if not metrics:
        return {}
    models = metrics.get("models", metrics)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name, table in models.items():
        groups = table.get("groups", table) if isinstance(table, dict) else None
        if isinstance(groups, list):
            groups = {g.get("group") or g.get("name"): g for g in groups if isinstance(g, dict)}
        if isinstance(groups, dict):
            clean = {g: s for g, s in groups.items() if isinstance(s, dict) and "accuracy" in s}
            if clean:
                out[name] = clean
    return out


def delta_rows(compare: dict[str, Any] | None) -> list[dict[str, Any]]:
    """`eval/compare.json` per group as {group, delta_pp, ci_pp, p, significant}; absent fields stay None."""
    if not compare:
        return []
    groups = compare.get("groups", compare.get("rows", {}))
    if isinstance(groups, list):
        groups = {g.get("group") or g.get("name"): g for g in groups if isinstance(g, dict)}
    return [_delta_row(name, g) for name, g in groups.items() if isinstance(g, dict)]


def _delta_row(name: str, g: dict[str, Any]) -> dict[str, Any]:
    """One group of compare.json, whichever of the field spellings (pp or fraction) it used."""
    delta = first(g, "delta_pp")
    if delta is None and first(g, "delta") is not None:
        delta = 100 * g["delta"]
    ci = first(g, "ci95_pp", "ci_pp", "delta_ci_pp", "paired_bootstrap_95_pp", "bootstrap_95_pp")
    if ci is None:
        frac = first(g, "paired_bootstrap_95", "ci_95", "bootstrap_95", "ci")
        ci = [100 * frac[0], 100 * frac[1]] if frac else None
    p = first(g, "mcnemar_p", "p_value", "p")
    significant = first(g, "significant")
    if significant is None and p is not None:
        significant = p < SIGNIFICANCE_LEVEL
    return {
        "group": name,
        "delta_pp": delta,
        "ci_pp": ci,
        "p": p,
        "significant": significant,
        "n": first(g, "n", "n_paired"),
    }


def first(d: dict[str, Any], *keys: str) -> Any:
    """The value of the first of `keys` that `d` has and is not None."""
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def interval(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    ci = first(summary, "wilson_95", "wilson_ci", "ci_95")
    return (ci[0], ci[1]) if ci else (None, None)
