"""What the dashboard shows about run folders, read from the files the pipeline writes.

Nothing here imports torch or opens a model: a run's stage is the last `<stage>/run.json` present
(the pipeline writes it last, so it means "finished"), its training progress is the tail of
`train/metrics.jsonl`, and whether it is alive comes from the pid the dashboard recorded. Reading a
run costs a few small file reads, so the Runs page of a hundred runs stays well under a second.
"""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.manifest import read_manifest
from medtune.report.inputs import config_from
from medtune.ui.launch import is_running, log_tail, read_json, read_launch

STAGES = ("prepare", "train", "eval", "report")
SWEEP_FILE = "sweep.json"  # what `medtune sweep` writes at the top of its folder
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOTAL_STEPS_IN_LOG = re.compile(r"(\d+) steps, world size")


@dataclass
class RunSummary:
    """One row of the Runs page."""

    name: str
    stage: str  # the stage running or next to run; "report" once done
    status: str  # running / stopped / failed / done
    step: int | None
    total_steps: int | None
    eta_s: float | None
    last_loss: float | None
    started_at: str | None
    finished_at: str | None
    config_hash: str | None

    @property
    def progress(self) -> float:
        """Fraction of the pipeline done: finished stages, plus the training steps within `train`."""
        if self.status == "done":
            return 1.0
        done = STAGES.index(self.stage)
        within = self.step / self.total_steps if self.step and self.total_steps else 0.0
        return (done + (within if self.stage == "train" else 0.0)) / len(STAGES)


def is_run_dir(path: Path) -> bool:
    """A folder the pipeline or the dashboard wrote into (a stage folder or the dashboard's ui/)."""
    if not path.is_dir() or is_sweep_dir(path):
        return False
    return any((path / part).is_dir() for part in (*STAGES, "ui"))


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every run directly under `runs_dir`, newest first."""
    runs = [
        summarize_run(p)
        for p in runs_dir.iterdir()
        if RUN_NAME.match(p.name) and not p.is_symlink() and is_run_dir(p)
    ]
    return sorted(runs, key=lambda r: (r.started_at or "", r.name), reverse=True)


def summarize_run(run_dir: Path) -> RunSummary:
    manifests = {stage: read_manifest(run_dir / stage) for stage in STAGES}
    finished = [s for s in STAGES if manifests[s] is not None]
    stage = next((s for s in STAGES if manifests[s] is None), "report")
    launch = read_launch(run_dir) or {}
    tail = metrics_tail(run_dir)
    last = tail[-1] if tail else None
    total = total_steps(run_dir, manifests)
    status = run_status(run_dir, len(finished) == len(STAGES), launch)
    first = manifests[finished[0]] if finished else {}
    started = launch.get("started_at") or (first or {}).get("started_at")
    return RunSummary(
        name=run_dir.name,
        stage=stage,
        status=status,
        step=last["step"] if last else None,
        total_steps=total,
        eta_s=_eta(tail, total) if status == "running" and stage == "train" else None,
        last_loss=last.get("loss") if last else None,
        started_at=started,
        finished_at=(manifests["report"] or {}).get("finished_at") or launch.get("finished_at"),
        config_hash=next((m["config_hash"] for m in manifests.values() if m and m.get("config_hash")), None),
    )


def run_status(run_dir: Path, all_finished: bool, launch: dict[str, Any]) -> str:
    """running / done / failed / stopped.

    A run is stopped when it ended by a stop (SIGTERM: a checkpoint and exit 0 in training, the
    signal itself in other stages) or when nothing says how it ended (run from a terminal).
    """
    if is_running(run_dir):
        return "running"
    if all_finished:
        return "done"
    code = launch.get("returncode")
    if code is not None and code not in (0, -signal.SIGTERM):
        return "failed"
    return "stopped"


def total_steps(run_dir: Path, manifests: dict[str, dict[str, Any] | None]) -> int | None:
    """Training steps of the run: train.max_steps from the config, else what training printed."""
    if manifests.get("train"):
        return (manifests["train"].get("results") or {}).get("steps")
    cfg = config_from(manifests)
    if cfg and (cfg.get("train") or {}).get("max_steps"):
        return int(cfg["train"]["max_steps"])
    found = TOTAL_STEPS_IN_LOG.findall(log_tail(run_dir, 200_000))
    return int(found[-1]) if found else None


def metrics_tail(run_dir: Path, max_bytes: int = 8192) -> list[dict[str, Any]]:
    """The last training rows without reading the whole file (it grows by a line per step)."""
    path = run_dir / "train" / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - max_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []
    if size > max_bytes:
        lines = lines[1:]  # the first line read is probably cut
    return _parse_rows(lines)


def read_metrics(run_dir: Path, after: int = 0) -> list[dict[str, Any]]:
    """Training rows with step > `after`: step, loss and learning rate (what the live curves plot)."""
    path = run_dir / "train" / "metrics.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [
        {"step": row["step"], "loss": row.get("loss"), "lr": row.get("lr")}
        for row in _parse_rows(lines)
        if row["step"] > after
    ]


def _parse_rows(lines: list[str]) -> list[dict[str, Any]]:
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _eta(tail: list[dict[str, Any]], total: int | None) -> float | None:
    """Seconds left in training: the mean of the recent step times times the steps to go."""
    times = [r["step_seconds"] for r in tail[-20:] if isinstance(r.get("step_seconds"), int | float)]
    if not times or total is None:
        return None
    return max(0, total - tail[-1]["step"]) * sum(times) / len(times)


def read_quarantine(run_dir: Path, offset: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
    """A page of `prepare/quarantine.jsonl` (role, source, file, line, reason) and the total count."""
    path = run_dir / "prepare" / "quarantine.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return [], 0
    page = [json.loads(line) for line in lines[offset : offset + limit] if line.strip()]
    return page, len(lines)


def exports(run_dir: Path) -> list[str]:
    """Export folders (`export/<format>/`) that finished, by their verification file."""
    root = run_dir / "export"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "export.json").is_file())


def list_sweeps(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in runs_dir.iterdir() if RUN_NAME.match(p.name) and is_sweep_dir(p))


def sweep_view(sweep_dir: Path) -> dict[str, Any]:
    """Each cell's tuned model against the sweep's base, per group: the forgetting view across ratios.

    Rows are groups, columns are cells (ratio, seed); a cell is the group's paired delta vs the base
    (pp, bootstrap CI, McNemar p) from the cell's `eval/compare.json`, None where it has none.
    """
    record = read_json(sweep_dir / SWEEP_FILE) or {}
    cells = record.get("cells") or []
    compared = []
    for cell in cells:
        path = (sweep_dir / str(cell.get("compare", ""))).resolve()
        inside = path.is_relative_to(sweep_dir.resolve())
        compared.append(((read_json(path) if inside else None) or {}).get("groups") or {})
    groups = sorted({g for c in compared for g in c}, key=lambda g: (g != "all", g))
    return {
        "cells": [
            {"label": f"{c.get('ratio_label')} seed {c.get('seed')}", "status": c.get("status")}
            for c in cells
        ],
        "rows": [(g, [c.get(g) for c in compared]) for g in groups],
        "recommendation": record.get("recommendation"),
    }
