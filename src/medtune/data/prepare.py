"""The `prepare` stage: sources -> validated, scrubbed, deduplicated, decontaminated, mixed JSONL.

Order matters and is fixed: eval sources are read first (they seed the contamination index and
are never scrubbed or mixed); each training record is then validated, language-tagged, PII-scrubbed
(before dedupe, so two copies that differ only by a phone number are one item), deduplicated,
checked for contamination, and spooled to disk. Only compact per-record arrays stay in memory
until the mixer has chosen; train.jsonl is then written by streaming the spool once.
"""

from __future__ import annotations

import json
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from medtune.config import RunConfig, SourceConfig
from medtune.data.contamination import ContaminationIndex
from medtune.data.dedupe import Deduper
from medtune.data.langid import record_language, record_text
from medtune.data.manifest import MANIFEST_NAME, SourceCounts, output_hashes, reason_class, write_json
from medtune.data.mix import plan_mix
from medtune.data.pii import scrub_record
from medtune.data.read import iter_source, named_sources, source_name
from medtune.data.schema import Record
from medtune.data.validate import DuplicateIds, Rejected, RowError, check_field_lengths
from medtune.errors import DataError, RunDirError

OUTPUTS = [
    "train.jsonl",
    "eval.jsonl",
    "quarantine.jsonl",
    "duplicates.jsonl",
    "contaminated.jsonl",
    "recurring_stems.jsonl",
]
SPOOL = "train.candidates.jsonl"
TokenCounter = Callable[[Record], int]


def dump_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


@dataclass
class Candidates:
    """Per training candidate: where its JSON line is in the spool, and what the mixer needs."""

    offsets: array = field(default_factory=lambda: array("q"))
    languages: list[str] = field(default_factory=list)
    strata: list[str] = field(default_factory=list)
    tokens: array = field(default_factory=lambda: array("q"))
    sources: list[str] = field(default_factory=list)


@dataclass
class Collected:
    """Everything the filters produced, before mixing (also what `data inspect` reports on)."""

    counts: dict[str, SourceCounts]
    candidates: Candidates
    eval_records: list[Record]
    contamination: dict[str, dict[str, int]]
    recurring_stems: dict[str, Any]


class _Sinks:
    """The side files every filter writes what it removed to (nothing is dropped silently)."""

    def __init__(self, out_dir: Path) -> None:
        self.quarantine: IO[str] = (out_dir / "quarantine.jsonl").open("w", encoding="utf-8")
        self.duplicates: IO[str] = (out_dir / "duplicates.jsonl").open("w", encoding="utf-8")
        self.contaminated: IO[str] = (out_dir / "contaminated.jsonl").open("w", encoding="utf-8")
        self.recurring: IO[str] = (out_dir / "recurring_stems.jsonl").open("w", encoding="utf-8")
        self.spool: IO[bytes] = (out_dir / SPOOL).open("wb")

    def close(self) -> None:
        for f in (self.quarantine, self.duplicates, self.contaminated, self.recurring, self.spool):
            f.close()


def _progress() -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,} records"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def _validated(
    src: SourceConfig, role: str, cfg: RunConfig, ids: DuplicateIds, counts: SourceCounts, sinks: _Sinks
) -> Iterator[Record]:
    """Valid, language-tagged records of one source; rejects go to the quarantine as they come."""
    for item in iter_source(src, role, cfg.data.min_question_chars):
        if src.limit is not None and counts.records_in - counts.quarantined >= src.limit:
            return
        counts.records_in += 1
        if not isinstance(item, Rejected):
            try:
                check_field_lengths(item, cfg.data.max_field_chars)  # before its id is taken
                ids.check(item)
            except RowError as exc:
                item = Rejected(
                    item["source"],
                    item["provenance"]["file"],
                    item["provenance"]["line"],
                    str(exc),
                    item["id"],
                )
        if isinstance(item, Rejected):
            counts.quarantined += 1
            kind = reason_class(item.reason)
            counts.quarantine_reasons[kind] += 1
            counts.quarantine_examples.setdefault(kind, f"{item.file}:{item.line}: {item.reason}")
            sinks.quarantine.write(dump_line({"role": role, **item.to_json()}))
            continue
        item["language"] = src.language if src.language != "auto" else record_language(item)  # type: ignore[typeddict-item]
        yield item


