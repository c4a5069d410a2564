"""Sections a run report and a sweep report share: configuration, accuracy, paired deltas, training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medtune.report.inputs import SIGNIFICANCE_LEVEL, interval
from medtune.report.page import Doc, Table, finite, fmt_bytes, fmt_median, fmt_value
from medtune.report.plots import Bar, accuracy_chart, loss_chart

CONFIG_KEYS = (
    "seed",
    "model.path",
    "model.dtype",
    "quantization.mode",
    "lora.r",
    "lora.alpha",
    "packing.mode",
    "packing.max_seq_len",
    "train.max_steps",
    "train.epochs",
    "train.micro_batch_size",
    "train.grad_accum",
    "train.lr",
    "train.gradient_checkpointing",
    "distributed.nproc",
    "data.mix.ratio",
    "data.mix.by",
    "eval.mode",
    "eval.k_shot",
    "eval.max_items",
)
MAX_SUBJECT_BARS = 12  # more subjects than this make an unreadable chart; the table keeps them all


def config_section(doc: Doc, config: dict[str, Any] | None, run_dir: Path) -> None:
    doc.add("h2", "Configuration")
    if not config:
        doc.add("p", f"No stage manifest (run.json) with a config under {run_dir}.")
        return
    rows = [[key, fmt_value(_dotted(config, key))] for key in CONFIG_KEYS if _dotted(config, key) is not None]
    doc.add("table", Table(["key", "value"], rows))
    doc.add("details", ("Full resolved config", yaml.safe_dump(config, sort_keys=False, allow_unicode=True)))


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def accuracy_tables(doc: Doc, groups: dict[str, dict[str, dict[str, Any]]], stem: str) -> None:
    """A table of every group and one chart per grouping key (language incl. `all`, subject, source)."""
    names = list(dict.fromkeys(g for model in groups.values() for g in model))
    headers = ["group", *[f"{m} accuracy (Wilson 95%)" for m in groups], "n", "unscorable"]
    rows = []
    for g in names:
        first = next(m[g] for m in groups.values() if g in m)
        rows.append(
            [
                g,
                *[_fmt_acc(m.get(g)) for m in groups.values()],
                str(first.get("n", "")),
                str(first.get("unscorable", "")),
            ]
        )
    doc.add("table", Table(headers, rows))
    for key, title in (("language", "by language"), ("subject", "by subject"), ("source", "by source")):
        chosen = _chart_groups(names, key, next(iter(groups.values())))
        if len(chosen) < 2 and key != "language":
            continue
        series = {
            m: [_bar(g, summaries[g]) for g in chosen if g in summaries] for m, summaries in groups.items()
        }
        path = accuracy_chart(series, doc.out_dir / f"accuracy_{stem}_{key}.png", f"Accuracy {title}")
        doc.add("img", (path.name, f"accuracy {title} with 95% Wilson intervals"))


def _chart_groups(names: list[str], key: str, summaries: dict[str, dict[str, Any]]) -> list[str]:
    chosen = [g for g in names if g.startswith(f"{key}=")]
    chosen.sort(key=lambda g: -(summaries.get(g, {}).get("n") or 0))
    chosen = chosen[:MAX_SUBJECT_BARS]
    return (["all"] if key == "language" and "all" in names else []) + chosen


def _bar(group: str, summary: dict[str, Any]) -> Bar:
    low, high = interval(summary)
    return Bar(group.partition("=")[2] or group, summary["accuracy"] or 0.0, low, high)


def _fmt_acc(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("accuracy") is None:
        return "–"
    low, high = interval(summary)
    ci = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
    return f"{100 * summary['accuracy']:.1f}%{ci}"


def delta_table(doc: Doc, by_label: dict[str, list[dict[str, Any]]]) -> None:
    """Deltas with paired CIs and McNemar p; a non-significant delta says so in words, not only colour."""
    table = Table(
        ["comparison", "group", "Δ accuracy (pp)", "paired bootstrap 95% CI (pp)", "McNemar p", "verdict"], []
    )
    for label, rows in by_label.items():
        for r in rows:
            ci = f"[{r['ci_pp'][0]:+.1f}, {r['ci_pp'][1]:+.1f}]" if r["ci_pp"] else "–"
            p = f"{r['p']:.3g}" if r["p"] is not None else "–"
            verdict = {True: "significant", False: "not significant", None: "no test"}[r["significant"]]
            delta = f"{r['delta_pp']:+.1f}" if r["delta_pp"] is not None else "–"
            if r["significant"] is not True:
                table.muted.add(len(table.rows))
            table.rows.append([label, r["group"], delta, ci, p, verdict])
    doc.add("table", table)
    doc.add(
        "p",
        f"A delta is called significant when McNemar's exact test gives p < {SIGNIFICANCE_LEVEL} "
        "(as flagged by the compare stage); 'not significant' deltas may be noise.",
    )


def training_section(doc: Doc, logs: dict[str, list[dict[str, Any]]], png: str) -> None:
    """The loss curves of every run in `logs` in one chart, then one summary row per run."""
    curves = {
        label: (
            [r["step"] for r in rows if finite(r.get("loss"))],
            [r["loss"] for r in rows if finite(r.get("loss"))],
        )
        for label, rows in logs.items()
    }
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        doc.add("p", "No training log (train/metrics.jsonl is missing or empty).")
        return
    path = loss_chart(curves, doc.out_dir / png, "Training loss")
    doc.add("img", (path.name, "training loss per step"))
    doc.add("table", _training_table(logs))


def _training_table(logs: dict[str, list[dict[str, Any]]]) -> Table:
    rows = []
    for label, log in logs.items():
        if not log:
            rows.append([label, "–", "–", "–", "–", "–"])
            continue
        after_first = log[1:] or log
        rows.append(
            [
                label,
                str(log[-1].get("step")),
                fmt_value(log[-1].get("loss")),
                fmt_median(after_first, "tokens_per_s", "{:.0f}"),
                fmt_median(log, "real_token_fraction", "{:.1%}"),
                fmt_bytes(max((r.get("peak_memory_bytes") or 0) for r in log)),
            ]
        )
    headers = [
        "run",
        "steps",
        "final loss",
        "median tokens/s (after step 1)",
        "median real-token fraction",
        "peak memory (rank 0)",
    ]
    return Table(headers, rows)
