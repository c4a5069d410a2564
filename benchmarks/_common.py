"""What every benchmark script shares: how it names the machine its figures came from.

Scripts run as `python benchmarks/NAME.py`, so this folder is on `sys.path` and they import
`from _common import ...`.
"""

from __future__ import annotations

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
