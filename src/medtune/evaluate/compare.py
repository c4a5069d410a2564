"""`medtune compare`: is model B really better than model A, per language, source, subject and tag?

Predictions are paired by item id, so both models are judged on exactly the same questions. Each
group gets the accuracy difference in percentage points, a paired bootstrap 95% interval, and an
exact McNemar p-value; a difference is called significant only when p < 0.05, and the report says
"not significant" in words otherwise. With a base model's predictions it also prints a forgetting
table: the groups where a model scores below the base, the paper's "what did fine-tuning cost us".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from medtune.errors import RunDirError
from medtune.evaluate.stats import (
    GROUP_KEYS,
    discordant_counts,
    group_names,
    mcnemar_exact,
    paired_bootstrap_ci,
)
from medtune.report.compare_tables import compare_markdown, compare_rich_table

ALPHA = 0.05


def load_predictions(path: Path) -> dict[str, dict]:
    """Items by id from a predictions.jsonl, or from an eval dir holding `tuned/` or `predictions.jsonl`."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "predictions.jsonl", path / "tuned" / "predictions.jsonl"):
            if candidate.is_file():
                path = candidate
                break
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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(
        json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "compare.md").write_text(compare_markdown(result), encoding="utf-8")
    Console().print(compare_rich_table(result))
    return result
