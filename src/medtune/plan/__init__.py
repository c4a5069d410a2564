"""Will it fit? GPU memory of a QLoRA training step, planned from `config.json` alone (no weights).

`shape.py` reads the model's numbers, `memory.py` adds up the bytes one rank holds (its docstring
lists every component), `search.py` turns a plan into verdicts; this module is `medtune plan`'s
entry point and re-exports the planner's public names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medtune.config import CHUNKED_CE_MIN_VOCAB
from medtune.plan.memory import (
    GIB,
    MemoryPlan,
    PlanOptions,
    logits_bytes,
    plan_memory,
    quantized_linear_bytes,
)
from medtune.plan.search import (
    GPU_SIZES_GB,
    cheapest_fitting_switches,
    fits,
    max_micro_batch,
    max_seq_len,
    min_gpus,
    option_savings,
)
from medtune.plan.shape import ModelShape, model_shape, read_config_json

# The planner's public names, importable as `medtune.plan.X` wherever they live in the package.
__all__ = [
    "GIB",
    "MemoryPlan",
    "ModelShape",
    "PlanOptions",
    "cheapest_fitting_switches",
    "fits",
    "logits_bytes",
    "max_micro_batch",
    "max_seq_len",
    "min_gpus",
    "model_shape",
    "option_savings",
    "options_from_run_config",
    "plan_memory",
    "print_plan",
    "quantized_linear_bytes",
    "read_config_json",
    "run_plan",
]


def options_from_run_config(cfg: Any, gpus: int, seq_len: int | None) -> PlanOptions:
    """PlanOptions from a RunConfig. Planning is for the GPU, so dtype auto means bf16."""
    chunked = {"on": True, "liger": True, "cce": True, "off": False}.get(cfg.train.chunked_ce)
    model_cfg = read_config_json(Path(cfg.model.path))
    if chunked is None:  # auto: chunk when the vocabulary is large (as the trainer decides)
        chunked = model_shape(model_cfg).vocab >= CHUNKED_CE_MIN_VOCAB
    return PlanOptions(
        quant=cfg.quantization.mode,
        double_quant=cfg.quantization.double_quant,
        dtype="bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype,
        lora_r=cfg.lora.r,
        lora_targets=cfg.lora.target_modules,
        lora_dropout=cfg.lora.dropout,
        use_dora=cfg.lora.use_dora,
        optimizer=cfg.train.optimizer,
        attention="eager" if cfg.model.attn_implementation == "eager" else "sdpa",
        seq_len=seq_len or cfg.packing.max_seq_len,
        micro_batch=cfg.train.micro_batch_size,
        checkpoint_every_k=cfg.train.checkpoint_every_k_layers if cfg.train.gradient_checkpointing else None,
        activation_offload=cfg.train.activation_offload,
        chunked_ce=chunked,
        ce_chunk=cfg.train.ce_chunk_size,
        gpus=gpus,
    )


def run_plan(
    cfg_or_path: Any,
    gpus: int = 1,
    gpu_memory_gb: float = 24.0,
    seq_len: int | None = None,
    micro_batch: int | None = None,
    show: bool = True,
    out_json: Path | None = None,
) -> dict[str, Any]:
    """Plan a RunConfig (its model's config.json and train settings) or a bare model dir / config.json
    (medtune's QLoRA defaults) on `gpus` GPUs of `gpu_memory_gb` GiB; print the table, return JSON."""
    if hasattr(cfg_or_path, "model"):
        model_config = read_config_json(Path(cfg_or_path.model.path))
        opts = options_from_run_config(cfg_or_path, gpus, seq_len)
    else:
        model_config = read_config_json(cfg_or_path)
        opts = PlanOptions(gpus=gpus, seq_len=seq_len or 2048)
    if micro_batch:
        opts.micro_batch = micro_batch
    model_config = model_shape(model_config)
    plan = plan_memory(model_config, opts)
    result = {
        **plan.to_json(),
        "gpu_memory_gb": gpu_memory_gb,
        "gpus": gpus,
        "fits": fits(plan, gpu_memory_gb),
        "max_seq_len": max_seq_len(model_config, opts, gpu_memory_gb),
        "max_micro_batch": max_micro_batch(model_config, opts, gpu_memory_gb),
        "savings_bytes": option_savings(model_config, opts),
        "cheapest_fitting": cheapest_fitting_switches(model_config, opts, gpu_memory_gb),
        "min_gpus": {str(gb): min_gpus(model_config, opts, gb) for gb in GPU_SIZES_GB},
    }
    if show:
        print_plan(result)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(result, indent=2))
    return result


def print_plan(result: dict[str, Any]) -> None:
    """The plan as a rich table with the verdict and the suggestions below it."""
    from rich.console import Console
    from rich.table import Table

    shape, opts = result["shape"], result["options"]
    title = (
        f"{shape['model_type']}: {opts['quant']} LoRA r={opts['lora_r']}, T={opts['seq_len']} "
        f"x B={opts['micro_batch']}, {result['gpus']} x {result['gpu_memory_gb']} GiB"
    )
    table = Table(title=title)
    table.add_column("component")
    table.add_column("GiB per GPU", justify="right")
    for name, value in result["components"].items():
        table.add_row(name, f"{value / GIB:.2f}")
    table.add_row("peak of the step", f"{result['total_gib']:.2f}", style="bold")
    console = Console()
    console.print(table)
    verdict = "[green]fits[/green]" if result["fits"] else "[red]does not fit[/red]"
    console.print(
        f"verdict: {verdict}; longest seq len: {result['max_seq_len']}; "
        f"largest micro-batch: {result['max_micro_batch']}"
    )
    saves = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in result["savings_bytes"].items())
    console.print(f"savings when switched on: {saves}")
    cheapest = result["cheapest_fitting"]
    console.print(
        "cheapest switches that fit: "
        + (", ".join(cheapest["switches"]) or "none needed" if cheapest else "nothing fits; add GPUs")
    )
    console.print(
        "GPUs needed with FSDP: " + ", ".join(f"{gb} GiB: {n}" for gb, n in result["min_gpus"].items())
    )
