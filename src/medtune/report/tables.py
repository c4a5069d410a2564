"""The eval tables as text: `eval/results.md` and the terminal tables of `medtune eval`.

Only formatting: every number comes from `eval/metrics.json` as `medtune.evaluate.run` computed it,
so the Markdown file, the terminal and the report show the same values. Torch-free.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def nll_rows(nll: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the held-out NLL table in `metrics.json["nll"]`: one column per model, then
    tuned - base with its paired CI, marked "n.s." where the CI includes 0."""
    labels = [k for k in ("base", "tuned") if k in nll]
    header = ["group", "n", *[f"{label} NLL [95% CI]" for label in labels]]
    pairs = nll.get("tuned_vs_base")
    if pairs:
        header.append("tuned - base [paired 95% CI]")
    rows = []
    for group, g in nll[labels[0]].items():
        row = [group, str(g["n"])]
        for label in labels:
            t = nll[label][group]
            row.append(f"{t['nll']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]")
        if pairs and group in pairs:
            d = pairs[group]
            verdict = "" if d["significant"] else " n.s."
            row.append(f"{d['delta']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]{verdict}")
        rows.append(row)
    return header, rows


def nll_rich_table(nll: dict[str, Any]) -> Table:
    """The held-out NLL table for the terminal: the rows of `nll_rows`."""
    header, rows = nll_rows(nll)
    out = Table(title="held-out NLL (nats/token, mean over items; lower is better)")
    for col in header:
        out.add_column(col, justify="left" if col == "group" else "right")
    for row in rows:
        out.add_row(*map(Text, row))  # group names are data, not rich markup
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _row(name: str, g: dict[str, Any]) -> list[str]:
    (wl, wh), (bl, bh) = g["wilson_95"], g["bootstrap_95"]
    return [
        name,
        str(g["n"]),
        _pct(g["accuracy"]),
        f"[{_pct(wl)}, {_pct(wh)}]",
        f"[{_pct(bl)}, {_pct(bh)}]",
        str(g["unscorable"]),
        str(g["unanswered"]),
    ]


_HEADER = ["group", "n", "acc %", "Wilson 95%", "bootstrap 95%", "unscorable", "unanswered"]


def results_markdown(metrics: dict[str, Any]) -> str:
    """results.md: one table per model, then the macro averages and the comparison verdicts."""
    lines = [f"# Evaluation ({metrics['mode']}, {metrics['k_shot']}-shot, {metrics['n_items']} items)", ""]
    if metrics["skipped"]:
        lines += [f"Left out: {', '.join(f'{k}: {v}' for k, v in metrics['skipped'].items())}", ""]
    for label, table in metrics["models"].items():
        lines += [f"## {label}", "", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
        lines += ["| " + " | ".join(_row(name, g)) + " |" for name, g in table["groups"].items()]
        macro = ", ".join(f"{k}: {_pct(v)}" for k, v in table["macro"].items())
        lines += ["", f"Macro averages: {macro}", ""]
    if "nll" in metrics:
        header, rows = nll_rows(metrics["nll"])
        lines += [
            "## Held-out NLL (nats/token, mean over items; lower is better; n.s. = CI includes 0)",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows],
            "",
        ]
    if "compare" in metrics:
        lines += [
            "## tuned vs base",
            "",
            "See compare.md for the paired table (McNemar, paired bootstrap).",
            "",
        ]
    return "\n".join(lines)


def results_rich_table(label: str, table: dict[str, Any]) -> Table:
    """One model's per-group accuracies with both intervals, for the terminal."""
    out = Table(title=f"{label}: accuracy by group")
    for col in _HEADER:
        out.add_column(col, justify="left" if col == "group" else "right")
    for name, g in table["groups"].items():
        out.add_row(*map(Text, _row(name, g)))
    return out
