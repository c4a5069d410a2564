"""The tuned model against the base, paired per item: one home for how the two are judged.

`medtune eval` pairs the two models it has just scored (`eval/base`, `eval/tuned`); `medtune sweep`
pairs each cell's tuned model with the one base evaluation in `base/`. Both call these, so which
files are read, which bootstrap settings apply and where the verdict is written cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.config import RunConfig
from medtune.evaluate.compare import load_predictions, run_compare
from medtune.evaluate.guard import GUARD_FILE, evaluate_guard
from medtune.evaluate.nll import read_nll
from medtune.manifest import write_json_atomic


def compare_with_base(
    cfg: RunConfig,
    base_dir: Path,
    tuned_dir: Path,
    out_dir: Path,
    compare: Callable[..., dict[str, Any]] = run_compare,
) -> dict[str, Any]:
    """Accuracy of tuned vs base paired by item id: `out_dir/compare.json` (and .md); returns it."""
    return compare(
        base_dir / "predictions.jsonl",
        tuned_dir / "predictions.jsonl",
        None,
        out_dir,
        cfg.eval.bootstrap_samples,
        cfg.seed,
    )


def guard_vs_base(cfg: RunConfig, base_dir: Path, tuned_dir: Path, keys: list[str]) -> dict[str, Any]:
    """Judge the tuned model against the base by `eval.guard` from their files; write `guard.json` in
    the tuned model's eval dir (read by the report and by `medtune export`) and return the verdict.
    Held-out NLL rules are judged only where both models wrote `nll.jsonl`."""
    base_nll, tuned_nll = base_dir / "nll.jsonl", tuned_dir / "nll.jsonl"
    has_nll = base_nll.is_file() and tuned_nll.is_file()
    verdict = evaluate_guard(
        cfg.eval.guard,
        load_predictions(base_dir / "predictions.jsonl"),
        load_predictions(tuned_dir / "predictions.jsonl"),
        read_nll(base_nll) if has_nll else None,
        read_nll(tuned_nll) if has_nll else None,
        keys,
        cfg.eval.bootstrap_samples,
        cfg.seed,
    )
    write_json_atomic(tuned_dir.parent / GUARD_FILE, verdict)
    return verdict
