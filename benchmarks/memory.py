"""Does the memory planner agree with reality? Planned vs measured bytes, random and real models.

For each model config (random weights, saved as an ordinary safetensors directory) and each
quantisation/checkpointing setting, load through `medtune.model.load.load_model_for_training`, make
an AdamW optimiser, run one warm-up step (so optimiser state exists), then measure:

  static: weights + quant state + LoRA adapter + optimiser state (model_bytes + optimiser tensors)
          vs planner base + quant_state + adapter + optimizer.       Claim: within 5 %.
  peak:   static + gradients + the peak of live tensor bytes during forward+backward
          vs planner total (overhead 0 on CPU).                         Claim: within 15 %.

CPU runs use fp32 compute (pinned: auto picks bf16 on some CPUs) and HF's unchunked loss (the model is given
labels), so the planner runs with chunked_ce off. `--cuda` measures with torch.cuda statistics in
bf16 instead (not run on the CPU-only build machine).

`--model-dir PATH` (repeatable) does the same for a real local model with the settings of
`examples/real.yaml`: QLoRA NF4 + double quant, LoRA r16 all-linear, checkpointing every layer,
full packed rows (`--settings`: micro-batch x row length) and medtune's own loss
(`loss.CausalLMLoss`: chunked cross-entropy over 256-token chunks for a >= 32k vocabulary), planned
through `plan.options_from_run_config`. The measured step is the trainer's whole optimiser step
(forward, backward, clipping, AdamW). Every token of a row is a target, the planner's worst case.
Process RSS is reported beside the tensor bytes: it is what a CPU user sees, but it also holds
Python, torch and allocator slack, which the planner does not claim to cover. Results go to
`results/memory_real_<model>.json`.

    python benchmarks/memory.py [--quick] [--cuda]
    python benchmarks/memory.py --model-dir models/gemma3-270m [--settings 1x512,2x512]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _common import cpu_name, model_sizes
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from medtune.config import RunConfig, validate_config
from medtune.loss import CausalLMLoss
from medtune.model.load import compute_dtype, load_model_for_training
from medtune.model.measure import model_bytes, peak_training_memory
from medtune.packing import collate
from medtune.plan import PlanOptions, options_from_run_config, plan_memory

RESULTS = Path(__file__).parent / "results" / "memory.json"


MODELS = {  # kept small: the build machine's 2 CPU cores are shared
    "llama-16m": LlamaConfig(**model_sizes(8192, 384, 1024, 6, 6, 2), tie_word_embeddings=False),
    "gemma3-20m": Gemma3TextConfig(
        **model_sizes(16384, 512, 1536, 4, 4, 1), head_dim=128, sliding_window=512, query_pre_attn_scalar=128
    ),
    "llama-57m": LlamaConfig(**model_sizes(16000, 640, 1792, 8, 10, 5), tie_word_embeddings=False),
}
SETTINGS = [  # (quant, checkpoint_every_k, seq_len); seq_len stays under Gemma's sliding window
    ("nf4", 1, 256),
    ("none", None, 128),
    ("int8", 2, 128),
]


def build_model_dir(name: str, root: Path) -> Path:
    out = root / name
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MODELS[name], dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out


def run_config(model_dir: Path, quant: str, every_k: int | None, seq_len: int, device: torch.device) -> dict:
    """Measured vs planned bytes for one model and setting."""
    cfg = validate_config(
        {
            # fp32 pinned: the planner below plans fp32 on CPU, and the recorded ratios were fp32
            # (model.dtype auto now picks bf16 on CPUs with amx_bf16/avx512_bf16).
            "model": {"path": str(model_dir), "dtype": "float32" if device.type == "cpu" else "auto"},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "quantization": {"mode": quant},
            "train": {
                "gradient_checkpointing": every_k is not None,
                "checkpoint_every_k_layers": every_k or 1,
            },
            "packing": {"max_seq_len": seq_len},
        }
    )
    model = load_model_for_training(cfg, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device)

    def forward_backward() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    forward_backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    measured = measure_step(model, optimizer, forward_backward, device)
    step_s = time.perf_counter() - start

    opts = PlanOptions(
        quant=quant,
        dtype="float32" if device.type == "cpu" else "bfloat16",
        seq_len=seq_len,
        micro_batch=1,
        checkpoint_every_k=every_k,
        chunked_ce=False,
        lora_r=cfg.lora.r,
        lora_dropout=cfg.lora.dropout,
        overhead_gb=0,
    )
    planned = plan_memory(json.loads((model_dir / "config.json").read_text()), opts)
    compared = planned_vs_measured(planned, measured)
    return {
        "quant": quant,
        "checkpoint_every_k": every_k,
        "seq_len": seq_len,
        **compared,
        "rss_delta": measured["step"].get("rss_delta_bytes"),
        "step_s": round(step_s, 2),
    }


def measure_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, step_fn, device: torch.device
) -> dict:
    """Static bytes (weights + quant state + adapter + optimiser state) and the step's live-tensor peak.

    Call after a warm-up step, so the optimiser state exists and counts as static.
    """
    weights = model_bytes(model)
    optim_bytes = sum(
        t.untyped_storage().nbytes()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0  # the 0-dim `step` counters are not planned
    )
    return {
        "weights": weights,
        "optimizer_bytes": optim_bytes,
        "static": weights["total"] - weights["buffers"] + optim_bytes,
        "step": peak_training_memory(step_fn, device),
    }


def planned_vs_measured(planned, measured: dict) -> dict:
    """Static and peak bytes, planned and measured, and their ratios (planned / measured)."""
    plan = planned.components
    planned_static = sum(
        plan[k] for k in ("base_quantized", "quant_state", "base_unquantized", "adapter", "optimizer")
    )
    measured_peak = measured["static"] + measured["step"]["peak_delta_bytes"]
    return {
        "measured_static": measured["static"],
        "planned_static": planned_static,
        "static_ratio": planned_static / measured["static"],
        "measured_peak": measured_peak,
        "planned_peak": planned.total_bytes,
        "peak_ratio": planned.total_bytes / measured_peak,
    }


# ----------------------------------------------------------------------------- a real local model

REAL_SETTINGS = "1x512,2x512"  # micro-batch x row length: real.yaml runs 2 x 512
DOC_LEN = 128  # tokens per packed document: four documents fill a 512-token row


def real_run_config(model_dir: Path, micro_batch: int, seq_len: int) -> RunConfig:
    """The training settings of `examples/real.yaml`, spelled out, at this micro-batch and row length."""
    return validate_config(
        {
            "model": {"path": str(model_dir)},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "quantization": {"mode": "nf4", "double_quant": True},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "packing": {"mode": "packed", "max_seq_len": seq_len},
            "train": {
                "micro_batch_size": micro_batch,
                "gradient_checkpointing": True,
                "checkpoint_every_k_layers": 1,
                "chunked_ce": "auto",  # on for Gemma 3's 262k vocabulary, as in training
                "ce_chunk_size": 256,
                "lr": 3e-4,
            },
        }
    )


def packed_batch(cfg: RunConfig, vocab: int) -> dict:
    """`micro_batch` full rows of random documents, packed by medtune's collate; every token a target."""
    gen = torch.Generator().manual_seed(0)
    per_row = cfg.packing.max_seq_len // DOC_LEN
    examples = []
    for _ in range(cfg.train.micro_batch_size * per_row):
        ids = torch.randint(0, vocab, (DOC_LEN + 1,), generator=gen).tolist()
        examples.append({"input_ids": ids[:-1], "labels": ids[1:]})  # labels pre-shifted, as format.py
    rows = [list(range(r * per_row, (r + 1) * per_row)) for r in range(cfg.train.micro_batch_size)]
    return collate(examples, rows, cfg.packing)


