"""`medtune eval`: score the base and the fine-tuned model on the prepared eval set.

    eval/base/predictions.jsonl   eval/tuned/predictions.jsonl   (one line per item, streamed)
    eval/metrics.json             per group: accuracy, Wilson and bootstrap 95% CIs, n, unscorable
    eval/results.md               the same as tables
    eval/compare.json + .md       tuned vs base, paired per item (when both were scored)
    eval/{base,tuned}/nll.jsonl   with `eval.nll`: held-out NLL per eval record (MCQA and instruction);
                                  metrics.json gains per-group NLL and tuned - base with paired CIs
    eval/guard.json               with `eval.guard` and both models: the forgetting guard's verdict

Both models read the prompts `medtune.format` renders for training, so the eval measures the
decision the model was trained on, not a second template.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from medtune.config import RunConfig
from medtune.data.schema import Record
from medtune.errors import RunDirError
from medtune.evaluate.guard import GUARD_FILE, guard_lines
from medtune.evaluate.nll import compare_nll, nll_table, read_nll, score_nll, write_nll
from medtune.evaluate.prompts import build_items
from medtune.evaluate.score import score_items
from medtune.evaluate.stats import accuracy_table
from medtune.evaluate.versus_base import compare_with_base, guard_vs_base
from medtune.manifest import write_json_atomic
from medtune.progress import progress_bar
from medtune.report.tables import nll_rich_table, results_markdown, results_rich_table


def load_eval_records(
    prepare_dir: Path, max_items: int | None
) -> tuple[list[Record], list[Record], dict[str, int]]:
    """Eval records, at most `max_items` per source in file order, read once: (the MCQA ones to score,
    all of them -- MCQA and instruction alike, the held-out text for `eval.nll` --, what was left out)."""
    from medtune.data.prepare import read_prepared

    capped: list[Record] = []
    per_source: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for record in read_prepared(prepare_dir, "eval"):
        if max_items is not None and per_source[record["source"]] >= max_items:
            skipped["over_max_items"] += 1
        else:
            per_source[record["source"]] += 1
            capped.append(record)
    mcqa = [r for r in capped if r["kind"] == "mcqa"]
    if len(mcqa) < len(capped):
        skipped["not_mcqa"] += len(capped) - len(mcqa)
    if not mcqa:
        raise RunDirError(f"{prepare_dir}/eval.jsonl: no multiple-choice eval items; add data.eval sources")
    return mcqa, capped, dict(skipped)


def load_fewshot_pool(cfg: RunConfig, prepare_dir: Path) -> list[Record]:
    """Few-shot examples from the prepared train split (never eval), or nothing at k_shot = 0."""
    from medtune.data.prepare import read_prepared

    if cfg.eval.k_shot == 0:
        return []
    return [r for r in read_prepared(prepare_dir, cfg.eval.fewshot_split) if r["kind"] == "mcqa"]


def group_keys(cfg: RunConfig) -> list[str]:
    return [*cfg.eval.group_by, *(["tag"] if cfg.eval.group_by_tags else [])]


def _steps(advance: Callable[[], None]) -> Callable[[int], None]:
    """A progress callback taking a count, from a bar's one-step `advance`."""

    def advance_by(n: int) -> None:
        for _ in range(n):
            advance()

    return advance_by


