"""Checkpoints that survive a kill -9: written to a temporary folder, then renamed into place.

A checkpoint is `checkpoints/step-<N>/` holding the trainable (LoRA) weights and the optimiser
state through `torch.distributed.checkpoint` (sharded under FSDP2, one file per rank), plus
`trainer_state.json` (step, data position, scheduler, config hash) and each rank's RNG state.
Only a folder whose name has no `.tmp` suffix and that holds `COMPLETE` is ever resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
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

from medtune.distributed import DistInfo, barrier
from medtune.errors import RunDirError

COMPLETE = "COMPLETE"


def trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model state restricted to trainable parameters (sharded DTensors under FSDP2)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = get_model_state_dict(model)
    return {k: v for k, v in state.items() if k in names}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: DistInfo,
    keep_last: int,
) -> Path:
    """Write `ckpt_root/step-<step>` atomically and prune to the newest `keep_last` complete ones."""
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    state = {"model": trainable_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng-rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
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


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo
) -> dict[str, Any]:
    """Restore weights, optimiser and this rank's RNG from `path`; return its trainer state."""
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
    return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


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
