"""`medtune bench`: the efficiency matrix, every cell a few real training steps in a fresh process.

Cells cross {LoRA on unquantised weights, QLoRA NF4} x {padded, packed} x {gradient checkpointing
off, on} x {1 rank, 2 ranks FSDP}, plus chunked cross-entropy off/on when the vocabulary is large
enough for full logits to matter. Each cell trains in fresh processes (one spawned process, or
torchrun ranks for 2): peak memory is a per-process high-water mark, so cells sharing a process
would inherit each other's peaks, and a crashing cell (say, NF4 under FSDP on a CPU build of
bitsandbytes) is recorded instead of taking the matrix down.

Per cell, from `train/metrics.jsonl`: peak memory of rank 0 (CUDA allocator peak on GPU, peak RSS
on CPU), real (non-padding) tokens per second and step time as medians over the steps after the
first (the first pays for allocator warm-up and lazy initialisation), and the padding fraction
(1 - real tokens / token slots over all steps). The first cell is the baseline; every other cell is
also given as a ratio to it, because absolute timings only mean something on the machine that
measured them, in the same run.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from medtune.config import CHUNKED_CE_MIN_VOCAB, RunConfig, dump_config, load_config
from medtune.data.prepare import run_prepare
from medtune.errors import MedtuneError
from medtune.manifest import read_manifest, write_json_atomic
from medtune.offline import enforce_offline
from medtune.pipeline import run_stage, torchrun_train, train_stage

SMOKE_CELLS = ("lora-padded-gc0-r1", "lora-packed-gc0-r1", "qlora-packed-gc0-r1", "lora-packed-gc1-r1")
RATIO_KEYS = ("peak_memory_bytes", "tokens_per_s", "step_seconds")


@dataclass(frozen=True)
class BenchCell:
    """One matrix cell: a name that says what it is, the config keys it sets, and how many ranks."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1


def matrix_cells(
    kind: Literal["full", "smoke"] = "full",
    vocab_size: int | None = None,
    chunked_ce_cells: bool | None = None,
) -> list[BenchCell]:
    """The cells to run, baseline first (LoRA, padded, no checkpointing, 1 rank: the naive setup).

    `chunked_ce_cells=None` adds the chunked-CE pair only when `vocab_size` is large.
    """
    cells = []
    for quant, packing, gc, nproc in itertools.product(
        ("none", "nf4"), ("padded", "packed"), (False, True), (1, 2)
    ):
        name = f"{'qlora' if quant == 'nf4' else 'lora'}-{packing}-gc{int(gc)}-r{nproc}"
        cells.append(
            BenchCell(
                name,
                {
                    "quantization.mode": quant,
                    "packing.mode": packing,
                    "train.gradient_checkpointing": gc,
                    "distributed.nproc": nproc,
                },
                nproc,
            )
        )
    if kind == "smoke":
        by_name = {c.name: c for c in cells}
        return [by_name[n] for n in SMOKE_CELLS]
    if chunked_ce_cells or (chunked_ce_cells is None and (vocab_size or 0) >= CHUNKED_CE_MIN_VOCAB):
        base = {
            "quantization.mode": "nf4",
            "packing.mode": "packed",
            "train.gradient_checkpointing": True,
            "distributed.nproc": 1,
        }
        cells += [
            BenchCell(f"qlora-packed-gc1-r1-ce_{mode}", {**base, "train.chunked_ce": mode})
            for mode in ("off", "on")
        ]
    return cells