def score_model(
    cfg: RunConfig,
    records: list[Record],
    pool: list[Record],
    adapter_dir: Path | None,
    out_dir: Path,
    label: str,
    nll_records: list[Record] | None = None,
) -> dict[str, Any]:
    """Load one model, score every record into out_dir/predictions.jsonl, return its accuracy table.

    With `nll_records`, the same loaded model also scores their held-out NLL into out_dir/nll.jsonl.
    """
    from medtune.model.load import load_model_for_inference

    model, tokenizer = load_model_for_inference(cfg, adapter_dir)
    items = build_items(records, tokenizer, cfg.format, cfg.eval.k_shot, pool, cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    with progress_bar(f"eval {label} ({cfg.eval.mode})", total=len(items)) as advance:
        results = score_items(
            model,
            tokenizer,
            items,
            cfg.eval.mode,
            cfg.eval.batch_size,
            out_dir / "predictions.jsonl",
            cfg.eval.max_new_tokens,
            progress=_steps(advance),
        )
    if nll_records is not None:
        with progress_bar(f"held-out NLL {label}", total=len(nll_records)) as advance:
            rows = score_nll(
                model, tokenizer, nll_records, cfg.format, cfg.packing, _steps(advance), cfg.eval.nll_scope
            )
        write_nll(rows, out_dir / "nll.jsonl")
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return accuracy_table(results, group_keys(cfg), cfg.eval.bootstrap_samples, cfg.seed)


def run_eval(cfg: RunConfig, prepare_dir: Path, train_dir: Path | None, out_dir: Path) -> dict[str, Any]:
    """Score base (if `eval.eval_base` or no adapter) and tuned models; write metrics, results, compare."""
    out_dir = Path(out_dir)
    records, capped, skipped = load_eval_records(Path(prepare_dir), cfg.eval.max_items)
    pool = load_fewshot_pool(cfg, Path(prepare_dir))
    adapter = None
    if train_dir is not None:
        adapter = Path(train_dir) / "adapter"
        if not (adapter / "adapter_config.json").is_file():
            raise RunDirError(
                f"{adapter}: no trained adapter here; run `medtune train` first (or use --base-only)"
            )
    nll_records = capped if cfg.eval.nll else None
    metrics: dict[str, Any] = {
        "mode": cfg.eval.mode,
        "k_shot": cfg.eval.k_shot,
        "n_items": len(records),
        "skipped": skipped,
        "models": {},
    }
    labels = (["base"] if cfg.eval.eval_base or adapter is None else []) + (["tuned"] if adapter else [])
    for label in labels:
        model_adapter = adapter if label == "tuned" else None
        metrics["models"][label] = score_model(
            cfg, records, pool, model_adapter, out_dir / label, label, nll_records
        )
    if len(labels) == 2:
        compared = compare_with_base(cfg, out_dir / "base", out_dir / "tuned", out_dir)
        metrics["compare"] = {
            g: {k: v[k] for k in ("delta_pp", "ci95_pp", "mcnemar_p", "significant")}
            for g, v in compared["groups"].items()
        }
    if nll_records is not None:
        metrics["nll"] = _nll_metrics(cfg, out_dir, labels)
    if cfg.eval.guard and len(labels) == 2:
        metrics["guard"] = record_guard(cfg, out_dir)
    else:
        (out_dir / GUARD_FILE).unlink(missing_ok=True)  # an earlier eval's verdict would be stale
    write_json_atomic(out_dir / "metrics.json", metrics)
    (out_dir / "results.md").write_text(results_markdown(metrics), encoding="utf-8")
    console = Console()
    for label, table in metrics["models"].items():
        console.print(results_rich_table(label, table))
    if "nll" in metrics:
        console.print(nll_rich_table(metrics["nll"]))
    if "guard" in metrics:
        style = "green" if metrics["guard"]["passed"] else "bold red"
        for i, line in enumerate(guard_lines(metrics["guard"])):
            console.print(line, style=style if i == 0 else None, markup=False, highlight=False)
    return {label: t["groups"]["all"] for label, t in metrics["models"].items()} | {"n_items": len(records)}


def record_guard(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Judge the tuned model against the base by `eval.guard` from the files just written; write
    eval/guard.json (read by the report and by `medtune export`) and return the verdict."""
    return guard_vs_base(cfg, out_dir / "base", out_dir / "tuned", group_keys(cfg))


def _nll_metrics(cfg: RunConfig, out_dir: Path, labels: list[str]) -> dict[str, Any]:
    """Per model the per-group held-out NLL table; with both models, tuned - base paired per item."""
    keys, n, seed = group_keys(cfg), cfg.eval.bootstrap_samples, cfg.seed
    rows = {label: read_nll(out_dir / label / "nll.jsonl") for label in labels}
    out: dict[str, Any] = {label: nll_table(r, keys, n, seed) for label, r in rows.items()}
    if len(labels) == 2:
        out["tuned_vs_base"] = compare_nll(rows["base"], rows["tuned"], keys, n, seed)
    return out
