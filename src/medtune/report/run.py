"""The sections of a single run's report: guard verdict, config, data, accuracy, tuned vs base, training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.report.inputs import delta_rows, model_groups, read_json, read_jsonl, run_config
from medtune.report.page import Doc, Table, fmt_share, fmt_value
from medtune.report.sections import accuracy_tables, config_section, delta_table, training_section
from medtune.report.tables import nll_rows

RUN_FILES = [
    "prepare/manifest.json",
    "train/metrics.jsonl",
    "eval/metrics.json",
    "eval/compare.json",
    "eval/base/predictions.jsonl",
    "eval/tuned/predictions.jsonl",
]


def run_sections(doc: Doc, run_dir: Path) -> None:
    guard_section(doc, read_json(run_dir / "eval" / "guard.json"))
    config = run_config(run_dir)
    config_section(doc, config, run_dir)
    _data_section(doc, run_dir / "prepare")
    metrics = read_json(run_dir / "eval" / "metrics.json")
    groups = model_groups(metrics)
    doc.add("h2", "Accuracy")
    if groups:
        accuracy_tables(doc, groups, "run")
    else:
        doc.add("p", f"No evaluation results: {run_dir / 'eval' / 'metrics.json'} is missing.")
    doc.add("h2", "Fine-tuned vs base")
    rows = delta_rows(read_json(run_dir / "eval" / "compare.json"))
    if rows:
        delta_table(doc, {"tuned vs base": rows})
    else:
        doc.add("p", "No paired comparison (eval/compare.json is missing, or the base model was not scored).")
    _nll_section(doc, (metrics or {}).get("nll"))
    doc.add("h2", "Training")
    training_section(doc, {run_dir.name: read_jsonl(run_dir / "train" / "metrics.jsonl")}, "loss.png")
    _files_section(doc, run_dir, RUN_FILES)


def guard_section(doc: Doc, verdict: dict[str, Any] | None) -> None:
    """The forgetting guard's verdict, first on the page: it decides whether the model may ship."""
    if not verdict:
        return
    doc.add("h2", f"Forgetting guard: {'passed' if verdict.get('passed') else 'FAILED'}")
    rows, muted = [], set()
    for i, c in enumerate(verdict.get("checks", [])):
        if c.get("passed"):
            muted.add(i)
        rows.append(
            [
                c["group"],
                c["metric"],
                fmt_value(c.get("allowed")),
                c["why"],
                "pass" if c["passed"] else "FAIL",
            ]
        )
    doc.add("table", Table(["group", "metric", "allowed regression", "measured", "verdict"], rows, muted))
    if not verdict.get("passed"):
        doc.add("p", "`medtune export` refuses this model unless given --force (eval/guard.json).")


def _nll_section(doc: Doc, nll: dict[str, Any] | None) -> None:
    """The held-out NLL table (`eval.nll: true`); absent when the eval did not score it."""
    if not nll:
        return
    doc.add("h2", "Held-out NLL")
    header, rows = nll_rows(nll)
    table = Table(header, rows, {i for i, row in enumerate(rows) if row[-1].endswith("n.s.")})
    doc.add("table", table)
    doc.add(
        "p",
        "Mean NLL per token (nats) over eval items: MCQA items' whole text, instruction records' "
        "responses; lower is better. tuned - base is paired per item with a bootstrap 95% CI; "
        "'n.s.' where that interval includes 0.",
    )


def _data_section(doc: Doc, prepare_dir: Path) -> None:
    doc.add("h2", "Data")
    manifest = read_json(prepare_dir / "manifest.json")
    if not manifest:
        doc.add("p", f"No data manifest ({prepare_dir / 'manifest.json'} is missing).")
        return
    sources = manifest.get("sources")
    if isinstance(sources, dict) and sources:
        doc.add("h3", "Per source (records in = kept + quarantined + deduplicated + contaminated removed)")
        doc.add("table", _sources_table(sources))
    _mix_table(doc, manifest.get("mix") or {})
    _overlap_section(doc, manifest.get("contamination"), prepare_dir)
    skip = ("sources", "files", "mix", "stage", "config_hash", "contamination")
    rest = {k: v for k, v in manifest.items() if k not in skip}
    rows = [[k, fmt_value(v)] for k, v in _flatten(rest)]
    if rows:
        doc.add("h3", "Totals and filters")
        doc.add("table", Table(["figure", "value"], rows[:60]))
    doc.add("p", "All figures: " + doc.link(prepare_dir / "manifest.json", "prepare/manifest.json") + ".")


