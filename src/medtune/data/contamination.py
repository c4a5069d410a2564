"""Find training records whose question overlaps an evaluation item, per eval source.

A long stem is compared by word n-grams (`ngram`, default 13 words, as in the GPT-3 and Llama
contamination studies). Korean stems are short in words (one eojeol carries a stem and its
particles), so a stem with fewer than `ngram` words is compared by character n-grams (spaces
removed) of the stem *with its options*: KorMedMCQA reuses short stems across years with different
options (`의사가 될 수 있는 사람은?`), and those are different items.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

from medtune.config import ContaminationConfig
from medtune.data.dedupe import normalise
from medtune.data.schema import Record

MIN_COVERAGE = 0.5
"""Share of an eval item's n-grams a training record must contain to count as contaminated."""


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

    def add_eval(self, record: Record) -> None:
        idx = len(self._eval_id)
        keys = stem_keys(record, self.cfg)
        self._eval_source.append(record["source"])
        self._eval_id.append(record["id"])
        self._eval_keys.append(len(keys))
        for key in keys:
            self._owners[key].append(idx)

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
