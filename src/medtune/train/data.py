"""What each optimiser step trains on: the token store's examples and the epoch's row plan, cut into steps.

One optimiser step consumes a *global batch* of `micro_batch_size * grad_accum * world_size` rows,
taken in order from the epoch's deterministic row plan (`packing.build_rows`), so the data position
is just the step number and a resumed run sees exactly the rows the killed one would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from medtune.config import PackingConfig, RunConfig, TrainConfig
from medtune.data.token_store import (
    StoredExamples,
    ensure_token_store,
    open_token_store,
    store_inputs,
    store_path,
    training_examples,
)
from medtune.errors import RunDirError
from medtune.packing import build_rows
from medtune.train.distributed import DistInfo, barrier


def tokenized_examples(cfg: RunConfig, prepare_dir: Path, info: DistInfo) -> tuple[StoredExamples, int]:
    """Tokenised training examples, and how many were left out because they have no target token
    (e.g. an empty response): they would cost compute and teach nothing. The count is reported.

    They come from the token store next to train.jsonl (`data/token_store.py`): global rank 0 builds
    it when missing or stale, the other ranks wait at the barrier, then every rank maps it read-only.
    A node that does not see rank 0's prepare folder (no shared storage) builds its own copy on its
    local rank 0; the store is deterministic, so every copy holds the same bytes.
    """
    train_file = prepare_dir / "train.jsonl"
    if not train_file.is_file():
        raise RunDirError(f"{train_file} not found: run `medtune prepare` first")
    inputs = store_inputs(prepare_dir, cfg.model, cfg.format)
    path = store_path(prepare_dir, inputs)
    if info.is_main:
        ensure_token_store(prepare_dir, cfg.model, cfg.format, inputs)
    barrier(info)
    if info.local_rank == 0 and not path.is_dir():  # built into a temp folder and renamed: whole or absent
        ensure_token_store(prepare_dir, cfg.model, cfg.format, inputs)
    barrier(info)
    store = open_token_store(path)
    examples, without_target = training_examples(store, cfg.format.train_on_prompt)
    if not len(examples):
        raise RunDirError(f"{train_file} holds no training examples with a target to learn")
    return examples, without_target


class StepRows:
    """The rows of each optimiser step: epoch `e`'s plan is `build_rows(lengths, packing, seed, e)`,
    cut into consecutive global batches. The current epoch's plan is kept; a new epoch reshuffles."""

    def __init__(
        self, lengths: Sequence[int], packing: PackingConfig, train: TrainConfig, seed: int, world_size: int
    ) -> None:
        self.lengths, self.packing, self.seed = lengths, packing, seed
        self.rows_per_step = train.micro_batch_size * train.grad_accum * world_size
        self.first_epoch = build_rows(lengths, packing, seed, 0)
        self.steps_per_epoch = max(1, math.ceil(len(self.first_epoch) / self.rows_per_step))
        self.total_steps = train.max_steps or max(1, math.ceil(train.epochs * self.steps_per_epoch))
        self._epoch, self._plan = 0, self.first_epoch

    def window(self, step: int) -> tuple[int, list[list[int]]]:
        """(epoch, the global batch of rows) for the 0-based optimiser step `step`."""
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, build_rows(self.lengths, self.packing, self.seed, epoch)
        start = step_in_epoch * self.rows_per_step
        return epoch, self._plan[start : start + self.rows_per_step]


def micro_batch_rows(
    window: list[list[int]], index: int, micro_batch_size: int, info: DistInfo
) -> list[list[int]]:
    """This rank's rows for micro-batch `index` of a global batch: micro-batch by micro-batch, each
    rank takes the next `micro_batch_size` rows in rank order. Any split of the same global batch
    into micro-batches, accumulation steps and ranks therefore trains on the same rows (the
    accumulation and FSDP parity tests rely on it). Empty for a rank past the end of the last window.
    """
    start = (index * info.world_size + info.rank) * micro_batch_size
    return window[start : start + micro_batch_size]
