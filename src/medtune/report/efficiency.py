"""The efficiency section: `medtune bench`'s cells (memory, throughput, padding) as measured, plus their
ratios to the baseline cell of the same run, so the claims read against a peer on the same machine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medtune.report.inputs import read_json
from medtune.report.page import Doc, Table, fmt_bytes, fmt_num
from medtune.report.plots import efficiency_chart

RATIO_KEYS = (("peak_memory", "peak memory"), ("tokens_per_s", "tokens/s"), ("step_seconds", "step time"))


def efficiency_section(doc: Doc, run_dir: Path) -> None:
    """Left out when the run dir holds no `bench.json` (nor `bench/bench.json`)."""
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
    doc.add("table", _cells_table(cells))
    ok_cells = [c for c in cells if c.get("status") == "ok" and c.get("ratios")]
    if ok_cells:
        ratios = {label: [c["ratios"].get(key) for c in ok_cells] for key, label in RATIO_KEYS}
        png = efficiency_chart(
            [c["name"] for c in ok_cells],
            ratios,
            doc.out_dir / "efficiency.png",
            bench.get("baseline", "first cell"),
        )
        doc.add("img", (png.name, "efficiency ratios to the baseline cell"))
    doc.add("ul", [doc.link(path, path.name)])


def _cells_table(cells: list[dict[str, Any]]) -> Table:
    """One row per bench cell; a failed cell is greyed and shows the start of its error."""
    headers = ["cell", "status", "peak memory (rank 0)", "tokens/s", "padding", "step s"]
    table = Table([*headers, "memory ×", "tokens/s ×", "step time ×"], [])
    for c in cells:
        r = c.get("ratios") or {}
        ok = c.get("status") == "ok"
        if not ok:
            table.muted.add(len(table.rows))
        table.rows.append(
            [
                c["name"],
                c.get("status", "?") if ok else f"failed: {c.get('error', '')[:80]}",
                fmt_bytes(c.get("peak_memory_bytes")),
                fmt_num(c.get("tokens_per_s"), "{:.0f}"),
                fmt_num(c.get("padding_fraction"), "{:.1%}"),
                fmt_num(c.get("step_seconds"), "{:.3f}"),
                *[fmt_num(r.get(k), "{:.2f}") for k, _ in RATIO_KEYS],
            ]
        )
    return table
