"""`medtune report`: one readable HTML page (and a Markdown twin) for a run or a ratio sweep.

The report only reads what the stages wrote (`prepare/manifest.json`, `train/metrics.jsonl`,
`eval/metrics.json`, `eval/compare.json`, `sweep.json`, `bench.json`); it computes no new statistics,
so every number on the page can be traced to a file. A file an older run lacks is left out of the
page with a note, never filled in. Charts are PNG files beside `report.html`, linked by relative
path, so the folder can be zipped, mailed and printed as it is.

The sections live by what they report on: `run.py` (one run), `sweep.py` (a ratio sweep),
`efficiency.py` (a bench), with the parts both share in `sections.py`; `page.py` renders the blocks
to HTML and Markdown, and `inputs.py` reads the stage files.
"""

from __future__ import annotations

from pathlib import Path

from medtune.manifest import finish_record, start_record
from medtune.report.efficiency import efficiency_section
from medtune.report.inputs import reported_config_hash
from medtune.report.page import Doc, write_page
from medtune.report.run import run_sections
from medtune.report.sweep import sweep_sections


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
        sweep_sections(doc, run_dir)
    else:
        title = f"medtune run report: {run_dir.name}"
        run_sections(doc, run_dir)
    efficiency_section(doc, run_dir)
    write_page(doc, title)
    finish_record(record, out_dir)
    return out_dir
