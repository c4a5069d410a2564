"""Held-out NLL: the training loss, measured on eval text that no model trained on.

Multiple-choice accuracy moves in steps of 1/n, and for a small model after a short fine-tune it often
does not move at all; the NLL of held-out text moves smoothly and says which languages and sources a
fine-tune helped or hurt (forgetting shows here first). Each eval record is scored the way training
scores it, through the same template, tokenizer, pre-shifted labels and packed forward
(`medtune.loss.token_nll`). Two scopes:

- `targets` (default): exactly the tokens training scores (`format.train_on_prompt`), so the number
  is a held-out validation loss, comparable with the training loss;
- `text`: a multiple-choice item's whole text (question, options and answer: its target alone is one
  letter), an instruction record's response given its prompt. This measures how the model reads
  held-out exam prose in each language, which answer-only training never targets, so drift shows.

Per item the NLL sum and token count are kept (`nll.jsonl`); per group, the mean over items of NLL per
token with a bootstrap 95% CI (items weigh equally, whatever their length); between two models, the
paired mean difference per item with a paired bootstrap CI.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtune.config import FormatConfig, PackingConfig
from medtune.data.schema import Record
from medtune.evaluate.stats import bootstrap_ci, group_names, paired_bootstrap_ci


def score_nll(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    fmt: FormatConfig,
    packing: PackingConfig,
    progress: Callable[[int], None] | None = None,
    scope: str = "targets",
) -> list[dict[str, Any]]:
    """Per record: id, grouping fields, target-token count and NLL sum (nats), in `records` order.

    Records are packed best-fit into rows of `packing.max_seq_len` tokens (an item longer than that
    gets a row of its own, never truncated), with position_ids restarting per record so no record
    attends to another.
    """
    import torch  # late: the report reads NLL tables without loading torch

    from medtune.format import tokenize_example
    from medtune.loss import IGNORE_INDEX, token_nll
    from medtune.packing import build_rows, collate

    examples = []
    if scope not in ("targets", "text"):
        raise ValueError(f"nll scope {scope!r} is not 'targets' or 'text'")
    for record in records:
        whole = fmt.train_on_prompt if scope == "targets" else record["kind"] == "mcqa"
        examples.append(
            tokenize_example(record, tokenizer, fmt.model_copy(update={"train_on_prompt": whole}))
        )
    lengths = [len(e["input_ids"]) for e in examples]
    pack = packing.model_copy(update={"mode": "packed", "max_seq_len": max([packing.max_seq_len, *lengths])})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = np.zeros(len(records))
    counts = np.zeros(len(records), dtype=np.int64)
    for row in build_rows(lengths, pack, seed=0, epoch=0):
        batch = collate(examples, [row], pack, pad_id)
        width = batch["labels"].shape[1]
        owner = torch.full((width,), -1)
        owner[: sum(lengths[i] for i in row)] = torch.cat([torch.full((lengths[i],), i) for i in row])
        owner = owner[batch["labels"][0] != IGNORE_INDEX].numpy()
        with torch.inference_mode():
            nll = token_nll(model, batch).double().cpu().numpy()
        np.add.at(sums, owner, nll)
        np.add.at(counts, owner, 1)
        if progress is not None:
            progress(len(row))
    return [
        {
            "id": r["id"],
            "language": r.get("language"),
            "source": r.get("source"),
            "subject": r.get("subject"),
            "tags": list(r.get("tags") or []),
            "kind": r["kind"],
            "tokens": int(n),
            "nll": round(float(s), 6),
        }
        for r, s, n in zip(records, sums, counts, strict=True)
    ]


def write_nll(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_nll(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def per_token(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """Each item's mean NLL per target token; an item with no target token (empty answer) is NaN."""
    return np.array([r["nll"] / r["tokens"] if r["tokens"] else np.nan for r in rows])


def _groups(rows: Sequence[dict[str, Any]], keys: Iterable[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row["tokens"]:
            for name in group_names(row, keys):
                groups.setdefault(name, []).append(i)
    return groups


def nll_table(
    rows: Sequence[dict[str, Any]], keys: Iterable[str], n_samples: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Per group: items, target tokens, mean NLL per token over items and its bootstrap 95% CI."""
    values = per_token(rows)
    table = {}
    for name, idx in _groups(rows, keys).items():
        lo, hi = bootstrap_ci(values[idx], n_samples, seed)
        table[name] = {
            "n": len(idx),
            "tokens": int(sum(rows[i]["tokens"] for i in idx)),
            "nll": float(values[idx].mean()),
            "ci95": [lo, hi],
        }
    return table


def compare_nll(
    a: Sequence[dict[str, Any]],
    b: Sequence[dict[str, Any]],
    keys: Iterable[str],
    n_samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per group: mean(B - A) of NLL per token over the items both scored, with a paired bootstrap CI.

    Negative means B assigns the held-out text higher likelihood. `significant` is the CI excluding 0.
    """
    by_id = {r["id"]: r for r in b}
    pairs = [(r, by_id[r["id"]]) for r in a if r["id"] in by_id and r["tokens"] and by_id[r["id"]]["tokens"]]
    va, vb = per_token([p[0] for p in pairs]), per_token([p[1] for p in pairs])
    return {
        name: paired_delta(va[idx], vb[idx], n_samples, seed)
        for name, idx in _groups([p[0] for p in pairs], keys).items()
    }


def paired_delta(a: np.ndarray, b: np.ndarray, n_samples: int, seed: int) -> dict[str, Any]:
    """n, both means, mean(b - a) with its paired bootstrap 95% CI, and the share of items b is lower."""
    lo, hi = paired_bootstrap_ci(a, b, n_samples, seed)
    return {
        "n": len(a),
        "a": float(a.mean()),
        "b": float(b.mean()),
        "delta": float((b - a).mean()),
        "ci95": [lo, hi],
        "significant": not lo <= 0.0 <= hi,
        "b_lower_share": float(np.mean(b < a)),
    }
