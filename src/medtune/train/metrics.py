"""Per-step training metrics: one JSON line per logged step in `metrics.jsonl`, TensorBoard when asked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from medtune.config import TrainConfig
from medtune.errors import MedtuneError
from medtune.train.distributed import DistInfo

MetricSink = Callable[[dict[str, Any]], None]


def metric_sinks(train: TrainConfig, out_dir: Path, metrics_path: Path, info: DistInfo) -> MetricSink:
    """Where each step's metrics go: always `metrics.jsonl`, plus TensorBoard when asked for."""
    writer = None
    if train.tensorboard and info.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MedtuneError(
                "train.tensorboard: the `tensorboard` package is not installed "
                "(pip install tensorboard), or set it to false"
            ) from None
        writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    def log(row: dict[str, Any]) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for key, value in row.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    writer.add_scalar(f"train/{key}", value, row["step"])
            writer.flush()

    return log


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint's step, so a resumed log has no repeats or gaps."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def peak_memory(info: DistInfo) -> int:
    """Peak bytes of this rank: CUDA allocator peak on a GPU, peak resident set size on CPU."""
    if info.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(info.device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
