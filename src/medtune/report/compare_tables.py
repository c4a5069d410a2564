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
