"""Token rows from examples: best-fit-decreasing packing, collation, statistics, and the isolation guard.

Packed rows hold several examples back to back with no attention mask. Documents stay isolated
because transformers rebuilds per-document causal masks from `position_ids` -- but only under exact
conditions (transformers 5.24, `masking_utils._preprocess_mask_arguments` and
`find_packed_sequence_indices`):

- the 2D `attention_mask` passed to the model is None, AND there is no cache (`use_cache=False`;
  with `use_cache=True` the model makes a `DynamicCache` and the packed check is skipped), AND
  `position_ids` are given;
- then a new document starts wherever `position_ids[t] - position_ids[t-1] != 1`; if no row of the
  batch has such a break the plain causal mask is used (correct: one document per row).
- Sliding-window layers (Gemma 3) apply the window to the remapped per-document positions.
- flash_attention_2/3 derive `cu_seqlens` from position_ids instead (`_is_packed_sequence`), and only
  when the batch size is 1: with 2+ packed rows they would attend across documents.

So collation restarts `position_ids` at 0 per example, and `forward_kwargs` is the one place the
forward call on a batch is built (the training loss and the held-out NLL in `loss.py` both use it);
it runs `assert_isolated_forward`, which refuses anything else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
import torch

from medtune.config import PackingConfig
from medtune.errors import ConfigError, MedtuneError
from medtune.format import IGNORE_INDEX, Example

ISOLATING_ATTENTION = {"sdpa", "eager", "flex_attention"}
"""Implementations whose mask comes from masking_utils: packed detection works at any batch size."""
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3"}
"""Implementations that isolate documents via cu_seqlens from position_ids, only for batch size 1."""


class PackingIsolationError(MedtuneError):
    """A packed batch would be run in a way that lets documents attend to each other."""


class Batch(TypedDict):
    """One micro-batch. `attention_mask` exists in padded mode only (see module docstring)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_lens: list[list[int]]
    """Per row, the lengths of its segments in order (trailing padding is its own segment), summing to T."""
    num_target_tokens: int
    attention_mask: NotRequired[torch.Tensor]


# ---------------------------------------------------------------------------------------------- packing


class _FitTree:
    """Max-segment-tree over remaining capacities 0..capacity: 'smallest open gap >= n' in O(log C).

    Leaf r holds r when at least one open row has exactly r free slots, else -1. Rows with the same
    gap are interchangeable for best fit, so a stack per gap is enough.
    """

    def __init__(self, capacity: int) -> None:
        self.size = 1 << capacity.bit_length()  # >= capacity + 1 leaves
        self.tree = [-1] * (2 * self.size)
        self.rows_with_gap: list[list[int]] = [[] for _ in range(capacity + 1)]

    def _set(self, gap: int, value: int) -> None:
        i = gap + self.size
        self.tree[i] = value
        i //= 2
        while i:
            self.tree[i] = max(self.tree[2 * i], self.tree[2 * i + 1])
            i //= 2

    def add(self, gap: int, row: int) -> None:
        self.rows_with_gap[gap].append(row)
        self._set(gap, gap)

    def pop_best(self, need: int) -> tuple[int, int] | None:
        """Take the row with the smallest gap >= need; return (row, gap), or None if none fits."""
        if self.tree[1] < need:
            return None
        i = 1
        while i < self.size:  # the leftmost leaf whose value is >= need is the smallest such gap
            i = 2 * i if self.tree[2 * i] >= need else 2 * i + 1
        gap = i - self.size
        row = self.rows_with_gap[gap].pop()
        if not self.rows_with_gap[gap]:
            self._set(gap, -1)
        return row, gap


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of total length <= capacity, best fit decreasing.

    Longest first; each goes into the open row with the smallest gap that holds it, or a new row.
    O(n log n + n log C). Ties keep input order (stable sort), so shuffling the input varies them.
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}]; truncate or drop overlong examples first")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    tree = _FitTree(capacity)
    for i in order:
        n = lengths[i]
        found = tree.pop_best(n)
        if found is None:
            row, gap = len(rows), capacity
            rows.append([])
        else:
            row, gap = found
        rows[row].append(i)
        if gap - n > 0:
            tree.add(gap - n, row)
    return rows


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def eligible(lengths: Sequence[int], cfg: PackingConfig) -> list[int]:
    """Indices that get a row: all of them, minus overlong ones when `overlong: drop`; no empty ones."""
    limit = cfg.max_seq_len if cfg.overlong == "drop" else None
    return [i for i, n in enumerate(lengths) if n > 0 and (limit is None or n <= limit)]


def _pack_subset(indices: Sequence[int], lengths: Sequence[int], cfg: PackingConfig) -> list[list[int]]:
    """Pack the given example indices (already in shuffled order); lengths capped by truncation."""
    capped = [min(lengths[i], cfg.max_seq_len) for i in indices]
    return [[indices[j] for j in row] for row in pack_best_fit_decreasing(capped, cfg.max_seq_len)]