def _mix_table(doc: Doc, mix: dict[str, Any]) -> None:
    """Target vs achieved share per language, where the manifest records a mix."""
    if not isinstance(mix.get("achieved_share"), dict):
        return
    langs = list(dict.fromkeys([*(mix.get("target_share") or {}), *mix["achieved_share"]]))
    rows = [
        [
            lang,
            fmt_share((mix.get("target_share") or {}).get(lang)),
            fmt_share(mix["achieved_share"].get(lang)),
            fmt_value((mix.get("weight_per_language") or {}).get(lang, "–")),
        ]
        for lang in langs
    ]
    doc.add("h3", f"Language mix (by {mix.get('by', '?')})")
    doc.add("table", Table(["language", "target share", "achieved share", "amount"], rows))


def _overlap_section(doc: Doc, contamination: Any, prepare_dir: Path) -> None:
    """Eval/train overlap per eval source: near-copies, and recurring stems where the manifest has them."""
    if not isinstance(contamination, dict) or not isinstance(contamination.get("per_eval_source"), dict):
        return
    recurring = contamination.get("recurring_stems") or {}
    per_stem = recurring.get("per_eval_source") or {}
    rows = []
    for name, c in contamination["per_eval_source"].items():
        c = c if isinstance(c, dict) else {}
        stems = per_stem.get(name) or {}
        rows.append(
            [
                name,
                fmt_value(c.get("eval_items", "–")),
                fmt_value(c.get("train_records_overlapping", "–")),
                fmt_value(stems.get("train_records", 0) if recurring else "–"),
            ]
        )
    doc.add("h3", "Eval/train overlap")
    headers = ["eval source", "eval items", "train near-copies", "train recurring stems"]
    doc.add("table", Table(headers, rows))
    text = f"Near-copies of eval items: action {contamination.get('action', '?')}."
    if recurring:
        link = doc.link(prepare_dir / str(recurring.get("file", "recurring_stems.jsonl")), "every pair")
        text += (
            f" Recurring stems, an eval item's stem with other options: action "
            f"{recurring.get('action', '?')}, {fmt_value(recurring.get('train_records'))} training "
            f"records; {link}."
        )
    doc.add("p", text)
    pairs = [p for p in recurring.get("pairs") or [] if isinstance(p, dict)]
    if pairs:
        keys = ("train_id", "eval_id", "eval_source")
        doc.add(
            "table",
            Table(["train id", "eval id", "eval source"], [[str(p.get(k)) for k in keys] for p in pairs]),
        )


def _sources_table(sources: dict[str, Any]) -> Table:
    keys = ("records_in", "quarantined", "deduplicated", "contaminated_removed", "kept", "mixed")
    rows = []
    for name, c in sources.items():
        c = c if isinstance(c, dict) else {}
        rows.append(
            [
                name,
                *[fmt_value(c.get(k, "–")) for k in keys],
                fmt_value(c.get("languages", "–")),
                fmt_value(c.get("pii") or "–"),
            ]
        )
    return Table(["source", *[k.replace("_", " ") for k in keys], "languages", "PII scrubbed"], rows)


def _flatten(node: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Scalars (and short scalar lists) of a nested manifest as dotted keys, three levels deep."""
    if isinstance(node, dict) and depth < 4:
        out: list[tuple[str, Any]] = []
        for k, v in node.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
        return out
    if isinstance(node, list) and (len(node) > 8 or any(isinstance(x, dict | list) for x in node)):
        return [(prefix, f"({len(node)} entries)")]
    return [(prefix, node)]


def _files_section(doc: Doc, root: Path, rel_paths: list[str]) -> None:
    present = [p for p in rel_paths if (root / p).is_file()]
    if present:
        doc.add("h2", "Files")
        doc.add("ul", [doc.link(root / p, p) for p in present])