def run_real_model(model_dir: Path, micro_batch: int, seq_len: int, device: torch.device) -> dict:
    """Planned vs measured bytes of one optimiser step of `train.loop.optimizer_step` on a real model."""
    cfg = real_run_config(model_dir, micro_batch, seq_len)
    model = load_model_for_training(cfg, device=device)
    module = CausalLMLoss(model, cfg.train)  # medtune's loss path: chunked CE over the target tokens only
    module.train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    batch = packed_batch(cfg, model.config.vocab_size)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def train_step() -> None:  # as train.loop.optimizer_step with grad_accum 1 on one process
        summed, n_targets = module(batch)
        (summed / max(n_targets, 1)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up: the optimiser state exists from here on
    rss_before = proc_status_bytes("VmRSS")
    rss_reset = reset_peak_rss()
    start = time.perf_counter()
    measured = measure_step(model, optimizer, train_step, device)
    step_s = time.perf_counter() - start
    rss_peak = proc_status_bytes("VmHWM") if rss_reset else None

    opts = options_from_run_config(cfg, gpus=1, seq_len=None)  # what `medtune plan` would use ...
    # ... in the dtype the model was loaded in (auto on CPU: bf16 or fp32 by the chip), no CUDA context
    opts = replace(opts, dtype=str(compute_dtype(cfg.model, device)).removeprefix("torch."), overhead_gb=0)
    planned = plan_memory(json.loads((model_dir / "config.json").read_text()), opts)
    return {
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "target_tokens": int(batch["num_target_tokens"]),
        **planned_vs_measured(planned, measured),
        "rss_before_step": rss_before,
        "rss_peak_step": rss_peak,
        "ru_maxrss_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": round(step_s, 2),
        "plan_options": asdict(opts),
        "planned_components": planned.components,
        "measured_weights": measured["weights"],
        "measured_optimizer_bytes": measured["optimizer_bytes"],
        "measured_step_delta": measured["step"]["peak_delta_bytes"],
    }


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so it shows this step's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def run_real_models(model_dirs: list[Path], settings: str, device: torch.device, machine: str) -> None:
    """For each model directory: every micro-batch x row length in `settings`, a table and a JSON."""
    for model_dir in model_dirs:
        rows = []
        for setting in settings.split(","):
            micro_batch, seq_len = (int(x) for x in setting.split("x"))
            # A fresh process per setting: the previous model's freed pages stay in this process's
            # RSS (the allocator keeps them), which would inflate every later RSS reading.
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(run_real_model, model_dir, micro_batch, seq_len, device).result()
            rows.append({"model": model_dir.name, **row})
            print(
                f"{model_dir.name} B={micro_batch} T={seq_len}: static x{row['static_ratio']:.3f} "
                f"peak x{row['peak_ratio']:.3f} ({row['step_s']} s)",
                flush=True,
            )
        print_real_table(rows)
        out = RESULTS.parent / f"memory_real_{model_dir.name}.json"
        out.write_text(
            json.dumps(
                {
                    "machine": machine,
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "model_dir": str(model_dir),
                    "settings": (
                        "examples/real.yaml: nf4 + double quant, LoRA r16 alpha 32 dropout 0.05 "
                        "all-linear, checkpointing every layer, packed rows of "
                        f"{DOC_LEN}-token documents (every token a target), chunked CE (chunk 256), "
                        f"AdamW; {'fp32' if device.type == 'cpu' else 'bf16'} compute; the step is "
                        "forward + backward + clip + AdamW step"
                    ),
                    "targets": {"static_ratio": "within 5%", "peak_ratio": "within 15%"},
                    "rows": rows,
                },
                indent=2,
            )
        )
        print(f"machine: {machine}; wrote {out}")


def print_real_table(rows: list[dict]) -> None:
    table = Table(title="planned / measured memory of a real model (MiB; RSS is the whole process)")
    columns = ("model", "B x T", "static meas", "static plan", "ratio", "peak meas", "peak plan", "ratio")
    for col in (*columns, "RSS before step", "RSS peak in step", "RSS peak incl. load"):
        table.add_column(col)
    mib = 1024**2

    def fmt(n: int | None) -> str:
        return "n/a" if n is None else f"{n / mib:.1f}"

    for r in rows:
        table.add_row(
            r["model"],
            f"{r['micro_batch']} x {r['seq_len']}",
            fmt(r["measured_static"]),
            fmt(r["planned_static"]),
            f"{r['static_ratio']:.3f}",
            fmt(r["measured_peak"]),
            fmt(r["planned_peak"]),
            f"{r['peak_ratio']:.3f}",
            fmt(r["rss_before_step"]),
            fmt(r["rss_peak_step"]),
            fmt(r["ru_maxrss_process"]),
        )
    Console(width=190).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU (bf16, torch.cuda stats)")
    parser.add_argument("--quick", action="store_true", help="two smallest models only")
    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        help="a real local model directory (repeatable): run real.yaml's settings on it instead",
    )
    parser.add_argument(
        "--settings",
        default=REAL_SETTINGS,
        help="with --model-dir: micro-batch x row length, comma-separated",
    )
    args = parser.parse_args()
    device = torch.device("cuda") if args.cuda else torch.device("cpu")
    if args.model_dir:
        machine = torch.cuda.get_device_name() if args.cuda else cpu_name()
        run_real_models(args.model_dir, args.settings, device, machine)
        return
    names = list(MODELS)[:2] if args.quick else list(MODELS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            model_dir = build_model_dir(name, Path(tmp))
            for quant, every_k, seq_len in SETTINGS:
                rows.append({"model": name, **run_config(model_dir, quant, every_k, seq_len, device)})
                print(
                    f"{name} {quant} k={every_k} T={seq_len}: static x{rows[-1]['static_ratio']:.3f} "
                    f"peak x{rows[-1]['peak_ratio']:.3f} ({rows[-1]['step_s']} s)",
                    flush=True,
                )
    print_table(rows)
    machine = torch.cuda.get_device_name() if args.cuda else cpu_name()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"machine: {machine}; wrote {RESULTS}")


def print_table(rows: list[dict]) -> None:
    table = Table(title="planned / measured memory (MiB)")
    for col in (
        "model",
        "quant",
        "ckpt k",
        "T",
        "static meas",
        "static plan",
        "ratio",
        "peak meas",
        "peak plan",
        "ratio",
    ):
        table.add_column(col)
    mib = 1024**2
    for r in rows:
        table.add_row(
            r["model"],
            r["quant"],
            str(r["checkpoint_every_k"]),
            str(r["seq_len"]),
            f"{r['measured_static'] / mib:.1f}",
            f"{r['planned_static'] / mib:.1f}",
            f"{r['static_ratio']:.3f}",
            f"{r['measured_peak'] / mib:.1f}",
            f"{r['planned_peak'] / mib:.1f}",
            f"{r['peak_ratio']:.3f}",
        )
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
