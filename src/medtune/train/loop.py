"""The training loop: QLoRA + packing, single process or FSDP2 under torchrun. Read it top to bottom.

`run_train` is setup -> (resume) -> train -> save. One optimiser step consumes a *global batch* of
`micro_batch_size * grad_accum * world_size` rows, taken in order from the epoch's deterministic
row plan (`data.StepRows`), so the data position is just the step and a resumed run sees exactly
the rows the killed one would have. The loss of a step is the sum of token losses over every
micro-batch on every rank divided by the step's total number of target tokens: a mean of per-batch
means would over-weight short rows, which packing and accumulation make common.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from medtune.config import RunConfig
from medtune.data.token_store import StoredExamples
from medtune.errors import MedtuneError
from medtune.loss import CausalLMLoss
from medtune.model.load import compute_dtype, load_model_for_training
from medtune.packing import Batch, collate, packing_stats
from medtune.progress import progress_bar
from medtune.train.checkpoint import (
    TrainerState,
    check_fresh_start,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from medtune.train.data import StepRows, micro_batch_rows, tokenized_examples
from medtune.train.distributed import (
    DistInfo,
    StopFlag,
    all_reduce_sum,
    gather_ints,
    init_distributed,
    shard_with_fsdp2,
    shutdown_distributed,
)
from medtune.train.metrics import MetricSink, metric_sinks, peak_memory, truncate_metrics
from medtune.train.optim import build_optimizer, build_scheduler


@dataclass
class Run:
    """What `setup` built: everything the loop reads and `save` writes."""

    cfg: RunConfig
    info: DistInfo
    out_dir: Path
    examples: StoredExamples
    without_target: int
    model: nn.Module
    """The PEFT model, which writes the adapter."""
    module: CausalLMLoss
    """The model with its loss: the FSDP2 root under torchrun."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    rows: StepRows

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"


class StepResult(NamedTuple):
    loss: float
    """Global mean token loss: the summed token losses of every rank over all target tokens."""
    target_tokens: int
    real_tokens: int
    slots: int
    grad_norm: float


