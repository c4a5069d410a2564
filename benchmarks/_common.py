"""What benchmark scripts share: how they name the machine, size their models and set CPU threads.

Scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they import
`from _common import ...`.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model and core count, from /proc/cpuinfo where there is one."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores (CPU)"


SIZE_NAMES = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads"
).split()


def model_sizes(vocab: int, hidden: int, inner: int, layers: int, heads: int, kv: int) -> dict[str, int]:
    """The sizes every stand-in model sets, under transformers' config names (`inner`: the MLP's)."""
    return dict(zip(SIZE_NAMES, (vocab, hidden, inner, layers, heads, kv), strict=True))


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads`, default 1: the figures must not depend on how busy the other cores are."""
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: on a shared, oversubscribed CPU more threads only contend)",
    )
