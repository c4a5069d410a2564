"""Verdicts and searches over the memory plan: does it fit, the longest sequence, the largest batch,
the fewest GPUs, and the cheapest memory-saving switches that make it fit."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from medtune.plan.memory import GIB, MemoryPlan, PlanOptions, plan_memory
from medtune.plan.shape import ModelShape, as_shape

# Memory-saving switches with a rough step-time cost rank (0: free). Activation offload implies
# checkpointing: transformers offloads the checkpointed layer inputs.
SWITCHES: dict[str, tuple[int, dict[str, Any]]] = {
    "chunked_ce": (0, {"chunked_ce": True}),
    "optimizer_8bit": (1, {"optimizer": "adamw_8bit"}),
    "checkpointing": (3, {"checkpoint_every_k": 1}),
    "activation_offload": (5, {"checkpoint_every_k": 1, "activation_offload": True}),
}
SWITCHES_OFF = {
    "chunked_ce": False,
    "optimizer": "adamw",
    "checkpoint_every_k": None,
    "activation_offload": False,
}
GPU_SIZES_GB = (24, 48, 80)


def fits(plan: MemoryPlan, gpu_memory_gb: float) -> bool:
    """Whether the planned peak fits in `gpu_memory_gb` GiB minus the fragmentation margin."""
    return plan.total_bytes <= gpu_memory_gb * GIB * (1 - plan.options.margin)


def _largest(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with ok(x), for ok monotone decreasing; None if not even lo."""
    if not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def max_seq_len(
    model_config: dict[str, Any] | ModelShape,
    opts: PlanOptions,
    gpu_memory_gb: float,
    limit: int = 131072,
    step: int = 128,
) -> int | None:
    """The longest sequence (a multiple of `step`) whose step fits at the current micro-batch."""
    model_config = as_shape(model_config)  # parse once, plan many times
    found = _largest(
        lambda k: fits(plan_memory(model_config, replace(opts, seq_len=k * step)), gpu_memory_gb),
        1,
        limit // step,
    )
    return None if found is None else found * step


def max_micro_batch(
    model_config: dict[str, Any] | ModelShape, opts: PlanOptions, gpu_memory_gb: float, limit: int = 1024
) -> int | None:
    model_config = as_shape(model_config)  # parse once, plan many times
    return _largest(
        lambda b: fits(plan_memory(model_config, replace(opts, micro_batch=b)), gpu_memory_gb), 1, limit
    )


def min_gpus(
    model_config: dict[str, Any] | ModelShape, opts: PlanOptions, gpu_memory_gb: float, limit: int = 64
) -> int | None:
    """Fewest FSDP ranks of `gpu_memory_gb` that fit; None when even `limit` do not (activations and
    the unsharded layers do not shrink with more ranks)."""
    model_config = as_shape(model_config)  # parse once, plan many times
    for n in range(1, limit + 1):
        if fits(plan_memory(model_config, replace(opts, gpus=n)), gpu_memory_gb):
            return n
    return None


def option_savings(model_config: dict[str, Any] | ModelShape, opts: PlanOptions) -> dict[str, int]:
    """Bytes each switch saves when turned on, the other settings as given."""
    model_config = as_shape(model_config)  # parse once, plan many times
    savings = {}
    for name, (_, on) in SWITCHES.items():
        off = {k: SWITCHES_OFF[k] for k in on}
        savings[name] = (
            plan_memory(model_config, replace(opts, **off)).total_bytes
            - plan_memory(model_config, replace(opts, **on)).total_bytes
        )
    return savings


def cheapest_fitting_switches(
    model_config: dict[str, Any] | ModelShape, opts: PlanOptions, gpu_memory_gb: float
) -> dict[str, Any] | None:
    """The switch set with the lowest time cost that fits, starting from all switches off."""
    model_config = as_shape(model_config)  # parse once, plan many times
    subsets = [s for n in range(len(SWITCHES) + 1) for s in itertools.combinations(SWITCHES, n)]
    subsets.sort(key=lambda s: (sum(SWITCHES[k][0] for k in s), len(s)))
    for subset in subsets:
        changes = dict(SWITCHES_OFF)
        for name in subset:
            changes.update(SWITCHES[name][1])
        plan = plan_memory(model_config, replace(opts, **changes))
        if fits(plan, gpu_memory_gb):
            return {"switches": list(subset), "total_gib": round(plan.total_bytes / GIB, 2)}
    return None
