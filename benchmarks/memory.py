"""Does the memory planner agree with reality? Planned vs measured bytes for random models.

For each model config (random weights, saved as an ordinary safetensors directory) and each
quantisation/checkpointing setting, load through `medtune.model.load.load_model_for_training`, make
an AdamW optimiser, run one warm-up step (so optimiser state exists), then measure:

  static: weights + quant state + LoRA adapter + optimiser state (model_bytes + optimiser tensors)
          vs planner base + quant_state + adapter + optimizer.       Claim: within 5 %.
  peak:   static + gradients + the peak of live tensor bytes during forward+backward
          vs planner total (overhead 0 on CPU).                         Claim: within 15 %.

CPU runs use fp32 compute (medtune's CPU default) and HF's unchunked loss (the model is given
labels), so the planner runs with chunked_ce off. `--cuda` measures with torch.cuda statistics in
bf16 instead (not run on the CPU-only build machine).

    python benchmarks/memory.py [--quick] [--cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from medtune.config import validate_config
from medtune.model.load import load_model_for_training
from medtune.model.measure import model_bytes, peak_training_memory
from medtune.plan import PlanOptions, plan_memory

RESULTS = Path(__file__).parent / "results" / "memory.json"

MODELS = {  # kept small: the build machine's 2 CPU cores are shared
    "llama-16m": LlamaConfig(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "gemma3-20m": Gemma3TextConfig(
        vocab_size=16384,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        sliding_window=512,
        query_pre_attn_scalar=128,
    ),
    "llama-57m": LlamaConfig(
        vocab_size=16000,
        hidden_size=640,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=10,
        num_key_value_heads=5,
        tie_word_embeddings=False,
    ),
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
            "model": {"path": str(model_dir)},
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
    weights = model_bytes(model)
    optim_bytes = sum(
        t.untyped_storage().nbytes()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.dim() > 0
    )
    start = time.perf_counter()
    peak = peak_training_memory(forward_backward, device)
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
    plan = planned.components
    measured_static = weights["total"] - weights["buffers"] + optim_bytes
    planned_static = sum(
        plan[k] for k in ("base_quantized", "quant_state", "base_unquantized", "adapter", "optimizer")
    )
    measured_peak = measured_static + peak["peak_delta_bytes"]
    planned_peak = planned.total_bytes
    return {
        "quant": quant,
        "checkpoint_every_k": every_k,
        "seq_len": seq_len,
        "measured_static": measured_static,
        "planned_static": planned_static,
        "static_ratio": planned_static / measured_static,
        "measured_peak": measured_peak,
        "planned_peak": planned_peak,
        "peak_ratio": planned_peak / measured_peak,
        "rss_delta": peak.get("rss_delta_bytes"),
        "step_s": round(step_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cuda", action="store_true", help="measure on the GPU (bf16, torch.cuda stats)")
    parser.add_argument("--quick", action="store_true", help="two smallest models only")
    args = parser.parse_args()
    device = torch.device("cuda") if args.cuda else torch.device("cpu")
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
