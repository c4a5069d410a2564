"""The sections of a ratio sweep's report: cells, recommendation, accuracy and deltas per cell, data per cell.

Every cell is compared with the one base evaluation in `base/`, so the tables put the base first and
each cell's change against it.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean
from typing import Any

from medtune.evaluate.sweep_advice import format_change, headline_groups
from medtune.report.inputs import delta_rows, model_groups, read_json, read_jsonl, run_config
from medtune.report.page import Doc, Table, fmt_share, fmt_value
from medtune.report.plots import SharePoint, share_chart
from medtune.report.sections import accuracy_tables, config_section, delta_table, training_section


def sweep_sections(doc: Doc, sweep_dir: Path) -> None:
    sweep = read_json(sweep_dir / "sweep.json") or {}
    cells = sweep.get("cells", [])
    _cells_table(doc, cells, sweep.get("seeds", []))
    _advice_section(doc, sweep.get("advice"))
    base_dir = sweep_dir / sweep.get("base", {}).get("dir", "base")
    config_section(doc, run_config(base_dir), base_dir)
    done = [c for c in cells if (sweep_dir / c["dir"] / "eval" / "metrics.json").is_file()]
    _accuracy_per_cell(doc, sweep_dir, base_dir, cells, done)
    _deltas_per_cell(doc, sweep_dir, done)
    _sweep_nll_table(
        doc, {c["name"]: read_json(sweep_dir / c["dir"] / "eval" / "nll_vs_base.json") for c in done}
    )
    doc.add("h2", "Training")
    logs = {c["name"]: read_jsonl(sweep_dir / c["dir"] / "train" / "metrics.jsonl") for c in cells}
    training_section(doc, {k: v for k, v in logs.items() if v}, "loss_sweep.png")
    doc.add("h2", "Data per cell")
    _cell_data_table(doc, sweep_dir, cells)


def _cells_table(doc: Doc, cells: list[dict[str, Any]], seeds: list[int]) -> None:
    """What the sweep ran: ratios × seeds, and each cell's status (failed cells greyed, with the error)."""
    labels = list(dict.fromkeys(c.get("ratio_label") or fmt_value(c.get("ratio")) for c in cells))
    doc.add(
        "p",
        f"{len(cells)} cells: ratios {', '.join(labels)} × seeds {seeds}. "
        "The base model is scored once (in base/) and every cell is compared with it on the same items.",
    )
    table = Table(["cell", "ratio", "seed", "status", "detail"], [])
    for c in cells:
        if c.get("status") not in ("ok", "skipped"):
            table.muted.add(len(table.rows))
        table.rows.append(
            [
                c["name"],
                fmt_value(c.get("ratio")),
                str(c.get("seed")),
                c.get("status", "?"),
                c.get("error") or "",
            ]
        )
    doc.add("h2", "Cells")
    doc.add("table", table)


def _accuracy_per_cell(
    doc: Doc, sweep_dir: Path, base_dir: Path, cells: list[dict[str, Any]], done: list[dict[str, Any]]
) -> None:
    groups = model_groups(read_json(base_dir / "eval" / "metrics.json"))
    series = {"base": groups.get("base", {})} if groups.get("base") else {}
    for c in done:
        tuned = model_groups(read_json(sweep_dir / c["dir"] / "eval" / "metrics.json")).get("tuned")
        if tuned:
            series[c["name"]] = tuned
    doc.add("h2", "Accuracy per cell")
    if series:
        accuracy_tables(doc, series, "sweep")
        _ratio_means(doc, cells, series)
    else:
        doc.add("p", "No cell has evaluation results yet.")


def _deltas_per_cell(doc: Doc, sweep_dir: Path, done: list[dict[str, Any]]) -> None:
    """Each finished cell's paired comparison with the base, overall and per language."""
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
        delta_table(doc, deltas)
    else:
        doc.add("p", "No paired comparisons (cells have no eval/compare.json).")


def _advice_section(doc: Doc, advice: dict[str, Any] | None) -> None:
    """The recommendation (with --target) and, per metric, each ratio's change vs the base with an
    interval over items and seeds, as a table and against the English share of the mix."""
    if not advice or not advice.get("metrics"):
        return
    rec = advice.get("recommendation")
    if rec:
        _recommendation(doc, rec)
    seeds = {label: info["seeds"] for label, info in advice["ratios"].items()}
    for metric, summary in advice["metrics"].items():
        _advice_table(doc, metric, summary, rec, seeds)
        _advice_chart(doc, metric, summary, rec, advice["ratios"])
    note = "Intervals: mean change vs the base ± t × SE, where SE covers item and seed variation "
    note += "(medtune.evaluate.advise); 'seed-dominated' where seed-to-seed variation is most of it."
    if all(len(s) == 1 for s in seeds.values()):
        note += " One seed per ratio: the intervals cover items only, not training-run variation."
    doc.add("p", note)


def _recommendation(doc: Doc, rec: dict[str, Any]) -> None:
    """The advisor's message, the ratios it excluded and why, and the best ratio against each other."""
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
            by_ratio.setdefault(c.get("ratio_label") or fmt_value(c.get("ratio")), []).append(c["name"])
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
                *[f"{fmt_share(target.get(lang))} / {fmt_share(achieved.get(lang))}" for lang in langs],
                fmt_value(totals.get("train_records", "–")),
                fmt_value(totals.get("eval_records", "–")),
                doc.link(path, "manifest"),
            ]
        )
    headers = ["cell", *[f"{lang} target / achieved" for lang in langs], "train records", "eval records"]
    doc.add("table", Table([*headers, "details"], rows))
