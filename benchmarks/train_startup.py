"""How long `train` takes to have its data ready, and how much memory the data holds per rank.

Data: the quick-start's bundled records (Korean and English MCQA and instructions, normalised as
`prepare` writes them) replicated to N training records, with a manifest holding train.jsonl's
sha256 as `prepare` writes it. Tokenizer: Gemma 3's (262k vocabulary), as in the scale issue.
Each measurement runs in a fresh subprocess, so its RSS is its own:

  today:  `format.tokenize_example` of every record into Python lists (what `train` did before the
          store, on every rank at every start), then the lengths;
  build:  `train.data.tokenized_examples` with no store yet: builds prepare/tokens/<key>/ on every core;
  start:  `train.data.tokenized_examples` again: finds the store, maps it, reads the lengths.

"data RSS" is the resident-set growth across that step (after imports, and after loading the
tokenizer where the step needs one); for the store it counts the mapped index pages it touched.
The row plan (`packing.build_rows`, the same on both paths) is timed apart. CPU seconds include the
build's worker processes; on the shared 2-core machine wall time includes waiting for other jobs.

    python benchmarks/train_startup.py --records 100000 [--today-records 20000] [--tile]

`--today-records` measures today's path on fewer records and scales its time and RSS linearly to N
(both grow linearly: one pass, one list per example); the table marks such rows. `--tile` skips
the build: it writes the store by repeating the distinct records' store (the same bytes, checked
against a real build) and times only the start, for a 1M start-up check in minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "train_startup.json"
MODELS = Path(os.environ.get("MEDTUNE_MODELS_DIR", REPO / "models"))
SOURCES = [
    ("kormedmcqa", "kormedmcqa", "train"),
    ("medqa/train.jsonl", "medqa", None),
    ("genmedgpt/GenMedGPT-5k-ko.csv", "genmedgpt", None),
    ("genmedgpt/chatdoctor5k.json", "genmedgpt", None),
]


def bundled_records() -> list[dict]:
    """The bundled records, normalised as `prepare` writes them."""
    from medtune.config import SourceConfig
    from medtune.data.read import iter_source

    records = []
    for path, fmt, split in SOURCES:
        src = SourceConfig(path=REPO / "examples" / "data" / path, format=fmt, split=split)
        records += [r for r in iter_source(src, "train") if isinstance(r, dict)]
    return records


def write_prepared(folder: Path, n: int) -> None:
    """train.jsonl with n records (the bundled ones, cycled, ids made unique) and its manifest."""
    from medtune.data.manifest import output_hashes, write_json

    records = bundled_records()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i in range(n):
            rec = dict(records[i % len(records)], id=f"{records[i % len(records)]['id']}#{i}")
            f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
    write_json(folder / "manifest.json", {"files": output_hashes(folder, ["train.jsonl"])})


def bench_config(prepare: Path, model: Path) -> Any:
    """Default settings (template auto, 1024-token rows); a source is required, the data is prepare's."""
    from medtune.config import validate_config

    train = [{"path": str(prepare / "train.jsonl")}]
    return validate_config({"model": {"path": str(model)}, "data": {"train": train}})


