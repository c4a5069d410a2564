"""`medtune report`: one readable HTML page (and a Markdown twin) for a run or a ratio sweep.

The report only reads what the stages wrote (`prepare/manifest.json`, `train/metrics.jsonl`,
`eval/metrics.json`, `eval/compare.json`, `sweep.json`, `bench.json`); it computes no new statistics,
so every number on the page can be traced to a file. A file an older run lacks is left out of the
page with a note, never filled in. Charts are PNG files beside `report.html`, linked by relative
path, so the folder can be zipped, mailed and printed as it is.

The page is built as a list of blocks (heading, paragraph, table, image, preformatted text) that
render to both HTML and Markdown, so the two formats cannot drift apart.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from statistics import mean
from string import Template
from typing import Any

import yaml

from medtune.evaluate.sweep_advice import format_change, headline_groups
from medtune.manifest import finish_record, start_record
from medtune.report.plots import Bar, SharePoint, accuracy_chart, efficiency_chart, loss_chart, share_chart
from medtune.report.tables import nll_rows

SIGNIFICANCE_LEVEL = 0.05
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


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    muted: set[int] = field(default_factory=set)
    """Row indices drawn greyed out (non-significant deltas, failed cells)."""


@dataclass
class Doc:
    """The report as blocks, plus where it lives (for relative links)."""

    out_dir: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def add(self, kind: str, value: Any) -> None:
        self.blocks.append((kind, value))

    def link(self, target: Path, text: str) -> str:
        """A Markdown-style link token, relative to the report; rendered per format later."""
        return f"[{text}]({os.path.relpath(target, self.out_dir)})"


def run_report(run_dir: Path, out_dir: Path) -> Path:
    """Write `report.html`, `report.md` and the charts for a run dir or a sweep dir; return `out_dir`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run.json").unlink(missing_ok=True)  # written last: present means complete
    record = start_record("report", None)
    record["source"] = str(run_dir)
    record["config_hash"] = reported_config_hash(run_dir)
    doc = Doc(out_dir)
    if (run_dir / "sweep.json").is_file():
        title = f"medtune sweep report: {run_dir.name}"
        _sweep_sections(doc, run_dir)
    else:
        title = f"medtune run report: {run_dir.name}"
        _run_sections(doc, run_dir)
    _efficiency_section(doc, run_dir)
    template = Template(
        resources.files("medtune.report").joinpath("template.html").read_text(encoding="utf-8")
    )
    body = f"<h1>{html.escape(title)}</h1>\n" + _render_html(doc)
    (out_dir / "report.html").write_text(
        template.substitute(title=html.escape(title), body=body), encoding="utf-8"
    )
    (out_dir / "report.md").write_text(f"# {title}\n\n" + _render_md(doc), encoding="utf-8")
    finish_record(record, out_dir)
    return out_dir


# ---------------------------------------------------------------- reading stage outputs