def summarize_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-cell figures from one run's metrics.jsonl rows (see the module docstring for definitions)."""
    if not rows:
        raise ValueError("no metrics rows: the cell logged no training step")
    timed = rows[1:] or rows
    slots = sum(r["slots"] for r in rows)
    return {
        "steps": len(rows),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in rows),
        "tokens_per_s": median(r["tokens_per_s"] for r in timed),
        "step_seconds": median(r["step_seconds"] for r in timed),
        "padding_fraction": 1 - sum(r["real_tokens"] for r in rows) / slots if slots else None,
        "real_tokens_per_step": median(r["real_tokens"] for r in rows),
        "final_loss": rows[-1]["loss"],
    }


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Give every ok cell `ratios` to the first cell (the baseline); none when the baseline failed."""
    base = results[0] if results and results[0]["status"] == "ok" else None
    for r in results:
        if r["status"] != "ok" or base is None:
            r["ratios"] = None
            continue
        r["ratios"] = {
            key.removesuffix("_bytes"): (r[key] / base[key] if base[key] else None) for key in RATIO_KEYS
        }


def run_bench(
    cfg: RunConfig,
    out_dir: Path,
    steps: int = 5,
    cells: Literal["full", "smoke"] = "full",
    chunked_ce_cells: bool | None = None,
    timeout_s: int = 1800,
    threads_per_rank: int | None = None,
) -> dict[str, Any]:
    """Run the matrix on `cfg`'s data and model; write `out_dir/bench.json`, print a table, return it.

    `threads_per_rank` sets OMP_NUM_THREADS in every cell (default: CPU cores / ranks, so every cell
    gets the same CPU budget; 1 gives steadier timings on a machine shared with other jobs).
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "bench_config.yaml"
    config_path.write_text(dump_config(cfg), encoding="utf-8")  # paths are absolute once resolved
    prepared = _shared_prepare(cfg, out_dir)
    plan = matrix_cells(cells, _vocab_size(cfg.model.path), chunked_ce_cells)
    result: dict[str, Any] = {
        "machine": machine_description(),
        "steps": steps,
        "kind": cells,
        "baseline": plan[0].name,
        "model": str(cfg.model.path),
        "config_hash": cfg.config_hash(),
        "complete": False,
        "cells": [],
    }
    for cell in plan:
        print(f"bench: cell {cell.name} ({steps} steps, {cell.nproc} rank(s))", flush=True)
        env = _child_env(cell.nproc, threads_per_rank)
        result["cells"].append(
            _run_cell(cell, config_path, prepared, out_dir / "cells" / cell.name, steps, timeout_s, env)
        )
        add_ratios(result["cells"])
        write_json_atomic(
            out_dir / "bench.json", result
        )  # after every cell: a killed bench keeps its figures
    result["complete"] = True
    write_json_atomic(out_dir / "bench.json", result)
    Console().print(bench_table(result))
    return result


def _shared_prepare(cfg: RunConfig, out_dir: Path) -> Path:
    """The prepared data every cell trains on: the run's own if this very config finished it, else
    prepared once under `out_dir` (redone there when an earlier bench prepared another config)."""
    existing = cfg.output.dir / "prepare"
    if (read_manifest(existing) or {}).get("config_hash") == cfg.config_hash():
        return existing
    own = cfg.model_copy(deep=True)
    own.output.dir = out_dir
    run_stage("prepare", own, lambda out: run_prepare(own, out), force=True)
    return out_dir / "prepare"


