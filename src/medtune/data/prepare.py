"""The `prepare` stage: sources -> validated, scrubbed, deduplicated, decontaminated, mixed JSONL.

`collect.py` reads and filters every source in a fixed order (eval first, then each training record
validated, language-tagged, PII-scrubbed, deduplicated, checked for contamination) and spools the
survivors to disk; this module mixes them, writes train.jsonl by streaming the spool once, and
writes the manifest, whose per-source counts add up to every record read.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from medtune.config import RunConfig
from medtune.data.collect import SPOOL, Candidates, TokenCounter, collect, dump_line
from medtune.data.langid import record_text
from medtune.data.manifest import FLOW_KEYS, MANIFEST_NAME, SourceCounts, output_hashes, write_json
from medtune.data.mix import plan_mix
from medtune.data.read import named_sources, source_name
from medtune.data.schema import Record
from medtune.errors import DataError, RunDirError

OUTPUTS = [
    "train.jsonl",
    "eval.jsonl",
    "quarantine.jsonl",
    "duplicates.jsonl",
    "contaminated.jsonl",
    "recurring_stems.jsonl",
]


def training_text(record: Record) -> str:
    """What a record contributes to the model's context, for token counts."""
    extra = [record.get("answer") or "", record.get("explanation") or "", record.get("context") or ""]
    return "\n".join([record_text(record), *[e for e in extra if e]])


def tokenizer_counter(model_path: Path) -> TokenCounter:
    """Token counts from the model's own tokenizer (a local directory; never a download)."""
    from transformers import AutoTokenizer

    if not (model_path / "config.json").is_file() and not (model_path / "tokenizer.json").is_file():
        raise DataError(f"model.path {model_path}: no tokenizer there, needed for data.mix.by: tokens")
    tok = AutoTokenizer.from_pretrained(str(model_path), local_files_only=True)
    return lambda record: len(tok(training_text(record), add_special_tokens=False)["input_ids"])


def _write_train(
    out_dir: Path, cands: Candidates, chosen: list[int], counts: dict[str, SourceCounts]
) -> None:
    """Stream the spool once, writing each chosen candidate (repeats get `#2`, `#3`... id suffixes)."""
    repeats = Counter(chosen)
    with (out_dir / SPOOL).open("rb") as spool, (out_dir / "train.jsonl").open("wb") as out:
        for i in sorted(repeats):
            spool.seek(cands.offsets[i])
            line = spool.readline()
            out.write(line)
            counts[f"train/{cands.sources[i]}"].mixed += repeats[i]
            if repeats[i] > 1:
                rec = json.loads(line)
                base = rec["id"]
                for k in range(2, repeats[i] + 1):
                    rec["id"] = f"{base}#{k}"
                    out.write(dump_line(rec).encode("utf-8"))
    (out_dir / SPOOL).unlink()


def run_prepare(cfg: RunConfig, out_dir: Path, count_tokens: TokenCounter | None = None) -> dict:
    """Run the whole stage into `out_dir`; returns the manifest (also written as manifest.json)."""
    out_dir = Path(out_dir)
    if count_tokens is None and cfg.data.mix.by == "tokens" and cfg.data.mix.ratio:
        count_tokens = tokenizer_counter(cfg.model.path)
    got = collect(cfg, out_dir, count_tokens)
    cands = got.candidates
    weights = (
        np.frombuffer(cands.tokens, dtype=np.int64)
        if cfg.data.mix.by == "tokens"
        else np.ones(len(cands.languages), dtype=np.int64)
    )
    _warn_empty_sources(cfg, got.counts)
    if cfg.data.train and not cands.languages:
        raise DataError(_nothing_survived(cfg, got.counts))
    # An eval-only config (e.g. to score a base model) has nothing to mix.
    mix_cfg = cfg.data.mix if cfg.data.train else cfg.data.mix.model_copy(update={"ratio": None})
    mix = plan_mix(cands.languages, cands.strata, weights, mix_cfg, cfg.seed)
    _write_train(out_dir, cands, mix.indices, got.counts)
    with (out_dir / "eval.jsonl").open("w", encoding="utf-8") as f:
        for rec in got.eval_records:
            f.write(dump_line(rec))
    manifest = {
        "stage": "prepare",
        "seed": cfg.seed,
        "config_hash": cfg.config_hash(),
        "sources": {name: c.to_json() for name, c in sorted(got.counts.items())},
        "totals": _totals(got.counts, len(mix.indices), len(got.eval_records)),
        "mix": {
            "by": cfg.data.mix.by,
            "ratio": cfg.data.mix.ratio,
            "target_share": mix.target_share,
            "achieved_share": mix.achieved_share,
            "weight_per_language": mix.weight_per_language,
            "excluded_languages": mix.excluded,
            "total_reduced": mix.total_reduced,
        },
        "contamination": {
            "action": cfg.data.contamination.action,
            "per_eval_source": got.contamination,
            "recurring_stems": {
                "action": cfg.data.contamination.recurring_stems,
                "file": "recurring_stems.jsonl",
                **got.recurring_stems,
            },
        },
        "files": output_hashes(out_dir, OUTPUTS),
    }
    write_json(out_dir / MANIFEST_NAME, manifest)
    return manifest


