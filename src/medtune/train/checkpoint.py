"""Checkpoints that survive a kill -9: written to a temporary folder, then renamed into place.

A checkpoint is `checkpoints/step-<N>/` holding the trainable (LoRA) weights and the optimiser
state through `torch.distributed.checkpoint` (sharded under FSDP2, one file per rank), plus
`trainer_state.json` (`TrainerState`: written here, read back here) and each rank's RNG state.
Only a folder whose name has no `.tmp` suffix and that holds `COMPLETE` is ever resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from medtune.errors import RunDirError
from medtune.train.distributed import DistInfo, barrier

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrainerState:
    """`trainer_state.json`: where the run is and what must match for a resume to continue it."""

    step: int
    """Optimiser steps taken; with the deterministic row plan this is the whole data position."""
    config_hash: str
    scheduler: dict[str, Any]
    world_size: int
    """The global batch is dealt out over ranks, so another world size would see other rows."""


def _read_trainer_state(path: Path) -> TrainerState:
    """The trainer state of checkpoint folder `path`."""
    return TrainerState(**json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))


def trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model state restricted to trainable parameters (sharded DTensors under FSDP2)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model)
    return {k: v for k, v in state.items() if k in names}


def save_checkpoint(
    ckpt_root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: TrainerState,
    info: DistInfo,
    keep_last: int,
) -> Path:
    """Write `ckpt_root/step-<step>` atomically and prune to the newest `keep_last` complete ones."""
    final = ckpt_root / f"step-{trainer_state.step:08d}"
    tmp = ckpt_root / f"step-{trainer_state.step:08d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    state = {"model": trainable_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(asdict(trainer_state), indent=2), encoding="utf-8")
        (tmp / COMPLETE).write_text("ok\n")
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_root)
        for old in complete_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written `.tmp` folders are ignored."""
    if not ckpt_root.is_dir():
        return []
    found = [p for p in ckpt_root.glob("step-*") if p.suffix != ".tmp" and (p / COMPLETE).is_file()]
    return sorted(found)


def resumable_checkpoint(
    ckpt_root: Path, config_hash: str, world_size: int, force: bool
) -> tuple[Path, TrainerState] | None:
    """The newest complete checkpoint and its trainer state, if it may continue this run; None when
    there is none. `load_checkpoint` then restores the tensors; the state is read here, once.

    Refused: one written with another config (unless `force`), and one written by another number
    of processes, whose data order would differ.
    """
    found = complete_checkpoints(ckpt_root)
    if not found:
        return None
    latest = found[-1]
    state = _read_trainer_state(latest)
    if state.config_hash != config_hash and not force:
        raise RunDirError(
            f"{latest} was written with another config (hash {state.config_hash}, now "
            f"{config_hash}); resuming would mix two runs. Use --force to resume anyway."
        )
    if state.world_size != world_size:
        raise RunDirError(
            f"{latest} was written by {state.world_size} process(es), this run has "
            f"{world_size}: the data order would differ. Resume with the same --nproc."
        )
    return latest, state


def check_fresh_start(out_dir: Path) -> None:
    """Refuse to train from scratch over another run's checkpoints (also checked before `run` starts)."""
    ckpt_root = out_dir / "checkpoints"
    if complete_checkpoints(ckpt_root):
        raise RunDirError(
            f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
            f"or delete {out_dir} to start over"
        )


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> None:
    """Restore weights, optimiser and this rank's RNG from `path` (trainer state: `resumable_checkpoint`)."""
    if not (path / COMPLETE).is_file():
        raise RunDirError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    state = {"model": trainable_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    rng_file = path / f"rng-rank{info.rank}.pt"
    if not rng_file.is_file():
        raise RunDirError(
            f"{path} has no RNG state for rank {info.rank}: was it written with another world size?"
        )
    _set_rng_state(torch.load(rng_file, weights_only=True))


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
