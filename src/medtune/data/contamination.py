"""Find training records whose question overlaps an evaluation item, per eval source.

A long stem is compared by word n-grams (`ngram`, default 13 words, as in the GPT-3 and Llama
contamination studies). Korean stems are short in words (one eojeol carries a stem and its
particles), so a stem with fewer than `ngram` words is compared by character n-grams (spaces
removed) of the stem *with its options*: KorMedMCQA reuses short stems across years with different
options (`의사가 될 수 있는 사람은?`), and those are different items.

Different items, but not unrelated ones: a training record that repeats an eval item's stem with
other options (a *recurring stem*) teaches the very rule the eval item asks about. Such pairs are
listed (`recurring_stems`), and removed only when `recurring_stems: remove`. Two short stems are
the same when their character 5-grams (after `normalise`, spaces removed) have a Jaccard of at
least `RECURRING_JACCARD`. A long stem never needs that check: its n-grams alone already make a
repeat of it contamination.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from typing import Any

from medtune.config import ContaminationConfig
from medtune.data.dedupe import normalise
from medtune.data.schema import Record

MIN_COVERAGE = 0.5
"""Share of an eval item's n-grams a training record must contain to count as contaminated."""
MAX_LISTED_PAIRS = 50
"""Recurring-stem pairs shown in the manifest; the prepare stage writes all of them to a side file."""
STEM_GRAM_CHARS = 5
RECURRING_JACCARD = 0.75
"""Character 5-gram Jaccard of two short stems from which they count as one recurring stem. On the
bundled data: `「의료법」상 250병상을 갖춘 종합병원에...` vs the same without `「의료법」상` is 0.86,
`tumour` vs `tumor suppressor gene` 0.80; `골육종에 관한 설명으로 옳은 것은?` vs `혈관종에 ...` 0.67 and
`... statements is false?` vs `... statements is false about apoptosis?` 0.70 are other stems."""


def _key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def stem_keys(record: Record, cfg: ContaminationConfig) -> set[int]:
    """The n-gram keys of one record: its stem (question, or prompt), plus options when the stem is short."""
    stem = normalise(record["question"] or record.get("prompt") or "")
    words = stem.split()
    if len(words) >= cfg.ngram:
        return {_key(" ".join(words[i : i + cfg.ngram])) for i in range(len(words) - cfg.ngram + 1)}
    # A short stem alone is not an item: "Which of the following statements is false?" opens dozens
    # of unrelated MMLU and MedMCQA questions. Its options (sorted, so a shuffle still matches) make it one.
    chars = (stem + "".join(sorted(normalise(o) for o in record["options"]))).replace(" ", "")
    n = cfg.char_ngram
    if len(chars) >= n:
        return {_key("c:" + chars[i : i + n]) for i in range(len(chars) - n + 1)}
    return {_key("s:" + chars)}


def short_stem_grams(record: Record, cfg: ContaminationConfig) -> frozenset[str] | None:
    """Character 5-grams of a short stem alone, spaces removed; None for a long or empty stem."""
    stem = normalise(record["question"] or record.get("prompt") or "")
    if not stem or len(stem.split()) >= cfg.ngram:
        return None
    chars, n = stem.replace(" ", ""), STEM_GRAM_CHARS
    return (
        frozenset(chars[i : i + n] for i in range(len(chars) - n + 1))
        if len(chars) > n
        else frozenset([chars])
    )


