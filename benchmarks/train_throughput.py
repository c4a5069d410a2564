"""Is medtune's training loop faster than TRL's SFTTrainer on the same job? Tokens/s and peak RSS.

Both sides train the same model on the same text, each in a fresh subprocess so its peak RSS
(`ru_maxrss`) is its own, at two settings in one run, the side that goes first swapping from one
setting to the next (medtune, TRL at `best`; TRL, medtune at `equal`), so drifting load on a shared
machine favours neither:

  common: QLoRA NF4 (double quant), LoRA r=16 alpha=32 dropout 0.05 on all linear layers,
  best-fit-decreasing packing into 512-token rows, micro-batch 4 rows, grad accum 1, gradient
  checkpointing (non-reentrant), AdamW lr 2e-4 cosine, no warm-up, max grad norm 1.0, nothing saved
  while timing.
  best:  each side at its best on this CPU. bf16 compute where the chip multiplies bf16 natively
         (amx_bf16 / avx512_bf16: medtune's `model.dtype: auto`; TRL's default `bf16=True` with the
         model and the 4-bit compute dtype in bf16), fp32 elsewhere. TRL 1.16's current defaults
         otherwise: bfd packing, which is always padding-free (one flattened row per batch), and
         loss_type "nll", a fused LM head that computes log-probs in chunks without full logits.
         medtune: packed rows and its chunked cross-entropy (`train.chunked_ce: auto`). Liger and
         Cut Cross-Entropy are Triton kernels for GPUs: the run records whether they are installed
         and usable; on a CPU neither side can use them.
  equal: both sides in fp32, otherwise as above.

Data: the quick-start's prepared training set (`medtune prepare examples/quickstart.yaml` with the
chosen model), rendered for TRL with medtune's own `render_prompt` / `render_target` + end-of-turn
text as a prompt/completion dataset, so both sides learn the same completion tokens.

Throughput counts real (non-padding) tokens over the steps after the first `--warmup` ones:
  medtune: `real_tokens` / `step_seconds` from metrics.jsonl (a step includes collation);
  TRL: a callback timing on_step_begin -> on_step_end (the batch is collated before on_step_begin,
       so TRL's timing leaves collation out) and a wrapped data collator counting each batch's
       tokens (TRL's bfd packing is padding-free: one flattened row, no pad tokens).
medtune's final checkpoint + adapter save happens after its timed steps and is not timed.
Per step, both sides also record user and system CPU seconds, minor/major page faults, CPU seconds
per thread and RSS (`usage` in the JSON; means in the table): on a shared machine these say where a
step's time went better than wall time does. The JSON is rewritten after every side, so a run cut
short still leaves the sides it finished (`complete: false`).

    python benchmarks/train_throughput.py [--model DIR] [--steps 4] [--warmup 1]
        [--settings best,equal] [--profile]

`--profile` adds torch.profiler over one steady-state step on each side (slower; timings then
include profiler overhead) and writes the top operators by self CPU time into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_name

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
DEFAULT_MODEL = REPO / "models" / "gemma3-270m"
PROFILE_TOP = 20
SETTING_NAMES = {
    "best": "each side at its best on this CPU: bf16 where native (medtune `dtype: auto`, TRL's default "
    "`bf16=True`), TRL's current defaults (padding-free bfd packing, fused chunked `nll` loss), medtune's "
    "chunked CE",
    "equal": "both fp32, the same packing, batch and checkpointing",
}

SETTINGS = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "max_seq_len": 512,
    "micro_batch_size": 4,
    "grad_accum": 1,
    "lr": 2e-4,
    "seed": 0,
}


# ---------------------------------------------------------------------------------------------- children


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def usage_now() -> dict[str, float]:
    """This process's user and system CPU seconds, minor and major page faults, and current RSS bytes.

    Per-step differences of these do not depend on other jobs' load the way wall time does: sys time
    and minor faults show memory being mapped and zeroed (large allocations going through mmap).
    """
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
        "minflt": ru.ru_minflt,
        "majflt": ru.ru_majflt,
        "rss_bytes": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        "threads": thread_cpu_seconds(),
    }


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + sys) of each thread of this process, by thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def usage_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One step's CPU user/sys seconds, page faults and CPU seconds per thread (the main thread
    first, then the others by CPU time, those under 0.05 s left out), and the RSS at its end."""
    out = {k: after[k] - before[k] for k in ("user_s", "sys_s", "minflt", "majflt")}
    main = str(os.getpid())
    per_thread = {t: s - before["threads"].get(t, 0.0) for t, s in after["threads"].items()}
    others = sorted((s for t, s in per_thread.items() if t != main and s >= 0.05), reverse=True)
    threads = [round(per_thread.get(main, 0.0), 2), *(round(s, 2) for s in others)]
    return {**out, "thread_cpu_s": threads, "rss_end_bytes": after["rss_bytes"]}