def run_train(
    cfg: RunConfig, prepare_dir: Path, out_dir: Path, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `prepare_dir/train.jsonl`; write the adapter to `out_dir/adapter`."""
    info = init_distributed(cfg.distributed)
    try:
        run = setup(cfg, prepare_dir, out_dir, info)
        step = resume_from_checkpoint(run, force) if resume else start_fresh(run)
        log = metric_sinks(cfg.train, out_dir, run.metrics_path, info)
        stop = StopFlag()
        stats = announce(run)
        step, stopped, last_loss = train(run, step, log, stop)
        if stopped:
            if info.is_main:
                print(f"train: stopped by signal after step {step}; resume with --resume")
            return {"stopped_at_step": step, "total_steps": run.rows.total_steps}
        return finish(run, step, last_loss, stats)
    finally:
        shutdown_distributed()


def setup(cfg: RunConfig, prepare_dir: Path, out_dir: Path, info: DistInfo) -> Run:
    """Examples, model (sharded under torchrun), optimiser, schedule and the row plan."""
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    examples, without_target = tokenized_examples(cfg, prepare_dir, info)
    model = load_model_for_training(cfg, fsdp=info.distributed, device=info.device)
    module = CausalLMLoss(model, cfg.train)
    if info.distributed:
        shard_with_fsdp2(module, cfg.distributed, compute_dtype(cfg.model, info.device))
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg.train, trainable, info.device)
    seed_dropout(cfg.seed, info)
    rows = StepRows(examples.lengths(), cfg.packing, cfg.train, cfg.seed, info.world_size)
    scheduler = build_scheduler(cfg.train, optimizer, rows.total_steps)
    return Run(cfg, info, out_dir, examples, without_target, model, module, optimizer, scheduler, rows)


def seed_dropout(seed: int, info: DistInfo) -> None:
    """Give each rank its own random stream from here on, after the shared-seed model init.

    The LoRA weights must start identical on every rank, but dropout masks must not: with one seed
    everywhere, FSDP ranks drop the same units for their different rows, which is not the dropout
    the config asked for. A resume replaces this state with the rank's saved one (checkpoint.py).
    """
    torch.manual_seed(seed + info.rank)


def start_fresh(run: Run) -> int:
    """An empty metrics log, refusing to start over another run's checkpoints; returns step 0."""
    if run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        check_fresh_start(run.out_dir)
        run.metrics_path.write_text("")
    return 0


def resume_from_checkpoint(run: Run, force: bool) -> int:
    """Restore the newest checkpoint that may continue this run; returns the step it was taken at."""
    found = resumable_checkpoint(run.ckpt_root, run.cfg.config_hash(), run.info.world_size, force)
    if found is None:
        if run.info.is_main:
            print(f"train: no complete checkpoint in {run.ckpt_root}; starting from step 0")
        return start_fresh(run)
    path, state = found
    load_checkpoint(path, run.module, run.optimizer, run.info)
    run.scheduler.load_state_dict(state.scheduler)
    if run.info.is_main:
        truncate_metrics(run.metrics_path, state.step)
        print(f"train: resumed from {path.name} (step {state.step})")
    return state.step


def announce(run: Run) -> dict[str, Any]:
    """Print what the run will do; returns the packing statistics of the first epoch's rows."""
    rows, lengths = run.rows, run.rows.lengths
    stats = packing_stats(rows.first_epoch, lengths, run.cfg.packing)
    if run.info.is_main:
        print(
            f"train: {len(run.examples)} examples ({run.without_target} left out: no target token) "
            f"-> {len(rows.first_epoch)} rows/epoch "
            f"(packing efficiency {stats['efficiency']:.1%}), {rows.steps_per_epoch} steps/epoch, "
            f"{rows.total_steps} steps, world size {run.info.world_size}"
        )
    return stats


def train(run: Run, step: int, log: MetricSink, stop: StopFlag) -> tuple[int, bool, float]:
    """Optimiser steps from `step` to the last one, or until a stop signal; checkpoints on the way.

    Returns (steps done, stopped by a signal, last finite loss). A step with a non-finite loss is
    skipped (no update, the schedule does not advance); `train.max_bad_steps` of them in a row stop
    the run.
    """
    cfg, info, total = run.cfg, run.info, run.rows.total_steps
    run.module.train()  # before the first forward: in eval mode bitsandbytes repacks 4-bit weights
    bad_in_a_row, stopping, last_loss = 0, False, float("nan")
    with progress_bar("train", total, enabled=info.is_main, completed=step) as advance:
        while step < total and not stopping:
            epoch, window = run.rows.window(step)
            started = time.perf_counter()
            result = optimizer_step(cfg, run.module, run.optimizer, run.examples, window, info)
            if math.isfinite(result.loss):
                run.scheduler.step()
                bad_in_a_row, last_loss = 0, result.loss
            else:
                bad_in_a_row += 1
                _stop_if_diverged(bad_in_a_row, cfg.train.max_bad_steps, step, run.ckpt_root)
            step += 1
            if step % cfg.train.log_every == 0:
                log_step(run, log, step, epoch, result, time.perf_counter() - started)
            advance(f"loss {result.loss:.4f}")
            stopping = stop.agreed(info)
            if stopping or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save(run, step)
    stop.restore()
    return step, stopping, last_loss


def _stop_if_diverged(bad_in_a_row: int, max_bad_steps: int, step: int, ckpt_root: Path) -> None:
    if bad_in_a_row >= max_bad_steps:
        raise MedtuneError(
            f"training stopped: {bad_in_a_row} steps in a row had a non-finite loss "
            f"(last at step {step + 1}). Lower train.lr, check the data, or resume from "
            f"the last checkpoint in {ckpt_root}."
        )


def optimizer_step(
    cfg: RunConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: StoredExamples,
    window: list[list[int]],
    info: DistInfo,
) -> StepResult:
    """Forward/backward over this rank's micro-batches of the global batch `window`, then one
    optimiser step (skipped when the loss is not finite)."""
    micro, real, slots = _micro_batches(cfg, examples, window, info)
    local_targets = sum(int(b["num_target_tokens"]) for b in micro)
    total_targets = int(all_reduce_sum(torch.tensor([local_targets], dtype=torch.float64), info).item())
    denominator = max(total_targets, 1)
    summed = _forward_backward(module, micro, denominator, info)
    loss = float(all_reduce_sum(summed.reshape(1), info).item()) / denominator
    counts = all_reduce_sum(torch.tensor([real, slots], dtype=torch.float64), info)
    grad_norm = float("nan")
    if math.isfinite(loss):
        params = [p for p in module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, total_targets, int(counts[0]), int(counts[1]), grad_norm)


def _micro_batches(
    cfg: RunConfig, examples: StoredExamples, window: list[list[int]], info: DistInfo
) -> tuple[list[Batch], int, int]:
    """This rank's `grad_accum` micro-batches of `window`, with their real tokens and tensor slots.

    A rank whose share of the last window of an epoch is empty still gets a batch, with no targets:
    every rank must take part in FSDP's collectives.
    """
    micro, real, slots = [], 0, 0
    for i in range(cfg.train.grad_accum):
        rows = micro_batch_rows(window, i, cfg.train.micro_batch_size, info)
        if rows:
            batch = collate(examples, rows, cfg.packing)
            real += sum(
                min(len(examples[j]["input_ids"]), cfg.packing.max_seq_len) for row in rows for j in row
            )
            slots += batch["input_ids"].numel()
        else:  # a filler batch with no targets
            batch = collate(examples, window[:1], cfg.packing)
            batch["labels"] = torch.full_like(batch["labels"], -100)
            batch["num_target_tokens"] = 0
        micro.append(batch)
    return micro, real, slots


def _forward_backward(
    module: nn.Module, micro: list[Batch], denominator: int, info: DistInfo
) -> torch.Tensor:
    """Backpropagate sum of token losses / `denominator` (the global target count); return this rank's sum."""
    loss_total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        batch = {k: (v.to(info.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if info.distributed:
            module.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
        summed, _ = module(batch)
        # FSDP averages gradients over ranks, so scale by world size to get sum / global tokens.
        (summed * (info.world_size / denominator)).backward()
        loss_total += summed.detach().double().cpu()
    return loss_total


def log_step(run: Run, log: MetricSink, step: int, epoch: int, result: StepResult, seconds: float) -> None:
    """One metrics row; every rank joins the peak-memory gather, the main rank writes."""
    peaks = gather_ints(peak_memory(run.info), run.info)
    if not run.info.is_main:
        return
    log(
        {
            "step": step,
            "epoch": epoch,
            "loss": result.loss,
            "skipped": not math.isfinite(result.loss),
            "lr": run.optimizer.param_groups[0]["lr"],
            "grad_norm": result.grad_norm,
            "target_tokens": result.target_tokens,
            "real_tokens": result.real_tokens,
            "slots": result.slots,
            "real_token_fraction": result.real_tokens / max(result.slots, 1),
            "tokens_per_s": result.real_tokens / seconds,
            "step_seconds": seconds,
            "peak_memory_bytes": max(peaks),
            "peak_memory_bytes_per_rank": peaks,
        }
    )


def save(run: Run, step: int) -> None:
    """An atomic checkpoint of step `step` (every rank writes its shard)."""
    state = TrainerState(
        step=step,
        config_hash=run.cfg.config_hash(),
        scheduler=run.scheduler.state_dict(),
        world_size=run.info.world_size,
    )
    save_checkpoint(run.ckpt_root, run.module, run.optimizer, state, run.info, run.cfg.train.keep_last)


def finish(run: Run, step: int, last_loss: float, stats: dict[str, Any]) -> dict[str, Any]:
    """The final checkpoint and the adapter; returns the run's summary."""
    save(run, step)
    adapter_dir = run.out_dir / "adapter"
    save_adapter(run.model, run.module, adapter_dir, run.info)
    if run.info.is_main:
        print(f"train: done, {step} steps, final loss {last_loss:.4f}; adapter in {adapter_dir}")
    return {
        "steps": step,
        "final_loss": last_loss,
        "examples": len(run.examples),
        "examples_without_target": run.without_target,
        "rows_per_epoch": len(run.rows.first_epoch),
        "packing": stats,
        "world_size": run.info.world_size,
    }


def save_adapter(model: nn.Module, module: nn.Module, out: Path, info: DistInfo) -> None:
    """Write the LoRA adapter in PEFT format (safetensors), gathered from FSDP shards on rank 0."""
    full: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            full[name.removeprefix("model.")] = t.detach().cpu()
    if info.is_main:
        model.save_pretrained(out, state_dict=full, safe_serialization=True)
