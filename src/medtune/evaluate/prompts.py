"""The questions to score: each eval record's prompt (k-shot examples first) and its letter targets.

Prompts come from `medtune.format`, so evaluation reads the very template training used. Few-shot
examples are drawn from another split than the eval split, per item and seeded by the item's id, so
the draw does not depend on the eval set's order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, TypedDict

import torch

from medtune.config import FormatConfig
from medtune.data.schema import LETTERS, Record
from medtune.evaluate.answers import gold_is_valid
from medtune.format import join_prompts, render_prompt, render_target


class McqaItem(TypedDict):
    """One question ready to score: the record, its full prompt and the target text of every letter."""

    record: Record
    prompt: str
    """Everything before the answer (k-shot examples included), ending with the answer cue."""
    targets: list[str]
    """`render_target` of each option letter, e.g. [" A", " B", ...]: fixes the space convention."""


def build_items(
    records: Sequence[Record],
    tokenizer: Any,
    fmt: FormatConfig,
    k_shot: int = 0,
    pool: Sequence[Record] = (),
    seed: int = 0,
) -> list[McqaItem]:
    """Render every record's prompt (with `k_shot` examples drawn from `pool`) and letter targets.

    Targets are rendered without explanations: only the answer itself is scored.
    """
    target_cfg = fmt.model_copy(update={"include_explanation": False})

    def target(record: Record, letter: str) -> str:
        return render_target({**record, "answer": letter, "explanation": None}, target_cfg, tokenizer)

    index = index_pool(pool) if k_shot > 0 else None
    items: list[McqaItem] = []
    for record in records:
        n_opt = max(len(record.get("options") or []), 2)
        targets = [target(record, L) for L in LETTERS[:n_opt]]
        shots = select_shots(record, index, k_shot, seed) if index is not None else []
        parts = [render_prompt(s, tokenizer, fmt) + target(s, s["answer"]) + "\n\n" for s in shots]
        prompt = join_prompts([*parts, render_prompt(record, tokenizer, fmt)], tokenizer)
        items.append({"record": record, "prompt": prompt, "targets": targets})
    return items


def index_pool(pool: Sequence[Record]) -> dict[str, dict[str, list[Record]]]:
    """Few-shot candidates with a valid gold answer, by source and by language, each sorted by id.

    Built once per eval so choosing shots is not a scan of the whole pool per question.
    """
    usable = sorted((r for r in pool if gold_is_valid(r)), key=lambda r: r["id"])
    index: dict[str, dict[str, list[Record]]] = {"source": {}, "language": {}, "all": {"": usable}}
    for r in usable:
        index["source"].setdefault(r["source"], []).append(r)
        index["language"].setdefault(r["language"], []).append(r)
    return index


def select_shots(record: Record, pool: Sequence[Record] | dict, k: int, seed: int) -> list[Record]:
    """k examples for `record`: same source if possible, else same language, else any; never itself.

    `pool` is a list of records or its `index_pool`. It must come from a split other than the eval
    split (the caller guarantees it); the item is also excluded by id and by identical question
    text, since KorMedMCQA's fewshot file repeats valid items. The draw is seeded per item id, so
    it does not depend on the eval set's order.
    """
    if k <= 0:
        return []
    index = pool if isinstance(pool, dict) else index_pool(pool)
    tiers = [
        index["source"].get(record["source"], []),
        index["language"].get(record["language"], []),
        index["all"][""],
    ]
    candidates: list[Record] = []
    for tier in tiers:
        candidates = [r for r in tier if r["id"] != record["id"] and r["question"] != record["question"]]
        if len(candidates) >= k:
            break
    if len(candidates) < k:
        raise ValueError(f"k_shot={k} but only {len(candidates)} few-shot examples are available")
    rng = torch.Generator().manual_seed(_stable_seed(record["id"], seed))
    picks = torch.randperm(len(candidates), generator=rng)[:k].tolist()
    return [candidates[i] for i in picks]


def _stable_seed(text: str, seed: int) -> int:
    """A seed from a string that, unlike hash(), is the same in every process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "little") >> 1