def profile_table(prof: Any) -> list[dict[str, Any]]:
    """The top operators of a torch.profiler run by self CPU time."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [
        {
            "op": e.key,
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 1),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls": e.count,
        }
        for e in events[:PROFILE_TOP]
    ]


def medtune_config(model_dir: Path, out_dir: Path, steps: int, dtype: str):
    from medtune.config import load_config

    s = SETTINGS
    return load_config(
        QUICKSTART,
        {
            "seed": s["seed"],
            "model.path": str(model_dir),
            "model.dtype": dtype,  # best: auto (bf16 where the CPU multiplies it natively); equal: float32
            "output.dir": str(out_dir),
            "quantization.mode": "nf4",
            "quantization.double_quant": True,
            "lora.r": s["lora_r"],
            "lora.alpha": s["lora_alpha"],
            "lora.dropout": s["lora_dropout"],
            "lora.target_modules": "all-linear",
            "packing.mode": "packed",
            "packing.max_seq_len": s["max_seq_len"],
            "train.max_steps": steps,
            "train.micro_batch_size": s["micro_batch_size"],
            "train.grad_accum": s["grad_accum"],
            "train.lr": s["lr"],
            "train.warmup_steps": 0,
            "train.scheduler": "cosine",
            "train.gradient_checkpointing": True,
            "train.save_every": None,
            "train.log_every": 1,
        },
    )


def child_medtune(
    model_dir: Path, prepared: Path, work: Path, steps: int, profile_step: int | None, setting: str
) -> dict:
    import torch

    import medtune.train.loop as train_mod
    from medtune.model.load import resolve_compute_dtype
    from medtune.train import run_train

    cfg = medtune_config(model_dir, work, steps, "auto" if setting == "best" else "float32")
    compute_dtype, dtype_reason = resolve_compute_dtype(cfg.model, torch.device("cpu"))
    profiled: list[Any] = []
    cpu_seconds: list[float] = []
    usage: list[dict[str, float]] = []
    original, calls = train_mod.optimizer_step, [0]

    def wrapped(*args: Any, **kwargs: Any):
        """Process CPU time of each optimiser step; torch.profiler around step `profile_step`."""
        calls[0] += 1
        cpu_start, usage_start = time.process_time(), usage_now()
        if calls[0] != profile_step:
            out = original(*args, **kwargs)
        else:
            import torch.profiler as tp

            with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
                out = original(*args, **kwargs)
            profiled.append(prof)
        cpu_seconds.append(time.process_time() - cpu_start)
        usage.append(usage_delta(usage_start, usage_now()))
        return out

    train_mod.optimizer_step = wrapped
    started = time.perf_counter()
    summary = run_train(cfg, prepared, work / "train")
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "step_seconds": [r["step_seconds"] for r in rows],
        "cpu_seconds": cpu_seconds,
        "usage": usage,
        "real_tokens": [r["real_tokens"] for r in rows],
        "target_tokens": [r["target_tokens"] for r in rows],
        "losses": [r["loss"] for r in rows],
        "packing_efficiency": summary["packing"]["efficiency"],
        "rows_per_epoch": summary["rows_per_epoch"],
        "wall_seconds_incl_load_and_save": wall,
        "compute_dtype": str(compute_dtype),
        "compute_dtype_reason": dtype_reason,
        "chunked_ce": cfg.train.chunked_ce,
        "profile": profile_table(profiled[0]) if profiled else None,
    }


def trl_dataset(model_dir: Path, prepared: Path):
    """medtune's prompt/target text for each prepared record, as TRL's prompt/completion dataset."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from medtune.config import FormatConfig
    from medtune.data.prepare import read_prepared
    from medtune.format import end_of_turn_text, render_prompt, render_target

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cfg = FormatConfig()
    end = end_of_turn_text(tokenizer, cfg)
    rows = [
        {"prompt": render_prompt(r, tokenizer, cfg), "completion": render_target(r, cfg, tokenizer) + end}
        for r in read_prepared(prepared, "train")
    ]
    return Dataset.from_list(rows), tokenizer