def read_json(path: Path) -> Any | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config from the latest stage manifest that has one (eval, then train, then prepare)."""
    for stage in ("eval", "train", "prepare"):
        manifest = read_json(run_dir / stage / "run.json")
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
    rows = []
    for name, g in groups.items():
        if not isinstance(g, dict):
            continue
        delta = _first(g, "delta_pp")
        if delta is None and _first(g, "delta") is not None:
            delta = 100 * g["delta"]
        ci = _first(g, "ci95_pp", "ci_pp", "delta_ci_pp", "paired_bootstrap_95_pp", "bootstrap_95_pp")
        if ci is None:
            frac = _first(g, "paired_bootstrap_95", "ci_95", "bootstrap_95", "ci")
            ci = [100 * frac[0], 100 * frac[1]] if frac else None
        p = _first(g, "mcnemar_p", "p_value", "p")
        significant = _first(g, "significant")
        if significant is None and p is not None:
            significant = p < SIGNIFICANCE_LEVEL
        rows.append(
            {
                "group": name,
                "delta_pp": delta,
                "ci_pp": ci,
                "p": p,
                "significant": significant,
                "n": _first(g, "n", "n_paired"),
            }
        )
    return rows


def _first(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return None


def _interval(summary: dict[str, Any]) -> tuple[float | None, float | None]:
    ci = _first(summary, "wilson_95", "wilson_ci", "ci_95")
    return (ci[0], ci[1]) if ci else (None, None)


# ---------------------------------------------------------------- single run


def _run_sections(doc: Doc, run_dir: Path) -> None:
    _guard_section(doc, read_json(run_dir / "eval" / "guard.json"))
    config = run_config(run_dir)
    _config_section(doc, config, run_dir)
    _data_section(doc, run_dir / "prepare")
    metrics = read_json(run_dir / "eval" / "metrics.json")
    groups = model_groups(metrics)
    doc.add("h2", "Accuracy")
    if groups:
        _accuracy_tables(doc, groups, "run")
    else:
        doc.add("p", f"No evaluation results: {run_dir / 'eval' / 'metrics.json'} is missing.")
    doc.add("h2", "Fine-tuned vs base")
    rows = delta_rows(read_json(run_dir / "eval" / "compare.json"))
    if rows:
        _delta_table(doc, {"tuned vs base": rows})
    else:
        doc.add("p", "No paired comparison (eval/compare.json is missing, or the base model was not scored).")
    _nll_section(doc, (metrics or {}).get("nll"))
    doc.add("h2", "Training")
    _training_section(doc, {run_dir.name: read_jsonl(run_dir / "train" / "metrics.jsonl")}, "loss.png")
    _files_section(
        doc,
        run_dir,
        [
            "prepare/manifest.json",
            "train/metrics.jsonl",
            "eval/metrics.json",
            "eval/compare.json",
            "eval/base/predictions.jsonl",
            "eval/tuned/predictions.jsonl",
        ],
    )


def _guard_section(doc: Doc, verdict: dict[str, Any] | None) -> None:
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
                _fmt_value(c.get("allowed")),
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


def _config_section(doc: Doc, config: dict[str, Any] | None, run_dir: Path) -> None:
    doc.add("h2", "Configuration")
    if not config:
        doc.add("p", f"No stage manifest (run.json) with a config under {run_dir}.")
        return
    rows = [
        [key, _fmt_value(_dotted(config, key))] for key in CONFIG_KEYS if _dotted(config, key) is not None
    ]
    doc.add("table", Table(["key", "value"], rows))
    doc.add("details", ("Full resolved config", yaml.safe_dump(config, sort_keys=False, allow_unicode=True)))


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
    mix = manifest.get("mix") or {}
    if isinstance(mix.get("achieved_share"), dict):
        langs = list(dict.fromkeys([*(mix.get("target_share") or {}), *mix["achieved_share"]]))
        rows = [
            [
                lang,
                _fmt_share((mix.get("target_share") or {}).get(lang)),
                _fmt_share(mix["achieved_share"].get(lang)),
                _fmt_value((mix.get("weight_per_language") or {}).get(lang, "–")),
            ]
            for lang in langs
        ]
        doc.add("h3", f"Language mix (by {mix.get('by', '?')})")
        doc.add("table", Table(["language", "target share", "achieved share", "amount"], rows))
    _overlap_section(doc, manifest.get("contamination"), prepare_dir)
    skip = ("sources", "files", "mix", "stage", "config_hash", "contamination")
    rest = {k: v for k, v in manifest.items() if k not in skip}
    rows = [[k, _fmt_value(v)] for k, v in _flatten(rest)]
    if rows:
        doc.add("h3", "Totals and filters")
        doc.add("table", Table(["figure", "value"], rows[:60]))
    doc.add("p", "All figures: " + doc.link(prepare_dir / "manifest.json", "prepare/manifest.json") + ".")


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
                _fmt_value(c.get("eval_items", "–")),
                _fmt_value(c.get("train_records_overlapping", "–")),
                _fmt_value(stems.get("train_records", 0) if recurring else "–"),
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
            f"{recurring.get('action', '?')}, {_fmt_value(recurring.get('train_records'))} training "
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
                *[_fmt_value(c.get(k, "–")) for k in keys],
                _fmt_value(c.get("languages", "–")),
                _fmt_value(c.get("pii") or "–"),
            ]
        )
    return Table(["source", *[k.replace("_", " ") for k in keys], "languages", "PII scrubbed"], rows)


def _fmt_share(v: Any) -> str:
    return f"{100 * v:.1f}%" if _finite(v) else "–"


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


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return str(v)


def _accuracy_tables(doc: Doc, groups: dict[str, dict[str, dict[str, Any]]], stem: str) -> None:
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
    low, high = _interval(summary)
    return Bar(group.partition("=")[2] or group, summary["accuracy"] or 0.0, low, high)


def _fmt_acc(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("accuracy") is None:
        return "–"
    low, high = _interval(summary)
    ci = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None else ""
    return f"{100 * summary['accuracy']:.1f}%{ci}"


def _delta_table(doc: Doc, by_label: dict[str, list[dict[str, Any]]]) -> None:
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


def _training_section(doc: Doc, logs: dict[str, list[dict[str, Any]]], png: str) -> None:
    curves = {
        label: (
            [r["step"] for r in rows if _finite(r.get("loss"))],
            [r["loss"] for r in rows if _finite(r.get("loss"))],
        )
        for label, rows in logs.items()
    }
    curves = {k: v for k, v in curves.items() if v[0]}
    if not curves:
        doc.add("p", "No training log (train/metrics.jsonl is missing or empty).")
        return
    path = loss_chart(curves, doc.out_dir / png, "Training loss")
    doc.add("img", (path.name, "training loss per step"))
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
                _fmt_value(log[-1].get("loss")),
                _fmt_median(after_first, "tokens_per_s", "{:.0f}"),
                _fmt_median(log, "real_token_fraction", "{:.1%}"),
                _fmt_bytes(max((r.get("peak_memory_bytes") or 0) for r in log)),
            ]
        )
    doc.add(
        "table",
        Table(
            [
                "run",
                "steps",
                "final loss",
                "median tokens/s (after step 1)",
                "median real-token fraction",
                "peak memory (rank 0)",
            ],
            rows,
        ),
    )


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and x == x and abs(x) != float("inf")


def _fmt_median(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    values = sorted(r[key] for r in rows if _finite(r.get(key)))
    return fmt.format(values[len(values) // 2]) if values else "–"


def _fmt_bytes(n: float | None) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "–"


def _files_section(doc: Doc, root: Path, rel_paths: list[str]) -> None:
    present = [p for p in rel_paths if (root / p).is_file()]
    if present:
        doc.add("h2", "Files")
        doc.add("ul", [doc.link(root / p, p) for p in present])


# ---------------------------------------------------------------- sweep


def _sweep_sections(doc: Doc, sweep_dir: Path) -> None:
    sweep = read_json(sweep_dir / "sweep.json") or {}
    cells = sweep.get("cells", [])
    labels = list(dict.fromkeys(c.get("ratio_label") or _fmt_value(c.get("ratio")) for c in cells))
    doc.add(
        "p",
        f"{len(cells)} cells: ratios {', '.join(labels)} × seeds {sweep.get('seeds', [])}. "
        "The base model is scored once (in base/) and every cell is compared with it on the same items.",
    )
    table = Table(["cell", "ratio", "seed", "status", "detail"], [])
    for c in cells:
        if c.get("status") not in ("ok", "skipped"):
            table.muted.add(len(table.rows))
        table.rows.append(
            [
                c["name"],
                _fmt_value(c.get("ratio")),
                str(c.get("seed")),
                c.get("status", "?"),
                c.get("error") or "",
            ]
        )
    doc.add("h2", "Cells")
    doc.add("table", table)
    _advice_section(doc, sweep.get("advice"))
    base_dir = sweep_dir / sweep.get("base", {}).get("dir", "base")
    _config_section(doc, run_config(base_dir), base_dir)
    done = [c for c in cells if (sweep_dir / c["dir"] / "eval" / "metrics.json").is_file()]
    groups = model_groups(read_json(base_dir / "eval" / "metrics.json"))
    series = {"base": groups.get("base", {})} if groups.get("base") else {}
    for c in done:
        tuned = model_groups(read_json(sweep_dir / c["dir"] / "eval" / "metrics.json")).get("tuned")
        if tuned:
            series[c["name"]] = tuned
    doc.add("h2", "Accuracy per cell")
    if series:
        _accuracy_tables(doc, series, "sweep")
        _ratio_means(doc, cells, series)
    else:
        doc.add("p", "No cell has evaluation results yet.")
    doc.add("h2", "Each cell vs the base model")
    deltas = {
        c["name"]: [
            r
            for r in delta_rows(read_json(sweep_dir / c["dir"] / "eval" / "compare.json"))
            if r["group"] == "all" or str(r["group"]).startswith("language=")
        ]
        for c in done
    }
    deltas = {k: v for k, v in deltas.items() if v}
    if deltas:
        _delta_table(doc, deltas)
    else:
        doc.add("p", "No paired comparisons (cells have no eval/compare.json).")
    _sweep_nll_table(
        doc, {c["name"]: read_json(sweep_dir / c["dir"] / "eval" / "nll_vs_base.json") for c in done}
    )
    doc.add("h2", "Training")
    logs = {c["name"]: read_jsonl(sweep_dir / c["dir"] / "train" / "metrics.jsonl") for c in cells}
    _training_section(doc, {k: v for k, v in logs.items() if v}, "loss_sweep.png")
    doc.add("h2", "Data per cell")
    _cell_data_table(doc, sweep_dir, cells)


def _advice_section(doc: Doc, advice: dict[str, Any] | None) -> None:
    """The recommendation (with --target) and, per metric, each ratio's change vs the base with an
    interval over items and seeds, as a table and against the English share of the mix."""
    if not advice or not advice.get("metrics"):
        return
    rec = advice.get("recommendation")
    if rec:
        doc.add("h2", "Recommendation")
        doc.add("p", rec["message"])
        if rec.get("excluded"):
            doc.add("ul", [f"{label} excluded: {'; '.join(why)}" for label, why in rec["excluded"].items()])
        if rec.get("versus_best"):
            rows = [
                [
                    f"{rec['best']} − {other}",
                    f"{v['estimate']:+.4g}",
                    f"[{v['ci95'][0]:+.4g}, {v['ci95'][1]:+.4g}]",
                    "significant" if v["significant"] else "not significant",
                ]
                for other, v in rec["versus_best"].items()
            ]
            doc.add(
                "table", Table([f"on {rec['target']} (better is +)", "difference", "95% CI", "verdict"], rows)
            )
    seeds = {label: info["seeds"] for label, info in advice["ratios"].items()}
    for metric, summary in advice["metrics"].items():
        _advice_table(doc, metric, summary, rec, seeds)
        _advice_chart(doc, metric, summary, rec, advice["ratios"])
    note = "Intervals: mean change vs the base ± t × SE, where SE covers item and seed variation "
    note += "(medtune.evaluate.advise); 'seed-dominated' where seed-to-seed variation is most of it."
    if all(len(s) == 1 for s in seeds.values()):
        note += " One seed per ratio: the intervals cover items only, not training-run variation."
    doc.add("p", note)


def _advice_table(
    doc: Doc, metric: str, summary: dict[str, Any], rec: dict[str, Any] | None, seeds: dict[str, list]
) -> None:
    unit = "accuracy %, change in pp" if metric == "accuracy" else "held-out NLL nats/token, lower is better"
    doc.add("h3", f"Per ratio over seeds: {unit}")
    table = Table(["group", "n", "base", "ratio", "seeds", "mean", "change vs base [95% CI]", "verdict"], [])
    for group in headline_groups(summary, rec):
        g = summary["groups"][group]
        for label, r in g["ratios"].items():
            if not r["significant"]:
                table.muted.add(len(table.rows))
            table.rows.append(
                [
                    group,
                    str(g["n"]),
                    f"{g['base']:.4g}",
                    label,
                    str(len(seeds.get(label, []))),
                    f"{r['mean']:.4g}",
                    format_change(r, metric),
                    "significant" if r["significant"] else "not significant",
                ]
            )
    doc.add("table", table)


def _advice_chart(
    doc: Doc, metric: str, summary: dict[str, Any], rec: dict[str, Any] | None, ratios: dict[str, Any]
) -> None:
    series = {
        group: [
            SharePoint(ratios[label]["english_share"], r["delta_vs_base"], *r["ci95"])
            for label, r in summary["groups"][group]["ratios"].items()
            if ratios.get(label, {}).get("english_share") is not None
        ]
        for group in headline_groups(summary, rec)
    }
    series = {k: v for k, v in series.items() if v}
    if not series:
        return
    ylabel = "accuracy change vs base (pp)" if metric == "accuracy" else "NLL change vs base (nats/token)"
    path = share_chart(
        series, doc.out_dir / f"score_vs_english_share_{metric}.png", f"{metric} by mix", ylabel
    )
    doc.add(
        "img", (path.name, f"{metric} change vs base against the English share, 95% CIs over items and seeds")
    )


def _sweep_nll_table(doc: Doc, pairs: dict[str, dict[str, Any] | None]) -> None:
    """Held-out NLL of each cell vs the base, paired per item (cells scored with `eval.nll: true`)."""
    pairs = {name: p for name, p in pairs.items() if p}
    if not pairs:
        return
    doc.add("h2", "Held-out NLL: each cell vs the base model")
    table = Table(
        ["cell", "group", "n", "base NLL", "cell NLL", "cell - base [paired 95% CI]", "verdict"], []
    )
    for name, groups in pairs.items():
        for group, d in groups.items():
            if not (group == "all" or group.startswith(("language=", "source=", "tag="))):
                continue
            if not d["significant"]:
                table.muted.add(len(table.rows))
            ci = f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            verdict = ("lower" if d["delta"] < 0 else "higher") if d["significant"] else "not significant"
            table.rows.append([name, group, str(d["n"]), f"{d['a']:.3f}", f"{d['b']:.3f}", ci, verdict])
    doc.add("table", table)
    doc.add(
        "p",
        "Mean NLL per token (nats) over the same eval items; lower is better. 'not significant' where "
        "the paired bootstrap 95% interval includes 0.",
    )


def _ratio_means(doc: Doc, cells: list[dict[str, Any]], series: dict[str, dict[str, dict]]) -> None:
    """Mean accuracy over seeds per ratio, with the seed-to-seed range: the sweep's headline."""
    by_ratio: dict[str, list[str]] = {}
    for c in cells:
        if c["name"] in series:
            by_ratio.setdefault(c.get("ratio_label") or _fmt_value(c.get("ratio")), []).append(c["name"])
    if not by_ratio:
        return
    groups = [g for g in series[next(iter(by_ratio.values()))[0]] if g == "all" or g.startswith("language=")]
    rows = []
    for label, names in by_ratio.items():
        row = [label, str(len(names))]
        for g in groups:
            accs = [
                series[n][g]["accuracy"]
                for n in names
                if g in series[n] and series[n][g].get("accuracy") is not None
            ]
            row.append(
                f"{100 * mean(accs):.1f}% ({100 * min(accs):.1f}–{100 * max(accs):.1f})" if accs else "–"
            )
        rows.append(row)
    doc.add("h3", "Mean over seeds per ratio (min–max across seeds)")
    doc.add("table", Table(["ratio", "seeds", *groups], rows))


