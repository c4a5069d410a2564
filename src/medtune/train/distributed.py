"""Process groups and FSDP2 sharding: the only place single-process and distributed training differ.

Launched under `torchrun`, each rank joins the default process group (NCCL on CUDA, gloo on CPU)
and the model is sharded with FSDP2 `fully_shard`: every decoder layer is its own unit, and the
root unit (embeddings, final norm, lm_head, which Gemma ties to the embeddings) is the wrapper
that computes the loss, so its parameters are gathered for the whole loss computation. A stop
signal is agreed on by all ranks (`StopFlag`), since one rank leaving alone would hang the others.
"""

from __future__ import annotations

import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medtune.config import DistributedConfig
from medtune.errors import ModelError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(cfg: DistributedConfig) -> DistInfo:
    """Join the process group torchrun set up, or describe the single process we are."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cuda else "gloo")
        # A rank whose peers died fails its next collective after `timeout_s` instead of hanging.
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        dist.init_process_group(backend=backend, device_id=device if cuda else None, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a small tensor over ranks (a no-op in a single process)."""
    if info.distributed:
        values = values.to(info.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_ints(value: int, info: DistInfo) -> list[int]:
    """`value` from every rank, in rank order (a one-element list in a single process)."""
    if not info.distributed:
        return [value]
    mine = torch.tensor([value], dtype=torch.int64, device=info.device)
    every = [torch.zeros_like(mine) for _ in range(info.world_size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shard_with_fsdp2(root: nn.Module, cfg: DistributedConfig, compute_dtype: torch.dtype) -> nn.Module:
    """Apply FSDP2 `fully_shard` to each decoder layer, then to `root` (in place)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
    for layer in decoder_layers(root):
        fully_shard(
            layer, mp_policy=mp, offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward
        )
    # The root is not resharded after forward: backward needs its parameters straight away.
    fully_shard(root, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return root


class StopFlag:
    """SIGTERM/SIGINT ask the loop to finish its step, checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, info: DistInfo) -> bool:
        """True once any rank was signalled: ranks must stop at the same step or collectives hang."""
        if info.distributed:
            flag = all_reduce_sum(torch.tensor([float(self.requested)]), info)
            self.requested = bool(flag.item() > 0)
        return self.requested

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules transformers marks as `GradientCheckpointingLayer`.

    `isinstance` (not the class name) so it still finds them after FSDP2 swapped in `FSDP<Layer>` classes.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no transformers decoder layers to shard")
    return layers