def _duplicate(record: Record, deduper: Deduper, counts: SourceCounts, sinks: _Sinks, role: str) -> bool:
    found = deduper.check(record)
    if found is None:
        return False
    kind, first = found
    if kind == "exact":
        counts.duplicates_exact += 1
    else:
        counts.duplicates_near += 1
    sinks.duplicates.write(
        dump_line(
            {
                "role": role,
                "id": record["id"],
                "kind": kind,
                "duplicate_of": first,
                "file": record["provenance"]["file"],
                "line": record["provenance"]["line"],
            }
        )
    )
    return True


def collect(cfg: RunConfig, out_dir: Path, count_tokens: TokenCounter | None = None) -> Collected:
    """Read and filter every source; spool training candidates to `out_dir/SPOOL`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sinks = _Sinks(out_dir)
    counts: dict[str, SourceCounts] = {}
    ids = DuplicateIds()
    index = ContaminationIndex(cfg.data.contamination)
    cands = Candidates()
    eval_records: list[Record] = []
    eval_sources = named_sources(cfg.data.eval, "data.eval")
    train_sources = named_sources(cfg.data.train, "data.train")
    try:
        with _progress() as progress:
            eval_dedupe = Deduper(cfg.data.dedupe)
            for src in eval_sources:
                name = source_name(src)
                c = counts.setdefault(f"eval/{name}", SourceCounts("eval"))
                task = progress.add_task(f"eval  {name}", total=None)
                for rec in _validated(src, "eval", cfg, ids, c, sinks):
                    progress.advance(task)
                    if _duplicate(rec, eval_dedupe, c, sinks, "eval"):
                        continue
                    c.kept += 1
                    c.languages[rec["language"]] += 1
                    index.add_eval(rec)
                    eval_records.append(rec)
            train_dedupe = Deduper(cfg.data.dedupe)
            for src in train_sources:
                name = source_name(src)
                c = counts.setdefault(f"train/{name}", SourceCounts("train"))
                task = progress.add_task(f"train {name}", total=None)
                for rec in _validated(src, "train", cfg, ids, c, sinks):
                    progress.advance(task)
                    _admit_train(rec, cfg, c, sinks, train_dedupe, index, cands, count_tokens)
    finally:
        sinks.close()
    for name, c in counts.items():
        c.check(name)
    return Collected(counts, cands, eval_records, index.report(), index.recurring_report())


def _admit_train(
    rec: Record,
    cfg: RunConfig,
    c: SourceCounts,
    sinks: _Sinks,
    deduper: Deduper,
    index: ContaminationIndex,
    cands: Candidates,
    count_tokens: TokenCounter | None,
) -> None:
    if cfg.data.scrub_pii:
        c.pii.update(scrub_record(rec))
    if _duplicate(rec, deduper, c, sinks, "train"):
        return
    hits = index.check(rec)
    if hits:
        removed = cfg.data.contamination.action == "remove"
        sinks.contaminated.write(dump_line({"id": rec["id"], "eval_ids": hits, "removed": removed}))
        if removed:
            c.contaminated_removed += 1
            return
    elif _recurring_stem_removed(rec, cfg, index, sinks):
        c.contaminated_removed += 1
        return
    c.kept += 1
    c.languages[rec["language"]] += 1
    cands.offsets.append(sinks.spool.tell())
    sinks.spool.write(dump_line(rec).encode("utf-8"))
    cands.languages.append(rec["language"])
    stratum = rec["source"] if cfg.data.mix.stratify_by == "source" else (rec["subject"] or rec["source"])
    cands.strata.append(stratum)
    cands.sources.append(rec["source"])
    cands.tokens.append(count_tokens(rec) if count_tokens else 1)


def _recurring_stem_removed(rec: Record, cfg: RunConfig, index: ContaminationIndex, sinks: _Sinks) -> bool:
    """List the eval items whose stem this record repeats with other options; True if it must go."""
    removed = cfg.data.contamination.recurring_stems == "remove"
    pairs = index.recurring_stems(rec)
    for source, eval_id in pairs:
        line = {"train_id": rec["id"], "eval_id": eval_id, "eval_source": source, "removed": removed}
        sinks.recurring.write(dump_line(line))
    return removed and bool(pairs)


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
    keys = (
        "records_in",
        "quarantined",
        "duplicates_exact",
        "duplicates_near",
        "contaminated_removed",
        "kept",
    )
    return {
        **{k: sum(getattr(c, k) for c in counts.values()) for k in keys},
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