def _cell_data_table(doc: Doc, sweep_dir: Path, cells: list[dict[str, Any]]) -> None:
    """Target vs achieved language shares per cell: did the mixer deliver the ratio the cell is named for?"""
    found = [(c, sweep_dir / c["dir"] / "prepare" / "manifest.json") for c in cells]
    found = [(c, path, read_json(path)) for c, path in found if path.is_file()]
    if not found:
        doc.add("p", "No cell has a data manifest yet.")
        return
    shares = [
        ((m.get("mix") or {}).get("target_share") or {}, (m.get("mix") or {}).get("achieved_share") or {})
        for _, _, m in found
    ]
    langs = list(dict.fromkeys(lang for target, achieved in shares for lang in [*target, *achieved]))
    rows = []
    for (c, path, manifest), (target, achieved) in zip(found, shares, strict=True):
        totals = manifest.get("totals") or {}
        rows.append(
            [
                c["name"],
                *[f"{_fmt_share(target.get(lang))} / {_fmt_share(achieved.get(lang))}" for lang in langs],
                _fmt_value(totals.get("train_records", "–")),
                _fmt_value(totals.get("eval_records", "–")),
                doc.link(path, "manifest"),
            ]
        )
    doc.add(
        "table",
        Table(
            [
                "cell",
                *[f"{lang} target / achieved" for lang in langs],
                "train records",
                "eval records",
                "details",
            ],
            rows,
        ),
    )


