"""Measure what a loaded model and one training step really occupy, to check the planner against.

`model_bytes` counts storage, not parameters: a 4-bit weight is its packed bytes plus its quant
state (absmax, nested absmax, code books), which `numel() * element_size()` on the parameters alone
misses. `peak_training_memory` reports the peak of live tensor bytes during a step: on CUDA from the
caching allocator's statistics, on CPU from a dispatch mode that sees every tensor an op creates and
a weak reference that fires when its storage is freed (RSS is reported too, but the allocator keeps
freed pages, so RSS is a poor peak).
"""

from __future__ import annotations

import gc
import resource
import weakref
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def quant_state_tensors(param: torch.Tensor) -> list[torch.Tensor]:
    """The side tensors a bitsandbytes weight needs to dequantise (4-bit QuantState or int8 SCB)."""
    tensors: list[torch.Tensor] = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        tensors += [
            t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)
        ]
        state = getattr(state, "state2", None)
    scb = getattr(param, "SCB", None)
    if torch.is_tensor(scb):
        tensors.append(scb)
    return tensors


def _param_kind(name: str, param: torch.nn.Parameter) -> str:
    if param.requires_grad:
        return "adapter" if "lora_" in name else "trainable_other"
    if getattr(param, "quant_state", None) is not None or getattr(param, "SCB", None) is not None:
        return "quantized_weights"
    return "frozen_weights"


def model_bytes(model: torch.nn.Module) -> dict[str, Any]:
    """Bytes held by the model, split by role and by dtype; tied or shared storage counts once.

    Keys: quantized_weights (packed 4/8-bit data), quant_state, frozen_weights (unquantised frozen
    parameters: embeddings, norms, lm_head), adapter (LoRA), trainable_other (modules_to_save),
    buffers, total, by_dtype.
    """
    seen: set[tuple[int, int]] = set()
    out: dict[str, Any] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)

    def add(kind: str, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in seen:
            return
        seen.add(key)
        out[kind] += key[1]
        by_dtype[str(t.dtype).removeprefix("torch.")] += key[1]

    for name, param in model.named_parameters(remove_duplicate=False):
        add(_param_kind(name, param), param)
        for t in quant_state_tensors(param):
            add("quant_state", t)
    for buf in model.buffers():
        add("buffers", buf)
    result = {
        k: out.get(k, 0)
        for k in (
            "quantized_weights",
            "quant_state",
            "frozen_weights",
            "adapter",
            "trainable_other",
            "buffers",
        )
    }
    result["total"] = sum(result.values())
    result["by_dtype"] = dict(by_dtype)
    return result


class LiveTensorTracker(TorchDispatchMode):
    """Tracks bytes of tensor storage created inside the mode and still alive; keeps the peak.

    Tensors that existed before entering (weights, optimiser state from earlier steps) are not seen;
    the caller adds them as a baseline. A storage is counted once however many views share it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: counting them would count a weight's
        # transpose as a new weight-sized allocation.
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(result)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _storage_key(t) not in inputs:
                self._track(t.untyped_storage())
        return result

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._refs or storage.nbytes() == 0:
            return
        nbytes = storage.nbytes()
        self._refs[storage] = weakref.ref(storage, lambda _ref, n=nbytes: self._free(n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def peak_training_memory(step_fn: Callable[[], Any], device: torch.device | None = None) -> dict[str, Any]:
    """Run `step_fn` once and report its peak memory beyond what was allocated before it.

    CUDA: `max_memory_allocated` minus the allocated bytes at entry. CPU: the peak of live tensor
    bytes created during the step (LiveTensorTracker), plus the RSS delta for reference. Tensors the
    step frees that existed before (e.g. old gradients) are not subtracted: the peak is an upper view.
    """
    gc.collect()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step_fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "device": "cuda",
            "baseline_bytes": before,
            "peak_bytes": peak,
            "peak_delta_bytes": peak - before,
            "retained_bytes": torch.cuda.memory_allocated(device) - before,
        }
    rss_before = _rss_bytes()
    tracker = LiveTensorTracker()
    with tracker:
        step_fn()
    retained = tracker.live
    return {
        "device": "cpu",
        "peak_delta_bytes": tracker.peak,
        "retained_bytes": retained,
        "rss_delta_bytes": _rss_bytes() - rss_before,
    }