def _source_paths(cfg: RunConfig) -> dict[str, Path]:
    """`role/name` (the key of manifest["sources"]) -> the file or folder it was read from."""
    roles = (("eval", cfg.data.eval), ("train", cfg.data.train))
    return {
        f"{role}/{source_name(src)}": src.path
        for role, sources in roles
        for src in named_sources(sources, f"data.{role}")
    }


def _losses(c: SourceCounts) -> str:
    """Where one source's records went instead of the output, top quarantine reasons first."""
    parts = []
    if c.quarantined:
        top = ", ".join(f"{reason!r} x{n}" for reason, n in c.quarantine_reasons.most_common(3))
        first = c.quarantine_examples[c.quarantine_reasons.most_common(1)[0][0]]
        parts.append(f"{c.quarantined} quarantined (top reasons: {top}; first: {first})")
    if c.deduplicated:
        parts.append(f"{c.deduplicated} duplicates")
    if c.contaminated_removed:
        parts.append(f"{c.contaminated_removed} removed as eval contamination")
    return "; ".join(parts) or "no records in it"


def _warn_empty_sources(cfg: RunConfig, counts: dict[str, SourceCounts]) -> None:
    """A source that contributes nothing is usually a wrong path, format or split: say so on stderr."""
    paths = _source_paths(cfg)
    for key, c in counts.items():
        if c.kept == 0:
            print(
                f"warning: {c.role} source {key.split('/', 1)[1]!r} ({paths.get(key, '?')}): 0 of "
                f"{c.records_in} records kept; {_losses(c)}",
                file=sys.stderr,
                flush=True,
            )


def _nothing_survived(cfg: RunConfig, counts: dict[str, SourceCounts]) -> str:
    """The error text: a failed prepare leaves no quarantine.jsonl to look at, so it says it all."""
    paths = _source_paths(cfg)
    per_source = [
        f"{key.split('/', 1)[1]} ({paths.get(key, '?')}): {c.records_in} read, {_losses(c)}"
        for key, c in counts.items()
        if c.role == "train"
    ]
    return (
        "data.train: no training record survived the filters. "
        + " | ".join(per_source)
        + ". Check each source's path, format and split (`medtune data inspect` shows the figures)."
    )


SUMMARY_COLUMNS = (
    ("in", "records_in"),
    ("kept", "kept"),
    ("quarantined", "quarantined"),
    ("deduplicated", "deduplicated"),
    ("contamination removed", "contaminated_removed"),
    ("in train.jsonl", "mixed"),
)


def source_table(manifest: dict[str, Any]) -> Table:
    """Per source, where its records went (in = kept + quarantined + deduplicated + removed)."""
    table = Table(title="prepare: records per source")
    table.add_column("source")
    table.add_column("role")
    for title, _ in SUMMARY_COLUMNS:
        table.add_column(title, justify="right")
    sources = manifest["sources"]
    for key, c in sources.items():
        mixed_is_meaningful = c["role"] == "train"
        cells = [f"{c[k]:,}" if k != "mixed" or mixed_is_meaningful else "" for _, k in SUMMARY_COLUMNS]
        name = Text(key.split("/", 1)[1])  # a user's source name, not rich markup
        table.add_row(name, c["role"], *cells, style=None if c["kept"] else "red")
    totals = [f"{sum(c[k] for c in sources.values()):,}" for _, k in SUMMARY_COLUMNS]
    table.add_row("all", "", *totals, style="bold")
    return table


def _totals(counts: dict[str, SourceCounts], train_n: int, eval_n: int) -> dict[str, Any]:
    pii: Counter[str] = Counter()
    for c in counts.values():
        pii.update(c.pii)
    return {
        **{k: sum(getattr(c, k) for c in counts.values()) for k in FLOW_KEYS},
        "train_records": train_n,
        "eval_records": eval_n,
        "pii": dict(sorted(pii.items())),
    }


def read_prepared(prepare_dir: Path, split: str) -> Iterator[Record]:
    """Records of `train` or `eval` from a prepare directory, streamed in file order."""
    path = Path(prepare_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise RunDirError(f"{path}: not found; run `medtune prepare` first (split must be train or eval)")
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
