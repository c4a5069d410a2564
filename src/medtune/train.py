"""The training loop: QLoRA + packing, single process or FSDP2 under torchrun. Read it top to bottom.

`run_train` is setup -> (resume) -> loop -> save. One optimiser step consumes a *global batch* of
`micro_batch_size * grad_accum * world_size` rows, taken in order from the epoch's deterministic
row plan, so the data position is just (epoch, step) and a resumed run sees exactly the rows the
killed one would have. The loss of a step is the sum of token losses over every micro-batch on
every rank divided by the step's total number of target tokens: a mean of per-batch means would
over-weight short rows, which packing and accumulation make common.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medtune import checkpoint as ckpt
from medtune.config import RunConfig
from medtune.data.token_store import (
    StoredExamples,
    ensure_token_store,
    open_token_store,
    store_inputs,
    store_path,
    training_examples,
)
from medtune.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    gather_ints,
    init_distributed,
    shard_with_fsdp2,
    shutdown_distributed,
)
from medtune.errors import MedtuneError, RunDirError
from medtune.loss import loss_sum
from medtune.model.load import compute_dtype, load_model_for_training
from medtune.packing import build_rows, collate, packing_stats
from medtune.progress import progress_bar


class CausalLMLoss(nn.Module):
    """The model plus its loss as one module, so FSDP2's root unit spans the whole loss computation
    (embeddings, norm and lm_head stay gathered while the chunked loss uses them)."""

    def __init__(self, model: nn.Module, cfg: RunConfig) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = cfg.train

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return loss_sum(self.model, batch, self.train_cfg)


@dataclass
class Position:
    """Where training is: the next optimiser step to take (0-based, global across epochs)."""

    step: int = 0


def run_train(
    cfg: RunConfig, prepare_dir: Path, out_dir: Path, resume: bool = False, force: bool = False
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `prepare_dir/train.jsonl`; write the adapter to `out_dir/adapter`."""
    info = init_distributed(cfg.distributed)
    try:
        return _train(cfg, prepare_dir, out_dir, resume, force, info)
    finally:
        shutdown_distributed()


def _train(
    cfg: RunConfig, prepare_dir: Path, out_dir: Path, resume: bool, force: bool, info: DistInfo
) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)  # identical LoRA init on every rank
    examples, without_target = _tokenized_examples(cfg, prepare_dir, info)
    lengths = examples.lengths()

    model = load_model_for_training(cfg, fsdp=info.distributed, device=info.device)
    module: nn.Module = CausalLMLoss(model, cfg)
    if info.distributed:
        shard_with_fsdp2(module, cfg.distributed, compute_dtype(cfg.model, info.device))
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, trainable, info)
    seed_dropout(cfg.seed, info)

    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size
    plan0 = build_rows(lengths, cfg.packing, cfg.seed, 0)
    steps_per_epoch = max(1, math.ceil(len(plan0) / rows_per_step))
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
    scheduler = _scheduler(cfg, optimizer, total_steps)

    ckpt_root = out_dir / "checkpoints"
    metrics_path = out_dir / "metrics.jsonl"
    pos = Position()
    if resume:
        pos = _resume(cfg, ckpt_root, module, optimizer, scheduler, metrics_path, info, force)
    elif info.is_main:
        _start_fresh(out_dir, ckpt_root, metrics_path)

    metrics_sinks = _metric_sinks(cfg, out_dir, metrics_path, info)
    stop = _StopFlag()
    stats = packing_stats(plan0, lengths, cfg.packing)
    if info.is_main:
        print(
            f"train: {len(examples)} examples ({without_target} left out: no target token) "
            f"-> {len(plan0)} rows/epoch "
            f"(packing efficiency {stats['efficiency']:.1%}), {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, world size {info.world_size}"
        )

    module.train()  # before the first forward: bitsandbytes repacks 4-bit weights in eval mode on some CPUs
    plan_epoch, plan = 0, plan0
    bad_in_a_row = 0
    stopping = False
    last_loss = float("nan")
    with progress_bar("train", total_steps, enabled=info.is_main, completed=pos.step) as advance:
        while pos.step < total_steps and not stopping:
            epoch, step_in_epoch = divmod(pos.step, steps_per_epoch)
            if epoch != plan_epoch:  # each epoch reshuffles its rows, deterministically
                plan_epoch, plan = epoch, build_rows(lengths, cfg.packing, cfg.seed, epoch)
            window = plan[step_in_epoch * rows_per_step : (step_in_epoch + 1) * rows_per_step]
            started = time.perf_counter()
            loss, n_targets, real, slots, grad_norm = _optimizer_step(
                cfg, module, optimizer, examples, window, info
            )
            finite = math.isfinite(loss)
            if finite:
                scheduler.step()
                bad_in_a_row = 0
                last_loss = loss
            else:
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise MedtuneError(
                        f"training stopped: {bad_in_a_row} steps in a row had a non-finite loss "
                        f"(last at step {pos.step + 1}). Lower train.lr, check the data, or resume from "
                        f"the last checkpoint in {ckpt_root}."
                    )
            pos.step += 1
            elapsed = time.perf_counter() - started
            logging_step = pos.step % cfg.train.log_every == 0
            peaks = gather_ints(_peak_memory(info), info) if logging_step else []  # every rank joins
            if info.is_main and logging_step:
                metrics_sinks(
                    {
                        "step": pos.step,
                        "epoch": epoch,
                        "loss": loss,
                        "skipped": not finite,
                        "lr": optimizer.param_groups[0]["lr"],
                        "grad_norm": grad_norm,
                        "target_tokens": n_targets,
                        "real_tokens": real,
                        "slots": slots,
                        "real_token_fraction": real / max(slots, 1),
                        "tokens_per_s": real / elapsed,
                        "step_seconds": elapsed,
                        "peak_memory_bytes": max(peaks),
                        "peak_memory_bytes_per_rank": peaks,
                    },
                )
            advance(f"loss {loss:.4f}")
            save_due = cfg.train.save_every and pos.step % cfg.train.save_every == 0
            stopping = stop.agreed(info)
            if save_due or stopping:
                _save(cfg, ckpt_root, pos, module, optimizer, scheduler, info)
    stop.restore()

    if stopping:
        if info.is_main:
            print(f"train: stopped by signal after step {pos.step}; resume with --resume")
        return {"stopped_at_step": pos.step, "total_steps": total_steps}
    _save(cfg, ckpt_root, pos, module, optimizer, scheduler, info)
    _save_adapter(model, module, out_dir / "adapter", info)
    summary = {
        "steps": pos.step,
        "final_loss": last_loss,
        "examples": len(examples),
        "examples_without_target": without_target,
        "rows_per_epoch": len(plan0),
        "packing": stats,
        "world_size": info.world_size,
    }
    if info.is_main:
        print(f"train: done, {pos.step} steps, final loss {last_loss:.4f}; adapter in {out_dir / 'adapter'}")
    return summary