def build_rows(lengths: Sequence[int], cfg: PackingConfig, seed: int, epoch: int) -> list[list[int]]:
    """Example indices per row for one epoch; the same (seed, epoch) gives the same rows.

    Packed: examples are shuffled (varying ties and row contents per epoch), packed best fit
    decreasing, then the rows are shuffled. Padded: one example per row, in shuffled order. Overlong
    examples are left out under `overlong: drop` (see `packing_stats` for the count) and cut to
    `max_seq_len` by `collate` under `truncate`.
    """
    rng = _rng(seed, epoch)
    indices = [int(i) for i in rng.permutation(eligible(lengths, cfg))]
    if cfg.mode == "padded":
        return [[i] for i in indices]
    rows = _pack_subset(indices, lengths, cfg)
    return [rows[int(j)] for j in rng.permutation(len(rows))]


# ---------------------------------------------------------------------------------------------- collate


def truncate_example(example: Example, max_len: int) -> Example:
    """The first `max_len` tokens; the new last position loses its target (it lay past the cut)."""
    if len(example["input_ids"]) <= max_len:
        return example
    labels = list(example["labels"][:max_len])
    labels[-1] = IGNORE_INDEX
    return {"input_ids": list(example["input_ids"][:max_len]), "labels": labels}


def _row_segments(examples: Sequence[Example], row: Sequence[int], cfg: PackingConfig) -> list[Example]:
    """The row's examples, cut to max_seq_len; overlong ones under `drop` are a caller bug."""
    out = []
    for i in row:
        ex = examples[i]
        if len(ex["input_ids"]) > cfg.max_seq_len and cfg.overlong == "drop":
            raise ValueError(f"example {i} is longer than max_seq_len but overlong is 'drop'; use build_rows")
        out.append(truncate_example(ex, cfg.max_seq_len))
    if sum(len(ex["input_ids"]) for ex in out) > cfg.max_seq_len:
        raise ValueError(f"row {list(row)} holds more than max_seq_len={cfg.max_seq_len} tokens")
    return out


def _padded_width(rows: list[list[Example]], cfg: PackingConfig) -> int:
    if cfg.padding == "max_length":
        return cfg.max_seq_len
    return max(sum(len(ex["input_ids"]) for ex in row) for row in rows)


def collate(
    examples: Sequence[Example], rows: Sequence[Sequence[int]], cfg: PackingConfig, pad_id: int = 0
) -> Batch:
    """Tensors for one micro-batch of `rows` (lists of indices into `examples`).

    Packed: examples back to back, `position_ids` restarting at 0 per example, no attention_mask.
    Rows are right-padded to a common width with `pad_id` and labels -100; the padding's
    position_ids also restart at 0, so the padding is a document of its own (it attends only to
    itself) and never changes a real token's output. Padded: one example per row plus an
    attention_mask; padding is right-side, position_ids count on through it (masked anyway).
    """
    if cfg.mode == "padded" and any(len(row) != 1 for row in rows):
        raise ValueError("padded mode takes exactly one example per row")
    segments = [_row_segments(examples, row, cfg) for row in rows]
    width = _padded_width(segments, cfg)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    seq_lens: list[list[int]] = []
    for b, row in enumerate(segments):
        start, lens = 0, []
        for ex in row:
            n = len(ex["input_ids"])
            input_ids[b, start : start + n] = torch.tensor(ex["input_ids"])
            labels[b, start : start + n] = torch.tensor(ex["labels"])
            position_ids[b, start : start + n] = torch.arange(n)
            start, lens = start + n, [*lens, n]
        if start < width:
            tail = torch.arange(width - start)
            position_ids[b, start:] = tail if cfg.mode == "packed" else tail + start
            lens.append(width - start)
        seq_lens.append(lens)
    batch: Batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "seq_lens": seq_lens,
        "num_target_tokens": int((labels != IGNORE_INDEX).sum()),
    }
    if cfg.mode == "padded":
        real = torch.tensor([sum(len(ex["input_ids"]) for ex in row) for row in segments])
        batch["attention_mask"] = (torch.arange(width)[None, :] < real[:, None]).long()
    return batch


# ---------------------------------------------------------------------------------------------- statistics


