"""The optimiser and its learning-rate schedule, built from the `train:` section."""

from __future__ import annotations

import math

import torch
from torch import nn

from medtune.config import TrainConfig
from medtune.errors import MedtuneError


def build_optimizer(
    train: TrainConfig, params: list[nn.Parameter], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), or bitsandbytes' 8-bit AdamW variants, which need a CUDA GPU."""
    kwargs = {"lr": train.lr, "weight_decay": train.weight_decay, "betas": (0.9, 0.999)}
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs, fused=device.type == "cuda" or None)
    if device.type != "cuda":
        raise MedtuneError(f"train.optimizer: {train.optimizer} needs a CUDA GPU; use adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kwargs)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """The multiple of `train.lr` used for 0-based optimiser step `step` of `total`.

    Warmup climbs (step + 1) / (warmup + 1), so even the first step learns; transformers'
    `get_scheduler` warms up from step / warmup, which makes step 0 a step at lr 0, hence our own
    ten lines. After warmup: cosine or linear decay to 0 at `total`, or constant.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def build_scheduler(
    train: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` as a LambdaLR; it is stepped only after steps whose loss was finite."""

    def factor(step: int) -> float:  # a plain function: LambdaLR saves no state for it in checkpoints
        return lr_factor(step, train.warmup_steps, total_steps, train.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