class ContaminationIndex:
    """Eval items' n-grams; `check` a training record against all of them.

    One shared 13-gram is not contamination: USMLE and Korean vignettes share boilerplate
    ("comes to the physician because of a 2-month history of", "혈압 120/80 mmHg, 맥박 80회/분,
    호흡 20회/분, 체온 36.5℃"). A training record contaminates an eval item when it contains at
    least `MIN_COVERAGE` of that item's n-grams, i.e. most of the eval stem appears in it.
    """

    def __init__(self, cfg: ContaminationConfig) -> None:
        self.cfg = cfg
        self._owners: dict[int, list[int]] = defaultdict(list)
        """n-gram key -> indices of the eval items that have it."""
        self._eval_source: list[str] = []
        self._eval_id: list[str] = []
        self._eval_keys: list[int] = []
        self.hits_per_source: dict[str, int] = defaultdict(int)
        """Training records that overlap each eval source."""
        self.eval_items_hit: dict[str, set[str]] = defaultdict(set)
        self._stems = _StemIndex()

    def add_eval(self, record: Record) -> None:
        idx = len(self._eval_id)
        keys = stem_keys(record, self.cfg)
        self._eval_source.append(record["source"])
        self._eval_id.append(record["id"])
        self._eval_keys.append(len(keys))
        for key in keys:
            self._owners[key].append(idx)
        grams = short_stem_grams(record, self.cfg)
        if grams:
            self._stems.add(grams, record["source"], record["id"])

    def check(self, record: Record) -> list[str]:
        """Ids of the eval items this training record overlaps (empty: clean); updates the report."""
        if not self._owners:
            return []
        shared: dict[int, int] = defaultdict(int)
        for key in stem_keys(record, self.cfg):
            for idx in self._owners.get(key, ()):
                shared[idx] += 1
        hit = sorted(i for i, n in shared.items() if n >= MIN_COVERAGE * self._eval_keys[i])
        for source in sorted({self._eval_source[i] for i in hit}):
            self.hits_per_source[source] += 1
        for i in hit:
            self.eval_items_hit[self._eval_source[i]].add(self._eval_id[i])
        return [self._eval_id[i] for i in hit]

    def recurring_stems(self, record: Record) -> list[tuple[str, str]]:
        """(eval source, eval id) of the eval items whose stem this training record repeats.

        Call it for a record `check` found clean: then the options differ (a record with the same
        stem and options is contamination). Updates the recurring-stem report.
        """
        grams = short_stem_grams(record, self.cfg) if self._stems.grams else None
        pairs = self._stems.match(grams) if grams else []
        self._stems.count(record["id"], pairs)
        return pairs

    def recurring_report(self) -> dict[str, Any]:
        """Training records with a recurring stem, per eval source, and the first `MAX_LISTED_PAIRS` pairs."""
        return self._stems.report()

    def report(self) -> dict[str, dict[str, int]]:
        """Per eval source: eval items, training records that overlap it, and eval items touched."""
        counts: dict[str, int] = defaultdict(int)
        for source in self._eval_source:
            counts[source] += 1
        return {
            s: {
                "eval_items": counts[s],
                "train_records_overlapping": self.hits_per_source.get(s, 0),
                "eval_items_overlapped": len(self.eval_items_hit.get(s, ())),
            }
            for s in sorted(counts)
        }


class _StemIndex:
    """Eval items' short-stem 5-grams, searched by prefix filtering, and the recurring-stem counts.

    Comparing a training stem with every eval stem that shares a gram would cost thousands of
    steps per record (`ofthe` opens most English stems). Prefix filtering (Chaudhuri et al. 2006)
    keeps it small: order grams rarest first among the eval stems; two sets with a Jaccard of at
    least t share a gram among their first |s| - ceil(t |s|) + 1, so only those are indexed and
    looked up, and each candidate is then verified on its full set.
    """

    def __init__(self) -> None:
        self.grams: list[frozenset[str]] = []
        self.where: list[tuple[str, str]] = []
        """(eval source, eval id) of each stem."""
        self._by_prefix: dict[str, list[int]] | None = None
        self._freq: Counter[str] = Counter()
        self.train_records = 0
        self.per_source: dict[str, int] = defaultdict(int)
        self.eval_items: dict[str, set[str]] = defaultdict(set)
        self.pairs: list[dict[str, str]] = []

    def add(self, grams: frozenset[str], source: str, eval_id: str) -> None:
        self.grams.append(grams)
        self.where.append((source, eval_id))
        self._freq.update(grams)
        self._by_prefix = None  # the rarity order changed

    def _prefix(self, grams: frozenset[str]) -> list[str]:
        ordered = sorted(grams, key=lambda g: (self._freq[g], g))
        return ordered[: len(grams) - math.ceil(RECURRING_JACCARD * len(grams)) + 1]

    def match(self, grams: frozenset[str]) -> list[tuple[str, str]]:
        """(eval source, eval id) of every eval stem within `RECURRING_JACCARD` of `grams`."""
        if self._by_prefix is None:
            self._by_prefix = defaultdict(list)
            for i, eval_grams in enumerate(self.grams):
                for g in self._prefix(eval_grams):
                    self._by_prefix[g].append(i)
        found = []
        for i in sorted({i for g in self._prefix(grams) for i in self._by_prefix.get(g, ())}):
            shared = len(grams & self.grams[i])
            if shared >= RECURRING_JACCARD * (len(grams) + len(self.grams[i]) - shared):
                found.append(self.where[i])
        return found

    def count(self, train_id: str, pairs: list[tuple[str, str]]) -> None:
        if not pairs:
            return
        self.train_records += 1
        for source in sorted({source for source, _ in pairs}):
            self.per_source[source] += 1
        for source, eval_id in pairs:
            self.eval_items[source].add(eval_id)
            if len(self.pairs) < MAX_LISTED_PAIRS:
                self.pairs.append({"train_id": train_id, "eval_id": eval_id, "eval_source": source})

    def report(self) -> dict[str, Any]:
        return {
            "train_records": self.train_records,
            "per_eval_source": {
                s: {"train_records": n, "eval_items": len(self.eval_items[s])}
                for s, n in sorted(self.per_source.items())
            },
            "pairs": self.pairs,
        }
