"""`medtune compare`: is model B really better than model A, per language, source, subject and tag?

Predictions are paired by item id, so both models are judged on exactly the same questions. Each
group gets the accuracy difference in percentage points, a paired bootstrap 95% interval, and an
exact McNemar p-value; a difference is called significant only when p < 0.05, and the report says
"not significant" in words otherwise. With a base model's predictions it also prints a forgetting
table: the groups where a model scores below the base, the paper's "what did fine-tuning cost us".

Those per-item tests judge two *runs*. With several training runs (seeds) of each model the question
is about the models, and another seed can land a few points away: `run_compare_seeds` gives each
group's mean difference with an interval over items and seeds (`medtune.evaluate.advise`, the
statistics the sweep uses), for accuracy and, where nll.jsonl lies beside the predictions, held-out
NLL, and says when seed variation dominates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from rich.console import Console
from rich.text import Text

from medtune.errors import RunDirError
from medtune.evaluate.advise import Metric, compare_runs, gain_sign, group_scores, summarise_groups
from medtune.evaluate.stats import (
    GROUP_KEYS,
    discordant_counts,
    group_names,
    mcnemar_exact,
    paired_bootstrap_ci,
)
from medtune.evaluate.sweep_advice import read_items
from medtune.report.compare_tables import (
    compare_markdown,
    compare_rich_table,
    seeds_markdown,
    seeds_rich_tables,
)

ALPHA = 0.05


def predictions_file(path: Path) -> Path:
    """`path` itself, or the predictions.jsonl of an eval dir (its own, else its `tuned/` model's)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "predictions.jsonl", path / "tuned" / "predictions.jsonl"):
            if candidate.is_file():
                return candidate
    return path


def load_predictions(path: Path) -> dict[str, dict]:
    """Items by id from a predictions.jsonl, or from an eval dir holding `tuned/` or `predictions.jsonl`."""
    path = predictions_file(path)
    if not path.is_file():
        raise RunDirError(f"{path}: no predictions.jsonl here; run `medtune eval` first")
    items: dict[str, dict] = {}
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDirError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if item["id"] in items:
                raise RunDirError(f"{path}:{line_no}: duplicate item id {item['id']!r}")
            items[item["id"]] = item
    return items


def paired_groups(a: dict[str, dict], b: dict[str, dict]) -> dict[str, list[tuple[bool, bool]]]:
    """(A correct, B correct) per group for items both sides scored; groups come from A's metadata."""
    groups: dict[str, list[tuple[bool, bool]]] = {}
    for item_id in sorted(a.keys() & b.keys()):
        ca, cb = a[item_id].get("correct"), b[item_id].get("correct")
        if ca is None or cb is None:
            continue
        for name in group_names(a[item_id], GROUP_KEYS):
            groups.setdefault(name, []).append((bool(ca), bool(cb)))
    return groups


def compare_pairs(pairs: list[tuple[bool, bool]], n_samples: int, seed: int) -> dict[str, Any]:
    """Accuracies, delta (pp), paired bootstrap CI (pp), McNemar p and a plain verdict for one group."""
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    n = len(pairs)
    acc_a, acc_b = sum(a) / n, sum(b) / n
    lo, hi = paired_bootstrap_ci(a, b, n_samples, seed)
    p = mcnemar_exact(a, b)
    only_a, only_b = discordant_counts(a, b)
    delta = 100 * (acc_b - acc_a)
    significant = p < ALPHA
    if not significant:
        verdict = f"not significant (p={p:.3g})"
    else:
        verdict = f"B {'better' if delta > 0 else 'worse'} by {abs(delta):.1f} pp (p={p:.3g})"
    return {
        "n": n,
        "acc_a": acc_a,
        "acc_b": acc_b,
        "delta_pp": delta,
        "ci95_pp": [100 * lo, 100 * hi],
        "only_a_correct": only_a,
        "only_b_correct": only_b,
        "mcnemar_p": p,
        "significant": significant,
        "verdict": verdict,
    }


def compare_predictions(
    a: dict[str, dict], b: dict[str, dict], n_samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Group-by-group paired comparison of B against A, plus counts of items only one side has."""
    groups = {name: compare_pairs(pairs, n_samples, seed) for name, pairs in paired_groups(a, b).items()}
    return {
        "groups": groups,
        "only_in_a": len(a.keys() - b.keys()),
        "only_in_b": len(b.keys() - a.keys()),
        "unscorable": sum(
            1 for k in a.keys() & b.keys() if a[k].get("correct") is None or b[k].get("correct") is None
        ),
    }


def forgetting_table(
    base: dict[str, dict], models: dict[str, dict[str, dict]], n_samples: int, seed: int
) -> list:
    """Rows (model, group, base acc, model acc, delta pp, p) where a model scores below the base."""
    rows = []
    for label, preds in models.items():
        for group, stats in compare_predictions(base, preds, n_samples, seed)["groups"].items():
            if stats["delta_pp"] < 0:
                rows.append(
                    {
                        "model": label,
                        "group": group,
                        "n": stats["n"],
                        "base_acc": stats["acc_a"],
                        "model_acc": stats["acc_b"],
                        "delta_pp": stats["delta_pp"],
                        "ci95_pp": stats["ci95_pp"],
                        "mcnemar_p": stats["mcnemar_p"],
                        "significant": stats["significant"],
                    }
                )
    return sorted(rows, key=lambda r: (r["model"], r["delta_pp"]))


def run_compare(
    pred_a: Path, pred_b: Path, base: Path | None, out_dir: Path, n_samples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Compare B against A (and both against `base` when given); write compare.md + compare.json."""
    a, b = load_predictions(pred_a), load_predictions(pred_b)
    if not a.keys() & b.keys():
        raise RunDirError(
            f"{pred_a} and {pred_b} share no item ids: they were not scored on the same eval set"
        )
    result = compare_predictions(a, b, n_samples, seed)
    result.update(
        {"a": str(pred_a), "b": str(pred_b), "alpha": ALPHA, "n_bootstrap": n_samples, "seed": seed}
    )
    if base is not None:
        result["base"] = str(base)
        result["forgetting"] = forgetting_table(load_predictions(base), {"A": a, "B": b}, n_samples, seed)
    write_compare(result, compare_markdown(result), out_dir)
    Console().print(compare_rich_table(result))
    return result


def write_compare(result: dict[str, Any], markdown: str, out_dir: Path) -> None:
    """compare.json (the record) and compare.md (its tables) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "compare.md").write_text(markdown, encoding="utf-8")


# ---------------------------------------------------------------- several runs (seeds) per side


def seed_verdict(row: dict[str, Any], metric: Metric) -> str:
    """`B better by 3.2 pp`, `B worse by 0.050 nats` (per token) or `not significant`, and whether seed
    variation dominates (then more seeds, not more items, would narrow the interval)."""
    text = "not significant"
    if row["significant"]:
        size = abs(row["estimate"])
        amount = f"{size:.1f} pp" if metric == "accuracy" else f"{size:.3f} nats"
        text = f"B {'better' if gain_sign(metric) * row['estimate'] > 0 else 'worse'} by {amount}"
    return text + ("; seed variation dominates" if row["seed_dominates"] else "")


def compare_seeds(
    a_runs: Sequence[dict[str, dict]], b_runs: Sequence[dict[str, dict]], metric: Metric
) -> dict[str, Any]:
    """Per group, B's runs against A's on the items every run scored: each side's mean, Δ = B − A with a
    95% interval over items and seeds (`advise.compare_runs`) and a verdict; and how many items some
    run did not score, which are left out of every run."""
    groups = compare_runs(a_runs, b_runs, metric, GROUP_KEYS)
    for row in groups.values():
        row["verdict"] = seed_verdict(row, metric)
    ids = set().union(*(run.keys() for run in [*a_runs, *b_runs]))
    return {"groups": groups, "left_out": len(ids) - (groups["all"]["n"] if "all" in groups else 0)}


def forgetting_over_seeds(
    base: dict[str, dict], runs: dict[str, Sequence[dict[str, dict]]], metric: Metric
) -> list[dict[str, Any]]:
    """Rows (model, group, base, model mean, Δ with its interval over items and seeds) where a model's
    runs score worse than the base on average, worst first."""
    summary = summarise_groups(group_scores(base, runs, metric, GROUP_KEYS), metric)
    sign = gain_sign(metric)
    rows = [
        {"model": label, "group": group, "n": g["n"], "base": g["base"], "model_mean": r["mean"]}
        | {"delta": r["delta_vs_base"], "ci95": r["ci95"], "significant": r["significant"]}
        | {"seed_dominates": r["seed_dominates"]}
        for group, g in summary["groups"].items()
        for label, r in g["ratios"].items()
        if sign * r["delta_vs_base"] < 0
    ]
    return sorted(rows, key=lambda r: (r["model"], sign * r["delta"]))


def run_files(path: Path) -> dict[Metric, Path]:
    """Per metric, the file a run's scores are in: its predictions, and the nll.jsonl beside them."""
    predictions = predictions_file(path)
    return {"accuracy": predictions, "nll": predictions.parent / "nll.jsonl"}


def run_compare_seeds(
    runs_a: Sequence[Path], runs_b: Sequence[Path], base: Path | None, out_dir: Path
) -> dict[str, Any]:
    """Compare B's runs (seeds) against A's per metric the runs scored (accuracy; held-out NLL where
    every run has nll.jsonl beside its predictions), and each against `base` when given; write
    compare.md + compare.json and print the tables."""
    files = {"A": [run_files(p) for p in runs_a], "B": [run_files(p) for p in runs_b]}
    base_files = run_files(base) if base is not None else None
    result: dict[str, Any] = {
        "a": [str(p) for p in runs_a],
        "b": [str(p) for p in runs_b],
        "seeds": [len(runs_a), len(runs_b)],
        "alpha": ALPHA,
        "metrics": {},
        "notes": [_one_run_note(side) for side, runs in (("A", runs_a), ("B", runs_b)) if len(runs) == 1],
    }
    if base is not None:
        result["base"] = str(base)
    for metric in get_args(Metric):
        paths = [f[metric] for side in files.values() for f in side]
        absent = [p for p in paths if not p.is_file()]
        if metric == "nll" and absent:
            result["notes"].append(f"no held-out NLL: {absent[0]} is missing (`eval.nll: true` writes it)")
            continue
        a = [read_items(f[metric]) for f in files["A"]]
        b = [read_items(f[metric]) for f in files["B"]]
        record = compare_seeds(a, b, metric)
        if not record["groups"]:
            raise RunDirError(f"{', '.join(map(str, paths))}: fewer than two items scored by every run")
        if base_files is not None:
            if base_files[metric].is_file():
                record["forgetting"] = forgetting_over_seeds(
                    read_items(base_files[metric]), {"A": a, "B": b}, metric
                )
            else:
                result["notes"].append(f"no {metric} forgetting table: {base_files[metric]} is missing")
        result["metrics"][metric] = record
    write_compare(result, seeds_markdown(result), out_dir)
    console = Console()
    for table in seeds_rich_tables(result):
        console.print(table)
    for note in result["notes"]:
        console.print(Text(note))  # paths are data, not markup
    return result


def _one_run_note(side: str) -> str:
    return (
        f"{side} has one run: its seed variation counts as 0, right for an untrained base model; for a "
        "trained model, run two or more seeds or the interval is too narrow"
    )
