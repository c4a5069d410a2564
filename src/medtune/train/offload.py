"""Activation memory: offloading saved activations to CPU, and checkpointing every k-th decoder layer.

How train should choose (train.gradient_checkpointing, checkpoint_every_k_layers, activation_offload):
- `gradient_checkpointing: false`: no checkpointing; every layer keeps its activations.
- `gradient_checkpointing: true`: call `apply_activation_checkpointing(model, k)` after LoRA is applied
  (and before FSDP sharding or after: the flags survive `fully_shard`). With k = 1 it is the same as the
  loader's HF `activation_checkpointing_enable(use_reentrant=False)`; with k > 1 it re-sets every
  layer, so it is safe to call after the loader enabled checkpointing on all of them. Its layer rule
  (index % k == 0) is transformers' own `every_n_layers` rule.
- `activation_offload: true`: run the forward and the loss inside `with OffloadActivations():`; what
  autograd saves there goes to CPU and is fetched back when backward needs it, wherever backward runs.
  It composes with checkpointing: a checkpointed layer saves only its input (non-reentrant checkpoint
  saves it as an ordinary saved tensor, so it goes through these hooks and is offloaded too) and the
  layers left unchecked (k > 1) save everything, all of which moves to CPU. With both on, the GPU holds
  about one layer's activations at a time. On CPU it does nothing: activations already live there.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medtune.errors import ModelError

log = logging.getLogger(__name__)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: tensors saved for backward go to (pinned) CPU memory and come back in backward.

    Like torchtune's `OffloadActivations`, without its side streams: copies run on the current stream,
    so stream order alone makes them safe (the GPU buffer cannot be reused before its copy finished).
    Parameters (and views of them) and tensors under `min_bytes` are kept where they are: a weight is
    alive anyway, and tiny copies cost more in launch overhead than they save.
    """

    def __init__(self, min_bytes: int = 1024, pin_memory: bool = True) -> None:
        self.min_bytes = min_bytes
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.offloaded_bytes = 0
        """Bytes moved to CPU so far (for logs and tests)."""
        if not torch.cuda.is_available():
            log.info("activation_offload: no CUDA device, activations already live in CPU memory; no-op")
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self._should_offload(tensor):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=self.pin_memory)
        host.copy_(tensor, non_blocking=self.pin_memory)  # non_blocking only from pinned memory is async
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return (tensor.device, host)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=self.pin_memory)
        return packed

    def _should_offload(self, tensor: torch.Tensor) -> bool:
        if tensor.device.type != "cuda" or tensor.layout != torch.strided:
            return False
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):
            return False  # weights (and their transposed views saved by matmuls) are resident anyway
        return tensor.numel() * tensor.element_size() >= self.min_bytes


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: modules transformers marks as `GradientCheckpointingLayer`.

    `isinstance` (not the class name) so it still finds them after FSDP2 swapped in `FSDP<Layer>` classes.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ModelError(f"{type(model).__name__} has no transformers decoder layers to checkpoint")
    return layers


def apply_activation_checkpointing(model: nn.Module, every_k_layers: int) -> list[int]:
    """Checkpoint decoder layers 0, k, 2k, ... with non-reentrant `torch.utils.checkpoint`; return them.

    Works through transformers' own per-layer switch (`gradient_checkpointing` and
    `_gradient_checkpointing_func` on each `GradientCheckpointingLayer`), which checkpoints the layer's
    `forward` and leaves module hooks (FSDP2's) outside the replay. The module tree is untouched, so
    state-dict keys, PEFT adapter names and FSDP units stay the same. Every layer is set, checkpointed
    or not, so this overrides whatever the loader enabled. Non-reentrant needs no
    `enable_input_require_grads`: it works when the embeddings are frozen (LoRA).
    """
    if every_k_layers < 1:
        raise ValueError(f"every_k_layers must be >= 1, got {every_k_layers}")
    checkpoint_fn = functools.partial(checkpoint, use_reentrant=False)
    chosen = []
    for index, layer in enumerate(decoder_layers(model)):
        layer._gradient_checkpointing_func = checkpoint_fn
        layer.gradient_checkpointing = index % every_k_layers == 0
        if layer.gradient_checkpointing:
            chosen.append(index)
    return chosen
