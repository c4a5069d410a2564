"""Read and filter every source: the first half of `prepare`, and all of `data inspect`.

Eval sources are read first (they seed the contamination index and are never scrubbed or mixed);
each training record is then validated, language-tagged, PII-scrubbed (before dedupe, so two copies
that differ only by a phone number are one item), deduplicated, checked for contamination, and
spooled to disk. Only compact per-record arrays stay in memory for the mixer. Every filter writes
what it removed to a side file and counts it (`SourceCounts`), so the counts add up.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from medtune.config import RunConfig, SourceConfig
from medtune.data.contamination import ContaminationIndex
from medtune.data.dedupe import Deduper
from medtune.data.langid import record_language
from medtune.data.manifest import SourceCounts, reason_class
from medtune.data.pii import scrub_record
from medtune.data.read import iter_source, named_sources, source_name
from medtune.data.schema import Record
from medtune.data.validate import DuplicateIds, Rejected, RowError, check_field_lengths

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


def _source_records(
    progress: Progress,
    sources: list[SourceConfig],
    role: str,
    cfg: RunConfig,
    ids: DuplicateIds,
    counts: dict[str, SourceCounts],
    sinks: _Sinks,
) -> Iterator[tuple[Record, SourceCounts]]:
    """Valid records of every source of one role, each with the counts of the source it came from."""
    for src in sources:
        name = source_name(src)
        c = counts.setdefault(f"{role}/{name}", SourceCounts(role))
        task = progress.add_task(f"{role:<5} {name}", total=None)
        for rec in _validated(src, role, cfg, ids, c, sinks):
            progress.advance(task)
            yield rec, c


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
            for rec, c in _source_records(progress, eval_sources, "eval", cfg, ids, counts, sinks):
                if _duplicate(rec, eval_dedupe, c, sinks, "eval"):
                    continue
                c.kept += 1
                c.languages[rec["language"]] += 1
                index.add_eval(rec)
                eval_records.append(rec)
            train_dedupe = Deduper(cfg.data.dedupe)
            for rec, c in _source_records(progress, train_sources, "train", cfg, ids, counts, sinks):
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
