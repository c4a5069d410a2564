"""Does this CPU compute bfloat16 natively? The answer decides `model.dtype: auto` on CPU.

PyTorch sends CPU matmuls in bf16 to oneDNN, which picks its kernel by instruction set: AMX tiles
(`amx_bf16`, Sapphire Rapids and later) or AVX-512 bf16 dot products (`avx512_bf16`, Cooper Lake,
Zen 4) compute bf16 directly; on any other CPU oneDNN converts to fp32 and back around every
product, so bf16 is slower than plain fp32. `torch.ops.mkldnn._is_mkldnn_bf16_supported()` is no
help here: it is also true on plain AVX-512 chips, where bf16 is emulated.

Measured on the build machine (Xeon with amx_bf16, 2 cores, torch 2.13): a 2048^3 matmul runs at
~680 GFLOP/s in bf16 against ~100 in fp32; a LoRA training step of a 4-layer, 512-wide Llama at
2 x 512 tokens took ~2.5 s in bf16 against ~3.5 s in fp32. The rule reads flags rather than timing
a probe, so the same machine always picks the same dtype (a timed probe on a busy machine could
flip between runs and change results).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of instructions that multiply bf16 directly (oneDNN uses either)."""

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags: /proc/cpuinfo's `flags` line, else torch's own cpuinfo (macOS, Windows)."""
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return _torch_flags()


def _torch_flags() -> frozenset[str]:
    """torch.cpu.get_capabilities() (torch >= 2.8) names the same features; empty on older torch."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return frozenset()
    return frozenset(name for name, present in get().items() if present is True)


def native_bf16(flags: Iterable[str]) -> list[str]:
    """The flags in `flags` that give native bf16 matmuls (empty: bf16 would be emulated)."""
    present = set(flags)
    return [flag for flag in NATIVE_BF16_FLAGS if flag in present]


def cpu_bf16_choice(flags: Iterable[str] | None = None, onednn: bool | None = None) -> tuple[bool, str]:
    """(use bf16, the reason in words) for `model.dtype: auto` on this CPU.

    `flags` and `onednn` default to this machine's (tests pass fakes). Without oneDNN (a torch built
    with USE_MKLDNN=0) bf16 matmuls fall back to ATen's generic kernels whatever the CPU has.
    """
    flags = cpu_flags() if flags is None else flags
    onednn = torch.backends.mkldnn.is_available() if onednn is None else onednn
    found = native_bf16(flags)
    capability = torch.backends.cpu.get_cpu_capability()
    if found and onednn:
        return True, f"CPU has {', '.join(found)}: oneDNN multiplies bf16 natively (ATen level {capability})"
    if found:
        return False, f"CPU has {', '.join(found)} but this torch has no oneDNN: bf16 matmuls would be slow"
    wanted = " or ".join(NATIVE_BF16_FLAGS)
    return False, f"CPU lacks {wanted}: bf16 matmuls would be emulated, slower than fp32"
