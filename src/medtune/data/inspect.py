"""`medtune data inspect`: what the configured data looks like before anything is trained on it.

Runs the same read -> validate -> scrub -> dedupe -> contamination filters as `prepare` (so the
numbers are the ones prepare would act on) into a temporary folder, then reports counts per
source, language and subject, length histograms and what each filter removed. Nothing is mixed.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from medtune.config import RunConfig
from medtune.data.collect import SPOOL, collect
from medtune.data.manifest import FLOW_KEYS, write_json
from medtune.data.prepare import training_text
from medtune.data.schema import Record

BIN_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def length_counter(model_path: Path) -> tuple[str, Callable[[str], int]]:
    """("tokens", tokenizer length) when the model folder has a tokenizer, else ("words", split)."""
    if (model_path / "tokenizer.json").is_file() or (model_path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
        return "tokens", lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    return "words", lambda text: len(text.split())


def histogram(lengths: list[int]) -> dict[str, Any]:
    """Counts per power-of-two bin plus min/median/p95/max."""
    if not lengths:
        return {"n": 0}
    arr = np.asarray(lengths)
    edges = [*BIN_EDGES, max(int(arr.max()) + 1, BIN_EDGES[-1] + 1)]
    counts, _ = np.histogram(arr, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return {
        "n": int(arr.size),
        "min": int(arr.min()),
        "median": float(np.median(arr)),
        "p95": float(np.percentile(arr, 95)),
        "max": int(arr.max()),
        "bins": {label: int(c) for label, c in zip(labels, counts, strict=True) if c},
    }


def _describe(records: Iterable[Record], measure: Callable[[str], int]) -> dict[str, Any]:
    by_source: dict[str, list[int]] = defaultdict(list)
    languages: dict[str, Counter[str]] = defaultdict(Counter)
    subjects: dict[str, Counter[str]] = defaultdict(Counter)
    tags: Counter[str] = Counter()
    for rec in records:
        by_source[rec["source"]].append(measure(training_text(rec)))
        languages[rec["source"]][rec["language"]] += 1
        subjects[rec["source"]][rec["subject"] or "-"] += 1
        tags.update(rec["tags"])
    return {
        s: {
            "languages": dict(sorted(languages[s].items())),
            "subjects": dict(sorted(subjects[s].items())),
            "length": histogram(by_source[s]),
        }
        for s in sorted(by_source)
    } | ({"_tags": dict(sorted(tags.items()))} if tags else {})


def run_inspect(cfg: RunConfig, out_json: Path | None = None, console: Console | None = None) -> dict:
    """Counts, lengths and filter figures for every configured source; prints tables, writes JSON."""
    unit, measure = length_counter(cfg.model.path)
    with tempfile.TemporaryDirectory(prefix="medtune-inspect-") as tmp:
        got = collect(cfg, Path(tmp))
        with (Path(tmp) / SPOOL).open(encoding="utf-8") as spool:
            train = _describe((json.loads(line) for line in spool), measure)
        pii: Counter[str] = Counter()
        for c in got.counts.values():
            pii.update(c.pii)
        report = {
            "length_unit": unit,
            "sources": {name: c.to_json() for name, c in sorted(got.counts.items())},
            "train": train,
            "eval": _describe(got.eval_records, measure),
            "pii": dict(sorted(pii.items())),
            "contamination": got.contamination,
        }
    _print(report, console or Console())
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(out_json), report)
    return report


def _print(report: dict[str, Any], console: Console) -> None:
    console.print(_sources_table(report))
    unit = report["length_unit"]
    lt = Table(title=f"Lengths ({unit}, question + options + answer + explanation / prompt + response)")
    for col in ("split", "source", "n", "min", "median", "p95", "max"):
        lt.add_column(col, justify="left" if col in ("split", "source") else "right")
    for split in ("train", "eval"):
        for source, d in report[split].items():
            if source.startswith("_") or not d["length"].get("n"):
                continue
            h = d["length"]
            lt.add_row(
                split,
                Text(source),
                str(h["n"]),
                str(h["min"]),
                f"{h['median']:.0f}",
                f"{h['p95']:.0f}",
                str(h["max"]),
            )
    console.print(lt)
    if report["contamination"]:
        ct = Table(title="Contamination (training records overlapping each eval source)")
        for col in ("eval source", "eval items", "train records overlapping", "eval items overlapped"):
            ct.add_column(col)
        for s, d in report["contamination"].items():
            ct.add_row(
                s, str(d["eval_items"]), str(d["train_records_overlapping"]), str(d["eval_items_overlapped"])
            )
        console.print(ct)
    console.print(f"PII replaced in training text: {report['pii'] or 'none found'}")


def _sources_table(report: dict[str, Any]) -> Table:
    t = Table(title="Sources: where every record went")
    for col in ("source", "in", "quarantined", "dup exact", "dup near", "contaminated", "kept", "languages"):
        t.add_column(col, justify="left" if col in ("source", "languages") else "right")
    for name, c in report["sources"].items():
        langs = ", ".join(f"{k} {v}" for k, v in c["languages"].items())
        # a user's source name, not rich markup
        t.add_row(Text(name), *(str(c[k]) for k in FLOW_KEYS), langs)
    return t