def trl_compute_dtype(setting: str):
    """TRL's best on this CPU: bf16 (its default `bf16=True`) where the chip multiplies bf16 natively,
    by the rule medtune's `dtype: auto` uses; fp32 elsewhere and at equal settings."""
    import torch

    from medtune.model.cpu_caps import cpu_bf16_choice

    native, _ = cpu_bf16_choice()
    return torch.bfloat16 if setting == "best" and native else torch.float32


def child_trl(
    model_dir: Path, prepared: Path, work: Path, steps: int, profile_step: int | None, setting: str
) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    s = SETTINGS
    dtype = trl_compute_dtype(setting)
    dataset, tokenizer = trl_dataset(model_dir, prepared)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation="sdpa",
        device_map={"": "cpu"},
        local_files_only=True,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        ),
    )
    # TRL 1.16's defaults kept: packing_strategy "bfd" (always padding-free: one flattened row per
    # batch), loss_type "nll" (a fused LM head that computes log-probs in chunks, never the full
    # logits), completion-only loss for prompt/completion data, gradient checkpointing on, bf16 on
    # (turned off only at equal settings or where the CPU lacks native bf16).
    args = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        packing=True,
        max_length=s["max_seq_len"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        seed=s["seed"],
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(
        r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        lora_dropout=s["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )

    batch_tokens: list[tuple[int, int]] = []  # FIFO: the loader may collate a batch ahead of its step
    collate = trainer.data_collator

    def counting_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # padding-free: every position is a real token
            real = int(batch["input_ids"].numel())
        batch_tokens.append((real, int((batch["labels"] != -100).sum())))
        return batch

    trainer.data_collator = counting_collator
    timer = _trl_timer(TrainerCallback, batch_tokens, profile_step)
    trainer.add_callback(timer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "step_seconds": timer.seconds,
        "cpu_seconds": timer.cpu_seconds,
        "usage": timer.usage,
        "real_tokens": timer.real,
        "target_tokens": timer.targets,
        "losses": timer.losses,
        "trainable_dtype": str(next(p.dtype for p in trainer.model.parameters() if p.requires_grad)),
        "compute_dtype": str(dtype),
        "trl_args": {
            "bf16": args.bf16,
            "packing_strategy": args.packing_strategy,
            "padding_free": trainer.padding_free,
            "loss_type": args.loss_type,
            "completion_only_loss": args.completion_only_loss,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "packed_rows": len(trainer.train_dataset),
        "wall_seconds_incl_load_and_save": wall,
        "profile": profile_table(timer.profiled[0]) if timer.profiled else None,
    }


def _trl_timer(base: type, batch_tokens: list[tuple[int, int]], profile_step: int | None):
    import torch.profiler as tp

    class StepTimer(base):
        """Times each optimiser step and pairs it with the tokens of the batch it consumed."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.cpu_seconds: list[float] = []
            self.usage: list[dict[str, float]] = []
            self.real: list[int] = []
            self.targets: list[int] = []
            self.losses: list[float] = []
            self.profiled: list[Any] = []
            self._prof: Any = None

        def on_step_begin(self, args, state, control, **kwargs):
            if profile_step is not None and state.global_step + 1 == profile_step:
                self._prof = tp.profile(activities=[tp.ProfilerActivity.CPU])
                self._prof.__enter__()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()
            self._usage_start = usage_now()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._start)
            self.cpu_seconds.append(time.process_time() - self._cpu_start)
            self.usage.append(usage_delta(self._usage_start, usage_now()))
            if self._prof is not None:
                self._prof.__exit__(None, None, None)
                self.profiled.append(self._prof)
                self._prof = None
            real, targets = batch_tokens.pop(0)
            self.real.append(real)
            self.targets.append(targets)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def run_child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("side", choices=["medtune", "trl"])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--profile-step", type=int, default=None)
    parser.add_argument("--setting", choices=list(SETTING_NAMES), required=True)
    args = parser.parse_args(argv)
    from medtune.offline import enforce_offline

    enforce_offline()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    run = child_medtune if args.side == "medtune" else child_trl
    result = run(args.model, args.prepared, args.work, args.steps, args.profile_step, args.setting)
    import torch

    result["torch_threads"] = torch.get_num_threads()
    result["torch_interop_threads"] = torch.get_num_interop_threads()
    result["thread_env"] = {
        k: v for k, v in os.environ.items() if k.startswith(("OMP_", "KMP_", "MKL_", "GOMP_", "MALLOC_"))
    }
    for i, u in enumerate(result["usage"]):
        print(
            f"{args.side} step {i + 1}: {result['step_seconds'][i]:.1f} s wall, user {u['user_s']:.1f} s, "
            f"sys {u['sys_s']:.1f} s, threads {u['thread_cpu_s']}, minor faults {u['minflt']:,}, "
            f"major {u['majflt']:,}, "
            f"RSS {u['rss_end_bytes'] / 1e9:.2f} GB",
            flush=True,
        )
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(f"{args.side} ({args.setting}): peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
    (args.work / f"{args.side}.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------- parent


def steady_state(runs: list[dict], warmup: int) -> dict:
    """Tokens/s over the steps after the first `warmup` of each run (sum of tokens / sum of seconds),
    and the best single step's tokens/s (the least disturbed by other load on a shared machine)."""
    secs = [x for r in runs for x in r["step_seconds"][warmup:]]
    cpu = [x for r in runs for x in r.get("cpu_seconds", [])[warmup:]]
    real = [x for r in runs for x in r["real_tokens"][warmup:]]
    if not secs:
        raise SystemExit(f"--steps must exceed --warmup ({warmup}) to leave steps to time")
    return {
        "runs": len(runs),
        "timed_steps": len(secs),
        "real_tokens_timed": sum(real),
        "seconds_timed": sum(secs),
        "tokens_per_s": sum(real) / sum(secs),
        "best_step_tokens_per_s": max(n / t for n, t in zip(real, secs, strict=True)),
        "mean_step_s": sum(secs) / len(secs),
        "tokens_per_cpu_s": sum(real) / sum(cpu) if cpu else None,
        **usage_means([u for r in runs for u in r.get("usage", [])[warmup:]]),
        "first_loss": runs[0]["losses"][0] if runs[0]["losses"] else None,
        "final_loss": runs[0]["losses"][-1] if runs[0]["losses"] else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
    }


def usage_means(usage: list[dict]) -> dict[str, float | None]:
    """Mean user and system CPU seconds and minor page faults per timed step (None when not recorded)."""
    keys = ("user_s", "sys_s", "minflt")
    if not usage:
        return {f"mean_step_{k}": None for k in keys}
    return {f"mean_step_{k}": sum(u[k] for u in usage) / len(usage) for k in keys}


def prepare_data(model_dir: Path, out: Path) -> Path:
    """`medtune prepare` of the quick-start sources with this model, into `out/prepare`."""
    cmd = [
        sys.executable,
        "-m",
        "medtune.cli",
        "prepare",
        str(QUICKSTART),
        "-s",
        f"model.path={model_dir}",
        "-s",
        f"output.dir={out}",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / "prepare"


def default_model(tmp: Path) -> tuple[Path, str]:
    if (DEFAULT_MODEL / "config.json").is_file():
        return DEFAULT_MODEL, "gemma3-270m"
    from medtune.model.tiny import build_tiny_model

    path = build_tiny_model(
        tmp / "tiny-llama",
        "llama",
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return path, "random tiny llama (models/gemma3-270m absent)"


def peer_kernels() -> dict[str, str]:
    """Whether Liger's and Cut Cross-Entropy's fused losses can run here. Both are Triton kernels
    for GPUs (Triton has no CPU backend), so on a CPU-only machine neither side may use them."""
    import importlib.util

    import torch

    out = {}
    for name, module in (("liger-kernel", "liger_kernel"), ("cut-cross-entropy", "cut_cross_entropy")):
        if importlib.util.find_spec(module) is None:
            out[name] = "not installed"
        elif not torch.cuda.is_available():
            out[name] = "installed, unusable: Triton kernels need a GPU"
        else:
            out[name] = "installed, usable"
    return out


def print_table(rows: list[tuple[str, str, dict]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training throughput, steady state (real tokens)")
    columns = (
        "setting",
        "side",
        "dtype",
        "timed steps",
        "tokens",
        "seconds",
        "tokens/s",
        "best step tok/s",
        "tok/CPU-s",
        "s/step",
        "user+sys CPU-s/step",
        "minor faults/step",
        "peak RSS GB",
        "loss 1st->last",
    )
    for col in columns:
        table.add_column(col)
    for setting, name, s in rows:
        table.add_row(
            setting,
            name,
            s["compute_dtype"].removeprefix("torch."),
            str(s["timed_steps"]),
            str(s["real_tokens_timed"]),
            f"{s['seconds_timed']:.1f}",
            f"{s['tokens_per_s']:.1f}",
            f"{s['best_step_tokens_per_s']:.1f}",
            f"{s['tokens_per_cpu_s']:.1f}" if s["tokens_per_cpu_s"] else "-",
            f"{s['mean_step_s']:.1f}",
            f"{s['mean_step_user_s']:.1f}+{s['mean_step_sys_s']:.1f}"
            if s["mean_step_user_s"] is not None
            else "-",
            f"{s['mean_step_minflt']:,.0f}" if s["mean_step_minflt"] is not None else "-",
            f"{s['peak_rss_bytes'] / 1e9:.2f}",
            f"{s['first_loss']:.3f} -> {s['final_loss']:.3f}",
        )
    Console(width=160).print(table)


def run_order(settings: list[str], order: str) -> list[tuple[str, str]]:
    """(setting, side) in run order. 'alternate' swaps which side goes first from one setting to the
    next (medtune, TRL, TRL, medtune, ...), so load drift on a shared machine favours neither."""
    if order == "alternate":
        pairs = [("medtune", "trl") if i % 2 == 0 else ("trl", "medtune") for i in range(len(settings))]
        return [(setting, side) for setting, pair in zip(settings, pairs, strict=True) for side in pair]
    return [(setting, side) for setting in settings for side in order.split(",")]


def run_side(setting: str, side: str, work: Path, model_dir: Path, prepared: Path, args) -> dict:
    """One side at one setting in a fresh subprocess; its result with wall time and load around it."""
    work.mkdir()
    cmd = [sys.executable, __file__, "--child", side, "--model", str(model_dir), "--setting", setting]
    cmd += ["--prepared", str(prepared), "--work", str(work), "--steps", str(args.steps)]
    if args.profile:
        cmd += ["--profile-step", str(args.warmup + 1)]
    side_start, load_before = time.perf_counter(), os.getloadavg()
    print(f"running {side} at {setting} settings ({args.steps} steps) ...", flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads((work / f"{side}.json").read_text())
    result.update(
        side=side,
        setting=setting,
        child_wall_seconds=time.perf_counter() - side_start,
        loadavg_before=load_before,
        loadavg_after=os.getloadavg(),
    )
    return result


def compare(raw: list[dict], setting: str, warmup: int) -> dict:
    """Both sides' steady state at one setting and medtune / TRL ratios."""
    sides = {}
    for name in ("medtune", "trl"):
        if runs := [r for r in raw if r["side"] == name and r["setting"] == setting]:
            sides[name] = {**steady_state(runs, warmup), "compute_dtype": runs[0]["compute_dtype"]}
    if len(sides) < 2:  # one side only (--order medtune, e.g. to profile it): nothing to compare
        return {"sides": sides}
    m, t = sides["medtune"], sides["trl"]
    return {
        "sides": sides,
        "medtune_over_trl_tokens_per_s": m["tokens_per_s"] / t["tokens_per_s"],
        "medtune_over_trl_best_step_tokens_per_s": m["best_step_tokens_per_s"] / t["best_step_tokens_per_s"],
        "medtune_over_trl_peak_rss": m["peak_rss_bytes"] / t["peak_rss_bytes"],
        "medtune_over_trl_tokens_per_cpu_s": (
            m["tokens_per_cpu_s"] / t["tokens_per_cpu_s"]
            if m["tokens_per_cpu_s"] and t["tokens_per_cpu_s"]
            else None
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=None, help="model dir (default models/gemma3-270m)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1, help="leading steps left out of the timing")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over one steady step per side")
    parser.add_argument(
        "--settings",
        default="best,equal",
        help="comma-separated: best (each side's best on this CPU), equal (both fp32)",
    )
    parser.add_argument(
        "--order",
        default="alternate",
        help="'alternate' (medtune,trl at the first setting, trl,medtune at the next, ...) or the sides "
        "to run at every setting, comma-separated",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    settings = args.settings.split(",")
    if unknown := set(settings) - set(SETTING_NAMES):
        raise SystemExit(f"--settings: unknown {sorted(unknown)}; choose from {sorted(SETTING_NAMES)}")
    load_start = os.getloadavg()
    started = time.perf_counter()
    order = run_order(settings, args.order)
    raw: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            model_dir, model_name = default_model(tmp)
        else:
            model_dir, model_name = args.model.resolve(), args.model.name
        prepared = prepare_data(model_dir, tmp / "run")
        for i, (setting, side) in enumerate(order):
            raw.append(run_side(setting, side, tmp / f"{i}-{setting}-{side}", model_dir, prepared, args))
            # Written after every side, so a run cut short by its time limit still leaves its data.
            comparisons = write_results(args, settings, order, raw, model_name, load_start, started)
    print_table([(st, name, s) for st, c in comparisons.items() for name, s in c["sides"].items()])
    for setting, c in comparisons.items():
        if "medtune_over_trl_tokens_per_s" not in c:
            continue
        ratio, rss = c["medtune_over_trl_tokens_per_s"], c["medtune_over_trl_peak_rss"]
        verdict = "meets" if ratio >= 2.0 and rss <= 1.0 else "misses"
        print(
            f"{setting}: medtune / TRL tokens/s {ratio:.2f}x (best step vs best step "
            f"{c['medtune_over_trl_best_step_tokens_per_s']:.2f}x, per CPU second "
            f"{c['medtune_over_trl_tokens_per_cpu_s'] or float('nan'):.2f}x); peak RSS ratio {rss:.2f}"
            + (f" ({verdict} the target of >= 2x with no higher RSS)" if setting == "best" else "")
        )
    from medtune.model.cpu_caps import cpu_flags, native_bf16

    loads = " ".join(f"{x:.2f}" for x in load_start), " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: {cpu_name()}; native bf16 flags: {', '.join(native_bf16(cpu_flags())) or 'none'}; "
        f"model {model_name}; load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}; "
        f"wall {time.perf_counter() - started:.0f} s"
    )
    print("peer kernels: " + "; ".join(f"{k}: {v}" for k, v in peer_kernels().items()))
    print(f"wrote {args.out}")


def write_results(
    args,
    settings: list[str],
    order: list[tuple[str, str]],
    raw: list[dict],
    model_name: str,
    load_start: tuple[float, float, float],
    started: float,
) -> dict:
    """The JSON of the sides run so far (comparisons where both sides of a setting are in); returns
    the comparisons."""
    from medtune.model.cpu_caps import cpu_bf16_choice, cpu_flags, native_bf16

    comparisons = {
        st: compare(raw, st, args.warmup) for st in settings if any(r["setting"] == st for r in raw)
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": cpu_name(),
                "native_bf16_flags": native_bf16(cpu_flags()),
                "dtype_auto_choice": cpu_bf16_choice()[1],
                "model": model_name,
                "settings": {**SETTINGS, "steps": args.steps, "warmup_steps_excluded": args.warmup},
                "setting_meanings": {k: SETTING_NAMES[k] for k in settings},
                "peer_kernels": peer_kernels(),
                "loadavg_start": load_start,
                "loadavg_end": os.getloadavg(),
                "wall_seconds": time.perf_counter() - started,
                "order": [f"{setting}:{side}" for setting, side in order],
                "complete": len(raw) == len(order),
                "comparisons": comparisons,
                "raw": raw,
                "profiled": args.profile,
            },
            indent=2,
        )
    )
    return comparisons


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2:])
    else:
        main()