def seed_dropout(seed: int, info: DistInfo) -> None:
    """Give each rank its own random stream from here on, after the shared-seed model init.

    The LoRA weights must start identical on every rank, but dropout masks must not: with one seed
    everywhere, FSDP ranks drop the same units for their different rows, which is not the dropout
    the config asked for. A resume replaces this state with the rank's saved one (checkpoint.py).
    """
    torch.manual_seed(seed + info.rank)


def _optimizer_step(
    cfg: RunConfig,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    examples: StoredExamples,
    window: list[list[int]],
    info: DistInfo,
) -> tuple[float, int, int, int, float]:
    """Forward/backward over this rank's micro-batches of `window`, then one optimiser step.

    Returns (global mean token loss, global target tokens, real tokens, slots, grad norm). Ranks
    whose share of the last window of an epoch is empty still run a batch with no targets: every
    rank must take part in FSDP's collectives.
    """
    mbs, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    micro, real, slots = [], 0, 0
    for i in range(accum):
        start = (i * info.world_size + info.rank) * mbs
        rows = window[start : start + mbs]
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
    local_targets = sum(int(b["num_target_tokens"]) for b in micro)
    total_targets = int(all_reduce_sum(torch.tensor([local_targets], dtype=torch.float64), info).item())
    denominator = max(total_targets, 1)

    loss_total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        batch = {k: (v.to(info.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        if info.distributed:
            module.set_requires_gradient_sync(i == len(micro) - 1)  # reduce-scatter once per step
        summed, _ = module(batch)
        # FSDP averages gradients over ranks, so scale by world size to get sum / global tokens.
        (summed * (info.world_size / denominator)).backward()
        loss_total += summed.detach().double().cpu()

    loss = float(all_reduce_sum(loss_total.reshape(1), info).item()) / denominator
    counts = all_reduce_sum(torch.tensor([real, slots], dtype=torch.float64), info)
    grad_norm = float("nan")
    if math.isfinite(loss):
        params = [p for p in module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, total_targets, int(counts[0]), int(counts[1]), grad_norm


def _tokenized_examples(cfg: RunConfig, prepare_dir: Path, info: DistInfo) -> tuple[StoredExamples, int]:
    """Tokenised training examples, and how many were left out because they have no target token
    (e.g. an empty response): they would cost compute and teach nothing. The count is reported.

    They come from the token store next to train.jsonl (`data/token_store.py`): global rank 0 builds
    it when missing or stale, the other ranks wait at the barrier, then every rank maps it read-only.
    A node that does not see rank 0's prepare folder (no shared storage) builds its own copy on its
    local rank 0; the store is deterministic, so every copy holds the same bytes.
    """
    train_file = prepare_dir / "train.jsonl"
    if not train_file.is_file():
        raise RunDirError(f"{train_file} not found: run `medtune prepare` first")
    inputs = store_inputs(prepare_dir, cfg.model, cfg.format)
    path = store_path(prepare_dir, inputs)
    if info.is_main:
        ensure_token_store(prepare_dir, cfg.model, cfg.format, inputs)
    barrier(info)
    if info.local_rank == 0 and not path.is_dir():  # built into a temp folder and renamed: whole or absent
        ensure_token_store(prepare_dir, cfg.model, cfg.format, inputs)
    barrier(info)
    store = open_token_store(path)
    examples, without_target = training_examples(store, cfg.format.train_on_prompt)
    if not len(examples):
        raise RunDirError(f"{train_file} holds no training examples with a target to learn")
    return examples, without_target


def _optimizer(cfg: RunConfig, params: list[nn.Parameter], info: DistInfo) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "betas": (0.9, 0.999)}
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs, fused=info.device.type == "cuda" or None)
    if info.device.type != "cuda":
        raise MedtuneError(f"train.optimizer: {cfg.train.optimizer} needs a CUDA GPU; use adamw on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.train.optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kwargs)


def _scheduler(
    cfg: RunConfig, optimizer: torch.optim.Optimizer, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, kind = cfg.train.warmup_steps, cfg.train.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save(
    cfg: RunConfig,
    root: Path,
    pos: Position,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: DistInfo,
) -> None:
    state = {
        "step": pos.step,
        "config_hash": cfg.config_hash(),
        "scheduler": scheduler.state_dict(),
        "world_size": info.world_size,
    }
    ckpt.save_checkpoint(root, pos.step, module, optimizer, state, info, cfg.train.keep_last)


def _resume(
    cfg: RunConfig,
    root: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    metrics_path: Path,
    info: DistInfo,
    force: bool,
) -> Position:
    found = ckpt.complete_checkpoints(root)
    if not found:
        if info.is_main:
            print(f"train: no complete checkpoint in {root}; starting from step 0")
            _start_fresh(root.parent, root, metrics_path)
        return Position()
    latest = found[-1]
    state = json.loads((latest / "trainer_state.json").read_text(encoding="utf-8"))
    if state["config_hash"] != cfg.config_hash() and not force:
        raise RunDirError(
            f"{latest} was written with another config (hash {state['config_hash']}, now "
            f"{cfg.config_hash()}); resuming would mix two runs. Use --force to resume anyway."
        )
    if state["world_size"] != info.world_size:
        raise RunDirError(
            f"{latest} was written by {state['world_size']} process(es), this run has "
            f"{info.world_size}: the data order would differ. Resume with the same --nproc."
        )
    ckpt.load_checkpoint(latest, module, optimizer, info)
    scheduler.load_state_dict(state["scheduler"])
    if info.is_main:
        _truncate_metrics(metrics_path, state["step"])
        print(f"train: resumed from {latest.name} (step {state['step']})")
    return Position(step=state["step"])


def _start_fresh(out_dir: Path, ckpt_root: Path, metrics_path: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    check_fresh_start(out_dir)
    metrics_path.write_text("")


def check_fresh_start(out_dir: Path) -> None:
    """Refuse to train from scratch over another run's checkpoints (also checked before `run` starts)."""
    ckpt_root = out_dir / "checkpoints"
    if ckpt.complete_checkpoints(ckpt_root):
        raise RunDirError(
            f"{ckpt_root} already holds checkpoints: pass --resume to continue that run, "
            f"or delete {out_dir} to start over"
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to the checkpoint's step, so a resumed log has no repeats or gaps."""
    if not path.is_file():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _metric_sinks(cfg: RunConfig, out_dir: Path, metrics_path: Path, info: DistInfo) -> Any:
    """Where each step's metrics go: always `metrics.jsonl`, plus TensorBoard when asked for."""
    writer = None
    if cfg.train.tensorboard and info.is_main:
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


def _peak_memory(info: DistInfo) -> int:
    if info.device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(info.device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _save_adapter(model: nn.Module, module: nn.Module, out: Path, info: DistInfo) -> None:
    """Write the LoRA adapter in PEFT format (safetensors), gathered from FSDP shards on rank 0."""
    full: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            full[name.removeprefix("model.")] = t.detach().cpu()
    if info.is_main:
        model.save_pretrained(out, state_dict=full, safe_serialization=True)


class _StopFlag:
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