# ---------------------------------------------------------------- efficiency


def _efficiency_section(doc: Doc, run_dir: Path) -> None:
    path = next((p for p in (run_dir / "bench.json", run_dir / "bench" / "bench.json") if p.is_file()), None)
    if path is None:
        return
    bench = read_json(path)
    cells = bench.get("cells", [])
    doc.add("h2", "Efficiency")
    if bench.get("complete") is False:
        doc.add("p", "This bench did not finish: the table holds the cells measured before it stopped.")
    doc.add(
        "p",
        f"{bench.get('steps', '?')} training steps per cell on {bench.get('machine', 'an unstated machine')}"
        "; "
        f"ratios are to the baseline cell `{bench.get('baseline', '?')}` measured in the same run. "
        "Step time is the median over steps after the first (warm-up).",
    )
    table = Table(
        [
            "cell",
            "status",
            "peak memory (rank 0)",
            "tokens/s",
            "padding",
            "step s",
            "memory ×",
            "tokens/s ×",
            "step time ×",
        ],
        [],
    )
    for c in cells:
        r = c.get("ratios") or {}
        ok = c.get("status") == "ok"
        if not ok:
            table.muted.add(len(table.rows))
        table.rows.append(
            [
                c["name"],
                c.get("status", "?") if ok else f"failed: {c.get('error', '')[:80]}",
                _fmt_bytes(c.get("peak_memory_bytes")),
                _fmt_num(c.get("tokens_per_s"), "{:.0f}"),
                _fmt_num(c.get("padding_fraction"), "{:.1%}"),
                _fmt_num(c.get("step_seconds"), "{:.3f}"),
                *[_fmt_num(r.get(k), "{:.2f}") for k in ("peak_memory", "tokens_per_s", "step_seconds")],
            ]
        )
    doc.add("table", table)
    ok_cells = [c for c in cells if c.get("status") == "ok" and c.get("ratios")]
    if ok_cells:
        ratios = {
            label: [c["ratios"].get(key) for c in ok_cells]
            for key, label in (
                ("peak_memory", "peak memory"),
                ("tokens_per_s", "tokens/s"),
                ("step_seconds", "step time"),
            )
        }
        png = efficiency_chart(
            [c["name"] for c in ok_cells],
            ratios,
            doc.out_dir / "efficiency.png",
            bench.get("baseline", "first cell"),
        )
        doc.add("img", (png.name, "efficiency ratios to the baseline cell"))
    doc.add("ul", [doc.link(path, path.name)])