def packing_stats(
    rows: Sequence[Sequence[int]], lengths: Sequence[int], cfg: PackingConfig, micro_batch_size: int = 1
) -> dict[str, Any]:
    """What packing did: efficiency, rows, examples per row, and what was truncated or dropped.

    `efficiency` = real tokens / (rows x max_seq_len), the fraction of row capacity holding data.
    `batch_efficiency` = real tokens / tensor slots after collate pads each micro-batch of
    `micro_batch_size` consecutive rows (to its longest row, or max_seq_len under `padding: max_length`).
    """
    cap = cfg.max_seq_len
    row_tokens = [sum(min(lengths[i], cap) for i in row) for row in rows]
    real = sum(row_tokens)
    slots = 0
    for s in range(0, len(rows), micro_batch_size):
        group = row_tokens[s : s + micro_batch_size]
        slots += len(group) * (cap if cfg.padding == "max_length" else max(group, default=0))
    placed = {i for row in rows for i in row}
    overlong = [i for i, n in enumerate(lengths) if n > cap]
    per_row = [len(row) for row in rows]
    return {
        "mode": cfg.mode,
        "max_seq_len": cap,
        "examples": len(lengths),
        "examples_placed": len(placed),
        "rows": len(rows),
        "real_tokens": real,
        "efficiency": real / (len(rows) * cap) if rows else 0.0,
        "batch_efficiency": real / slots if slots else 0.0,
        "examples_per_row_mean": float(np.mean(per_row)) if rows else 0.0,
        "examples_per_row_max": max(per_row, default=0),
        "truncated": sum(1 for i in overlong if i in placed),
        "truncated_tokens": sum(lengths[i] - cap for i in overlong if i in placed),
        "dropped": sum(1 for i in overlong if i not in placed),
        "empty_dropped": sum(1 for n in lengths if n <= 0),
    }


# ---------------------------------------------------------------------------------------------- forward


def is_packed(batch: Mapping[str, Any]) -> bool:
    """Packed batches are the ones without an attention_mask (see `collate`)."""
    return batch.get("attention_mask") is None


def forward_kwargs(model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The exact keyword arguments for `model`'s forward on `batch`, checked by the isolation guard.

    Packed: input_ids, position_ids and use_cache=False, nothing else -- an attention_mask, even
    all ones, or a cache switches off transformers' packed-document detection and leaks attention.
    Padded: the same plus the attention_mask. Labels are never passed: they are pre-shifted, and the
    model's own loss would shift them again. `model`'s config names the attention implementation.
    """
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if not is_packed(batch):
        kwargs["attention_mask"] = batch["attention_mask"]
    if "seq_lens" in batch:  # every batch `collate` builds, so every training and NLL forward
        assert_isolated_forward(model, batch, kwargs)
    return kwargs


def _attn_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def assert_isolated_forward(model: torch.nn.Module, batch: Mapping[str, Any], kwargs: dict[str, Any]) -> None:
    """Raise unless calling `model(**kwargs)` on packed `batch` keeps every document to itself."""
    if not is_packed(batch):
        return
    if kwargs.get("attention_mask") is not None:
        raise PackingIsolationError(
            "packed batch called with an attention_mask: transformers then ignores the document "
            "boundaries in position_ids and every token attends to earlier documents in its row"
        )
    if kwargs.get("use_cache") is not False or kwargs.get("cache") is not None:
        raise PackingIsolationError(
            "packed batch called without use_cache=False: with a cache transformers skips packed-"
            "sequence detection and documents in a row attend to each other"
        )
    if "position_ids" not in kwargs or not _positions_restart(kwargs["position_ids"], batch["seq_lens"]):
        raise PackingIsolationError("packed batch without position_ids restarting at 0 for every document")
    _check_attention_implementation(_attn_implementation(model), batch["input_ids"].shape[0])


def _positions_restart(position_ids: torch.Tensor, seq_lens: list[list[int]]) -> bool:
    """position_ids are 0..n-1 within every segment of every row."""
    expected = torch.cat([torch.cat([torch.arange(n) for n in lens]) for lens in seq_lens])
    return position_ids.shape[0] == len(seq_lens) and torch.equal(position_ids.reshape(-1).cpu(), expected)


def _check_attention_implementation(impl: str | None, batch_size: int) -> None:
    if impl in ISOLATING_ATTENTION:
        return
    if impl in VARLEN_ATTENTION:
        from transformers.utils import import_utils

        available = getattr(import_utils, f"is_{impl.replace('_attention', '_attn')}_available")()
        if not available:
            raise ConfigError(
                f"model.attn_implementation: {impl} is not installed; packed rows need it to isolate "
                "documents. Install it, or use sdpa"
            )
        if batch_size != 1:
            raise ConfigError(
                f"model.attn_implementation: {impl} isolates packed documents only with one row per "
                f"forward (got {batch_size}); set train.micro_batch_size: 1 or use sdpa"
            )
        return
    raise ConfigError(
        f"model.attn_implementation: {impl!r} is not known to isolate packed documents; "
        f"use one of {sorted(ISOLATING_ATTENTION | VARLEN_ATTENTION)} or packing.mode: padded"
    )
