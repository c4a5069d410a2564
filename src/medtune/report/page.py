"""The report page as blocks (heading, paragraph, table, image, preformatted text) and its two renderings.

Every section adds blocks to one `Doc`; HTML and Markdown are rendered from the same blocks, so the two
formats cannot drift apart. The value formatters live here too: how a number reads on the page is
decided once, for every section.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any


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


def write_page(doc: Doc, title: str) -> None:
    """Write `report.html` (blocks inside the packaged template) and its `report.md` twin."""
    template = Template(
        resources.files("medtune.report").joinpath("template.html").read_text(encoding="utf-8")
    )
    body = f"<h1>{html.escape(title)}</h1>\n" + render_html(doc)
    (doc.out_dir / "report.html").write_text(
        template.substitute(title=html.escape(title), body=body), encoding="utf-8"
    )
    (doc.out_dir / "report.md").write_text(f"# {title}\n\n" + render_md(doc), encoding="utf-8")


# ---------------------------------------------------------------- values as they read on the page


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and x == x and abs(x) != float("inf")


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    return str(v)


def fmt_share(v: Any) -> str:
    return f"{100 * v:.1f}%" if finite(v) else "–"


def fmt_num(v: Any, fmt: str) -> str:
    return fmt.format(v) if finite(v) else "–"


def fmt_median(rows: list[dict[str, Any]], key: str, fmt: str) -> str:
    values = sorted(r[key] for r in rows if finite(r.get(key)))
    return fmt.format(values[len(values) // 2]) if values else "–"


def fmt_bytes(n: float | None) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "–"


# ---------------------------------------------------------------- HTML


def render_html(doc: Doc) -> str:
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


# ---------------------------------------------------------------- Markdown


def render_md(doc: Doc) -> str:
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
            parts.append(_table_md(value))
    return "\n\n".join(parts) + "\n"


def _table_md(t: Table) -> str:
    lines = ["| " + " | ".join(t.headers) + " |", "|" + "---|" * len(t.headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in t.rows]
    return "\n".join(lines)
