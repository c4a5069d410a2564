"""The tables `medtune compare` writes and prints: compare.md and the terminal table, from its record.

`medtune.evaluate.compare` computes the record; nothing here computes a statistic.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text


def _fmt_row(name: str, g: dict[str, Any]) -> list[str]:
    lo, hi = g["ci95_pp"]
    return [
        name,
        str(g["n"]),
        f"{100 * g['acc_a']:.1f}",
        f"{100 * g['acc_b']:.1f}",
        f"{g['delta_pp']:+.1f}",
        f"[{lo:+.1f}, {hi:+.1f}]",
        f"{g['mcnemar_p']:.3g}",
        g["verdict"],
    ]


_HEADER = ["group", "n", "A %", "B %", "Δ pp", "95% CI (pp)", "McNemar p", "verdict"]


def compare_markdown(result: dict[str, Any]) -> str:
    """compare.md: the per-group table, then the forgetting table when a base was given."""
    lines = [
        "# Paired comparison: B vs A",
        "",
        f"A: `{result['a']}`  ",
        f"B: `{result['b']}`",
        "",
        f"Items paired by id. Δ = B − A in percentage points; 95% CI from a paired bootstrap "
        f"({result['n_bootstrap']} resamples); exact McNemar test, significant when p < {result['alpha']}.",
        f"Only in A: {result['only_in_a']}, only in B: {result['only_in_b']}, "
        f"unscorable: {result['unscorable']}.",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "---|" * len(_HEADER),
    ]
    lines += ["| " + " | ".join(_fmt_row(name, g)) + " |" for name, g in result["groups"].items()]
    if "forgetting" in result:
        lines += ["", f"## Forgetting vs base (`{result['base']}`)", ""]
        if not result["forgetting"]:
            lines.append("No group scores below the base.")
        else:
            lines += [
                "| model | group | n | base % | model % | Δ pp | 95% CI (pp) | McNemar p | significant |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in result["forgetting"]:
                lo, hi = r["ci95_pp"]
                lines.append(
                    f"| {r['model']} | {r['group']} | {r['n']} | {100 * r['base_acc']:.1f} | "
                    f"{100 * r['model_acc']:.1f} | {r['delta_pp']:+.1f} | [{lo:+.1f}, {hi:+.1f}] | "
                    f"{r['mcnemar_p']:.3g} | {'yes' if r['significant'] else 'no'} |"
                )
    return "\n".join(lines) + "\n"


def compare_rich_table(result: dict[str, Any]) -> Table:
    """The per-group comparison as a rich table; significant rows in colour."""
    table = Table(title="B vs A (paired by item id)")
    for col in _HEADER:
        table.add_column(col, justify="left" if col in ("group", "verdict") else "right")
    for name, g in result["groups"].items():
        style = ("green" if g["delta_pp"] > 0 else "red") if g["significant"] else None
        table.add_row(*map(Text, _fmt_row(name, g)), style=style)  # names are data, not markup
    return table


# ---------------------------------------------------------------- several runs (seeds) per side

_SEED_METRICS = {
    # metric: (section title, unit of a score, unit of a difference, decimals)
    "accuracy": ("Accuracy (%; Δ in pp)", "%", "pp", 1),
    "nll": ("Held-out NLL (nats/token; lower is better)", "NLL", "nats", 3),
}


def _seed_header(metric: str) -> list[str]:
    _, score, diff, _ = _SEED_METRICS[metric]
    return [
        "group",
        "n",
        f"A {score}",
        f"B {score}",
        "A per run",
        "B per run",
        f"Δ {diff}",
        f"95% CI ({diff})",
        "seed share",
        "verdict",
    ]


def _seed_row(name: str, g: dict[str, Any], metric: str) -> list[str]:
    d = _SEED_METRICS[metric][3]
    lo, hi = g["ci95"]
    share = g["seed_share"]
    return [
        name,
        str(g["n"]),
        f"{g['a']:.{d}f}",
        f"{g['b']:.{d}f}",
        ", ".join(f"{x:.{d}f}" for x in g["a_seed_means"]),
        ", ".join(f"{x:.{d}f}" for x in g["b_seed_means"]),
        f"{g['estimate']:+.{d}f}",
        f"[{lo:+.{d}f}, {hi:+.{d}f}]",
        "–" if share is None else f"{100 * share:.0f}%",
        g["verdict"],
    ]


def _table_lines(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _seed_forgetting_lines(record: dict[str, Any], metric: str, base: str) -> list[str]:
    d = _SEED_METRICS[metric][3]
    lines = ["", f"### Forgetting vs base (`{base}`)", ""]
    if not record["forgetting"]:
        return [*lines, "No group scores worse than the base."]
    header = ["model", "group", "n", "base", "model", "Δ", "95% CI", "significant"]
    rows = [
        [r["model"], r["group"], str(r["n"]), f"{r['base']:.{d}f}", f"{r['model_mean']:.{d}f}"]
        + [f"{r['delta']:+.{d}f}", f"[{r['ci95'][0]:+.{d}f}, {r['ci95'][1]:+.{d}f}]"]
        + ["yes" if r["significant"] else "no"]
        for r in record["forgetting"]
    ]
    return lines + _table_lines(header, rows)


def seeds_markdown(result: dict[str, Any]) -> str:
    """compare.md for several runs per side: per metric, the groups' table, then the forgetting table."""
    n_a, n_b = result["seeds"]
    lines = [
        "# Comparison over seeds: B vs A",
        "",
        f"A ({n_a} run{'s' * (n_a > 1)}): " + ", ".join(f"`{p}`" for p in result["a"]) + "  ",
        f"B ({n_b} run{'s' * (n_b > 1)}): " + ", ".join(f"`{p}`" for p in result["b"]),
        "",
        "Per group: each model's mean over its runs and the items every run scored, each run's own mean, "
        "and Δ = B − A with a 95% interval covering item *and* seed (run-to-run) variation (t quantile, "
        f"Welch–Satterthwaite degrees of freedom); significant when it excludes 0 (α = {result['alpha']}). "
        "Seed share: the part of the uncertainty due to seeds; above 50% seed variation dominates, and "
        "more seeds, not more items, would narrow the interval.",
    ]
    if result["notes"]:
        lines += ["", *(f"- {note}" for note in result["notes"])]
    for metric, record in result["metrics"].items():
        lines += ["", f"## {_SEED_METRICS[metric][0]}", ""]
        lines += [f"Items some run did not score (left out of every run): {record['left_out']}.", ""]
        rows = [_seed_row(name, g, metric) for name, g in record["groups"].items()]
        lines += _table_lines(_seed_header(metric), rows)
        if "forgetting" in record:
            lines += _seed_forgetting_lines(record, metric, result["base"])
    return "\n".join(lines) + "\n"


def seeds_rich_tables(result: dict[str, Any]) -> list[Table]:
    """One terminal table per metric; significant rows in colour (green where B is better)."""
    tables = []
    for metric, record in result["metrics"].items():
        table = Table(
            title=f"B vs A over seeds ({result['seeds'][0]} vs {result['seeds'][1]} runs): {metric}"
        )
        for col in _seed_header(metric):
            table.add_column(col, justify="left" if col in ("group", "verdict") else "right")
        for name, g in record["groups"].items():
            better = g["verdict"].startswith("B better")
            style = ("green" if better else "red") if g["significant"] else None
            table.add_row(*map(Text, _seed_row(name, g, metric)), style=style)
        tables.append(table)
    return tables