def tile_store(prepare: Path, model: Path, n: int) -> None:
    """The store a build over `prepare` would write, made by repeating the distinct records' store.

    Record i is bundled record i % m with another id, and ids do not reach the tokens, so repeating
    the m distinct examples' ids gives the same bytes as tokenising all n (hours at 1M on 2 cores).
    """
    from medtune.data.token_store import (
        ensure_token_store,
        open_token_store,
        store_inputs,
        store_path,
        write_token_store,
    )

    distinct = prepare.parent / "distinct"
    m = len(bundled_records())
    write_prepared(distinct, m)
    cfg = bench_config(distinct, model)
    small, _ = ensure_token_store(
        distinct, cfg.model, cfg.format, store_inputs(distinct, cfg.model, cfg.format)
    )
    store = open_token_store(small)
    whole = (np.asarray(store.ids), store.lengths, np.asarray(store.prompt_tokens))
    rest = n % m
    tail = (store.ids[: store.offsets[rest]], store.lengths[:rest], store.prompt_tokens[:rest])
    inputs = store_inputs(prepare, cfg.model, cfg.format)
    write_token_store(store_path(prepare, inputs), inputs, [*([whole] * (n // m)), tail])


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(step: str, prepare: Path, model: Path, limit: int | None) -> dict[str, Any]:
    """One step in this process: wall s, CPU s, data RSS growth, examples, and the row plan's time."""
    from medtune.data.prepare import read_prepared
    from medtune.format import tokenize_example
    from medtune.model.load import load_tokenizer
    from medtune.packing import build_rows
    from medtune.train.data import tokenized_examples
    from medtune.train.distributed import init_distributed

    cfg = bench_config(prepare, model)
    tokenizer = load_tokenizer(cfg.model) if step == "today" else None
    rss0, wall0, cpu0 = rss_bytes(), time.perf_counter(), cpu_seconds()
    if step == "today":
        records = islice(read_prepared(prepare, "train"), limit)
        examples = [tokenize_example(r, tokenizer, cfg.format) for r in records]
        examples = [e for e in examples if any(label != -100 for label in e["labels"])]
        lengths = [len(e["input_ids"]) for e in examples]
    else:
        examples, _ = tokenized_examples(cfg, prepare, init_distributed(cfg.distributed))
        lengths = examples.lengths()
    wall, cpu, rss = time.perf_counter() - wall0, cpu_seconds() - cpu0, rss_bytes() - rss0
    plan0 = time.perf_counter()
    build_rows(lengths, cfg.packing, cfg.seed, 0)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "data_rss_bytes": rss,
        "examples": len(examples),
        "tokens": sum(lengths),
        "row_plan_s": time.perf_counter() - plan0,
    }


def run_step(step: str, prepare: Path, model: Path, limit: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", step, "--prepare", str(prepare), "--model", str(model)]
    out = subprocess.run([*cmd, "--limit", str(limit)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def store_bytes(prepare: Path) -> int:
    (store,) = (prepare / "tokens").iterdir()
    return sum(p.stat().st_size for p in store.iterdir())


def machine() -> dict[str, Any]:
    return {
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_end": round(os.getloadavg()[0], 1),
        "note": "shared 2-core build machine with other jobs running: compare CPU seconds",
    }


def report(n: int, today_n: int, rows: dict[str, dict[str, Any]], disk: int, model: Path) -> dict[str, Any]:
    scale = n / today_n
    today = dict(rows["today"])
    for key in ("wall_s", "cpu_s", "data_rss_bytes", "tokens"):
        today[key] *= scale
    if scale != 1:  # the row plan is not linear in N, and is the same on both paths anyway
        today["row_plan_s"] = None
    rows = {**rows, "today": today}
    tokens = rows["start"]["tokens"]
    print(f"train start-up: {n:,} records, {tokens:,} tokens, tokenizer {model.name} | {machine()}")
    note = f" ({today_n:,}, scaled)" if scale != 1 else ""
    print(f"{'step':<46} {'wall s':>8} {'CPU s':>8} {'data RSS MB':>12} {'row plan s':>11}")
    labels = {
        "today": f"today: tokenise into lists{note}",
        "build": "store: build",
        "start": "store: start from it" + ("" if "build" in rows else " (made by --tile)"),
    }
    for name, label in labels.items():
        if name not in rows:
            continue
        r = rows[name]
        plan = "-" if r["row_plan_s"] is None else f"{r['row_plan_s']:.1f}"
        print(
            f"{label:<46} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} "
            f"{r['data_rss_bytes'] / 2**20:>12.1f} {plan:>11}"
        )
    ratio = rows["start"]["data_rss_bytes"] / today["data_rss_bytes"]
    print(
        f"store on disk {disk / 2**20:,.0f} MB = {disk / tokens:.2f} bytes/token; data RSS per rank "
        f"{ratio:.1%} of today's; today's {today['data_rss_bytes'] / tokens:.1f} bytes/token"
    )
    return {
        "records": n,
        "today_measured_on": today_n,
        "tokenizer": model.name,
        "machine": machine(),
        "tokens": tokens,
        "steps": rows,
        "store_bytes": disk,
        "store_bytes_per_token": disk / tokens,
        "data_rss_ratio_store_to_today": ratio,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--today-records", type=int, default=None, help="records for today's path (default: all)")
    ap.add_argument("--model", type=Path, default=MODELS / "gemma3-270m")
    ap.add_argument("--tile", action="store_true", help="make the store by repetition; time only the start")
    ap.add_argument("--measure", choices=["today", "build", "start"], help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.prepare, args.model, args.limit)))
        return
    today_n = min(args.today_records or args.records, args.records)
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        prepare = Path(tmp) / "prepare"
        write_prepared(prepare, args.records)
        if args.tile:
            tile_store(prepare, args.model, args.records)
        steps = ("start",) if args.tile else ("build", "start")
        rows = {step: run_step(step, prepare, args.model, today_n) for step in steps}
        rows["today"] = run_step("today", prepare, args.model, today_n)
        result = report(args.records, today_n, rows, store_bytes(prepare), args.model)
    suffix = "" if args.records == 100_000 else f"_{args.records}"
    path = RESULTS.with_name(f"train_startup{suffix}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