def _run_cell(
    cell: BenchCell,
    config_path: Path,
    prepared: Path,
    cell_dir: Path,
    steps: int,
    timeout_s: int,
    env: dict[str, str],
) -> dict[str, Any]:
    cell_dir.mkdir(parents=True, exist_ok=True)
    link = cell_dir / "prepare"
    if link.is_symlink() and link.resolve() != prepared.resolve():
        link.unlink()  # from a bench that prepared elsewhere
    if not link.exists():
        link.symlink_to(prepared, target_is_directory=True)
    overrides = {
        **cell.overrides,
        "output.dir": str(cell_dir),
        "train.max_steps": steps,
        "train.log_every": 1,
        "train.save_every": None,
    }
    record: dict[str, Any] = {
        "name": cell.name,
        "nproc": cell.nproc,
        "settings": cell.overrides,
        "threads_per_rank": int(env["OMP_NUM_THREADS"]),
        "status": "ok",
        "error": None,
        "log": str(cell_dir / "train.log"),
    }
    _clear_previous(cell_dir / "train")
    try:
        _train_in_fresh_processes(cell.nproc, config_path, overrides, cell_dir / "train.log", env, timeout_s)
        record.update(summarize_metrics(_read_metrics(cell_dir / "train" / "metrics.jsonl")))
    except (MedtuneError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        record.update(status="failed", error=f"{exc}: {_log_tail(cell_dir / 'train.log')}"[:600])
    return record


def _train_in_fresh_processes(
    nproc: int,
    config_path: Path,
    overrides: dict[str, Any],
    log_path: Path,
    env: dict[str, str],
    timeout_s: int,
) -> None:
    """Train one cell in new processes: torchrun ranks for nproc > 1, else one spawned process."""
    with open(log_path, "w", encoding="utf-8") as log:
        if nproc > 1:
            # JSON is YAML: true/null/strings parse back exactly
            sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
            torchrun_train(nproc, config_path, sets, log=log, env=env, timeout_s=timeout_s)
            return
    cell_cfg = load_config(config_path, overrides)
    proc = multiprocessing.get_context("spawn").Process(
        target=_train_child, args=(cell_cfg, str(log_path), env["OMP_NUM_THREADS"])
    )
    proc.start()
    proc.join(timeout_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise RuntimeError(f"timed out after {timeout_s} s")
    if proc.exitcode != 0:
        raise RuntimeError(f"exit code {proc.exitcode}")


def _train_child(cfg: RunConfig, log_path: str, threads: str) -> None:
    """A spawned cell: its own thread budget (set before torch loads) and its output in the cell log."""
    os.environ["OMP_NUM_THREADS"] = threads
    enforce_offline()
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    train_stage(cfg)


def _clear_previous(train_dir: Path) -> None:
    """A cell is always measured from step 0: old checkpoints would make `train` refuse or resume."""
    import shutil

    if train_dir.exists():
        shutil.rmtree(train_dir)


def _child_env(nproc: int, threads_per_rank: int | None) -> dict[str, str]:
    """The same CPU budget for every cell: left alone, torchrun gives each rank OMP_NUM_THREADS=1
    while a 1-rank cell takes every core, and the two would not be comparable."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["OMP_NUM_THREADS"] = str(threads_per_rank or max(1, (os.cpu_count() or 1) // nproc))
    return env


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _log_tail(path: Path, lines: int = 6) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    return " | ".join(line.strip() for line in text[-lines:])


def _vocab_size(model_path: Path) -> int | None:
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None
    data = json.loads(config.read_text(encoding="utf-8"))
    return data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")


def machine_description() -> str:
    """One line naming the hardware the numbers came from (GPU model, or CPU and core count)."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU only ({cpu}, {os.cpu_count()} cores, {platform.system()}), torch {torch.__version__}"


def bench_table(result: dict[str, Any]) -> Table:
    """The matrix as a rich table: absolute figures, then ratios to the baseline."""
    table = Table(title=f"efficiency matrix, {result['steps']} steps/cell, {result['machine']}")
    for col in (
        "cell",
        "peak mem MiB (rank 0)",
        "tokens/s",
        "padding",
        "step s",
        "mem ×",
        "tok/s ×",
        "step ×",
    ):
        table.add_column(col, justify="left" if col == "cell" else "right")
    for r in result["cells"]:
        if r["status"] != "ok":
            failure = Text(f"failed: {(r['error'] or '')[:60]}")  # an error text, not rich markup
            table.add_row(r["name"], failure, *[""] * 6, style="red")
            continue
        ratios = r["ratios"] or {}
        table.add_row(
            r["name"],
            f"{r['peak_memory_bytes'] / 2**20:.0f}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['padding_fraction']:.1%}",
            f"{r['step_seconds']:.3f}",
            *[_ratio(ratios.get(k)) for k in ("peak_memory", "tokens_per_s", "step_seconds")],
        )
    return table


def _ratio(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"