def _fmt_num(v: Any, fmt: str) -> str:
    return fmt.format(v) if _finite(v) else "–"


# ---------------------------------------------------------------- rendering


def _render_html(doc: Doc) -> str:
    parts = []
    for kind, value in doc.blocks:
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{html.escape(value)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline_html(value)}</p>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{_inline_html(v)}</li>" for v in value) + "</ul>")
        elif kind == "img":
            src, alt = value
            parts.append(f'<img src="{html.escape(src)}" alt="{html.escape(alt)}">')
        elif kind == "details":
            summary, text = value
            parts.append(
                f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>"
            )
        elif kind == "table":
            parts.append(_table_html(value))
    return "\n".join(parts)


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in t.headers)
    body = []
    for i, row in enumerate(t.rows):
        cells = "".join(_cell_html(c) for c in row)
        body.append(f'<tr class="ns">{cells}</tr>' if i in t.muted else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell_html(text: str) -> str:
    if text == "not significant":
        return '<td><span class="ns-mark">not significant</span></td>'
    if text == "significant":
        return '<td><span class="sig-mark">significant</span></td>'
    if text.startswith("failed"):
        return f'<td><span class="failed">{html.escape(text)}</span></td>'
    numeric = text[:1] in "+-–0123456789" and not text.startswith("[")
    return f'<td class="num">{_inline_html(text)}</td>' if numeric else f"<td>{_inline_html(text)}</td>"


def _inline_html(text: str) -> str:
    """Escape text, then turn the `[text](href)` tokens made by `Doc.link` into anchors."""
    out, rest = [], text
    while "](" in rest and "[" in rest:
        start = rest.index("[")
        mid = rest.find("](", start)
        end = rest.find(")", mid)
        if mid < 0 or end < 0:
            break
        out.append(html.escape(rest[:start]))
        label, href = rest[start + 1 : mid], rest[mid + 2 : end]
        out.append(f'<a href="{html.escape(href)}">{html.escape(label)}</a>')
        rest = rest[end + 1 :]
    out.append(html.escape(rest))
    return "".join(out)


def _render_md(doc: Doc) -> str:
    parts = []
    for kind, value in doc.blocks:
        if kind == "h2":
            parts.append(f"## {value}")
        elif kind == "h3":
            parts.append(f"### {value}")
        elif kind == "p":
            parts.append(value)
        elif kind == "ul":
            parts.append("\n".join(f"- {v}" for v in value))
        elif kind == "img":
            parts.append(f"![{value[1]}]({value[0]})")
        elif kind == "details":
            parts.append(f"<details><summary>{value[0]}</summary>\n\n```yaml\n{value[1]}```\n</details>")
        elif kind == "table":
            t = value
            lines = ["| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
            parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
