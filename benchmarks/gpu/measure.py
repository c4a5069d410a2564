"""GPU numbers for the claims the CPU build machine cannot check: VRAM peaks and tokens/s at 2048 tokens.

Run through `benchmarks/gpu/run.sh` (it installs the missing packages first); see README.md beside this.
Every case goes through medtune's own code: `model.load.load_model_for_training` /
`load_model_for_inference`, `packing.build_rows` + `collate`, `loss.CausalLMLoss` (chunked CE from
`loss.py`) and `train.loop.optimizer_step` (the trainer's whole optimiser step: forward, backward, clip,
AdamW), `evaluate.score.letter_scores`; the prediction next to each peak is `plan.plan_memory` with
the options `medtune plan` derives from the same run config.

Models: random weights in the exact shapes of `examples/model_configs/` (MedGemma 4B's text model,
Llama 3.1 8B), built on the GPU from the config dict and saved as an ordinary model directory, so
nothing is downloaded. Data: synthetic documents of 128-895 tokens (seeded), the first half of each
a prompt (no loss), packed into 2048-token rows, or one per row padded to 2048.

Each case runs under its own time limit and inside a try/except; the JSON is rewritten after every
case, so a run cut short still returns what it measured. `--dry-run` does all of it on the CPU
with 2-layer, 64-wide versions of the same models and 256-token rows, and never touches CUDA.

    python benchmarks/gpu/measure.py RESULTS_DIR [--dry-run] [--budget-s 420] [--case-timeout-s 180]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = REPO / "examples" / "model_configs"
RESULT_FILE = "gpu_bench.json"
SCHEMA = 1
GIB = 1024**3

SHAPES = {  # benchmark name -> folder in examples/model_configs
    "gemma3-4b": "medgemma-4b",
    "llama-3.1-8b": "llama-3.1-8b",
}
TINY = dict(  # the dry run's stand-ins: same architecture and vocabulary handling, 2 layers, 64 wide
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
TOKENIZER_VOCAB = 4096  # a small BPE trained on medtune's bundled corpus; ids fit every vocabulary


@dataclass(frozen=True)
class Case:
    """One measurement. Train cases take `warmup + steps` optimiser steps; eval cases score items."""

    name: str
    model: str
    kind: str = "train"  # train | eval
    quant: str = "nf4"
    packing: str = "packed"  # packed | padded (one document per row, padded to max_seq_len)
    chunked_ce: str = "on"
    checkpointing: bool = True
    micro_batch: int = 1


# In order of importance: when the time budget runs out, the cases at the end are skipped.
CASES = [
    Case("gemma3-4b_qlora_packed_chunked_ckpt", "gemma3-4b"),
    Case("gemma3-4b_qlora_packed_chunked_ckpt_mb4", "gemma3-4b", micro_batch=4),
    Case(
        "gemma3-4b_bf16lora_padded_full-ce_no-ckpt",
        "gemma3-4b",
        quant="none",
        packing="padded",
        chunked_ce="off",
        checkpointing=False,
        micro_batch=4,
    ),
    Case("llama-3.1-8b_qlora_packed_chunked_ckpt", "llama-3.1-8b"),
    Case("gemma3-4b_eval_letter_nf4", "gemma3-4b", kind="eval"),
    Case("gemma3-4b_qlora_packed_liger_ckpt", "gemma3-4b", chunked_ce="liger"),
    Case("gemma3-4b_qlora_packed_cce_ckpt", "gemma3-4b", chunked_ce="cce"),
    Case("gemma3-4b_bf16lora_packed_chunked_ckpt_mb4", "gemma3-4b", quant="none", micro_batch=4),
    Case("gemma3-4b_qlora_packed_full-ce_ckpt", "gemma3-4b", chunked_ce="off"),
    Case("gemma3-4b_qlora_packed_chunked_no-ckpt", "gemma3-4b", checkpointing=False),
    Case("gemma3-4b_qlora_packed_full-ce_no-ckpt", "gemma3-4b", chunked_ce="off", checkpointing=False),
    Case("llama-3.1-8b_qlora_packed_chunked_no-ckpt", "llama-3.1-8b", checkpointing=False),
    Case("gemma3-4b_qlora_packed_chunked_no-ckpt_mb4", "gemma3-4b", checkpointing=False, micro_batch=4),
    Case("gemma3-4b_bf16lora_packed_chunked_ckpt", "gemma3-4b", quant="none"),
]
PAPER = ("gemma3-4b_bf16lora_padded_full-ce_no-ckpt", "gemma3-4b_qlora_packed_chunked_ckpt_mb4")
"""The paper's comparison on MedGemma 4B: bf16 LoRA on padded rows (48 GB) vs QLoRA packed (20 GB, 5x),
both at 4 rows of seq_len a step."""


@dataclass(frozen=True)
class Scale:
    """What differs between the GPU run and the dry run."""

    device: str
    tiny: bool
    seq_len: int
    warmup: int
    steps: int
    eval_items: int
    eval_batch: int


GPU = Scale(device="cuda", tiny=False, seq_len=2048, warmup=1, steps=3, eval_items=256, eval_batch=16)
DRY = Scale(device="cpu", tiny=True, seq_len=256, warmup=1, steps=1, eval_items=16, eval_batch=8)


# ----------------------------------------------------------------------------- models


def model_config(name: str, tiny: bool) -> dict[str, Any]:
    """The text model's config.json dict for `name` (Gemma 3 multimodal -> its text_config)."""
    raw = json.loads((MODEL_CONFIGS / SHAPES[name] / "config.json").read_text())
    config = dict(raw.get("text_config") or raw)
    config["architectures"] = [
        "Gemma3ForCausalLM" if config["model_type"] == "gemma3_text" else "LlamaForCausalLM"
    ]
    if tiny:
        config.update(TINY, vocab_size=TOKENIZER_VOCAB)
        if config["model_type"] == "gemma3_text":
            config.update(
                query_pre_attn_scalar=16,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
            )
    return config


def build_model_dir(name: str, root: Path, scale: Scale) -> Path:
    """Random bf16 weights in `name`'s shape plus a small tokenizer, saved as an ordinary model directory.

    The weights are initialised on the run's device (seconds on a GPU, minutes on CPU for 8B).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.model.tiny import train_tokenizer

    out = root / name
    tokenizer = train_tokenizer(
        "gemma3" if name.startswith("gemma") else "llama", TOKENIZER_VOCAB, chat_template=False
    )
    config_dict = model_config(name, scale.tiny)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(**{**config_dict, **ids})
    torch.manual_seed(0)
    with torch.device(scale.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    free_memory(scale)
    return out


def free_memory(scale: Scale) -> None:
    import torch

    gc.collect()
    if scale.device == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- data


def synthetic_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """`n` documents of seq_len/16 .. 7/16*seq_len tokens (128-895 at 2048); the first half is prompt.

    Labels are pre-shifted as `format.py` writes them; prompt positions carry -100, so the chunked
    loss projects only the answer half, as on real instruction data.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    lo, hi = seq_len // 16, 7 * seq_len // 16
    examples = []
    for _ in range(n):
        length = int(torch.randint(lo, hi, (1,), generator=gen))
        ids = torch.randint(10, vocab, (length + 1,), generator=gen).tolist()
        labels = ids[1:]
        labels[: length // 2] = [-100] * (length // 2)
        examples.append({"input_ids": ids[:-1], "labels": labels})
    return examples


def synthetic_records(n: int) -> list[dict[str, Any]]:
    """MCQA records in medtune's normalised schema, Korean and English, 5 options, ~120-word stems."""
    filler = {
        "en": "A 54-year-old patient presents with fatigue, mild fever and a cough for three weeks. ",
        "ko": "54세 환자가 3주간 지속된 피로, 미열, 기침을 주소로 내원하였다. ",
    }
    records = []
    for i in range(n):
        lang = "ko" if i % 2 else "en"
        records.append(
            {
                "id": f"gpu:{i}",
                "source": f"synthetic_{lang}",
                "split": "test",
                "language": lang,
                "subject": None,
                "tags": [],
                "explanation": None,
                "context": None,
                "provenance": {"file": "synthetic", "line": i + 1},
                "kind": "mcqa",
                "question": filler[lang] * (3 + i % 5) + f"Which finding is most likely? ({i})",
                "options": [f"option {j} for question {i}" for j in range(5)],
                "answer": "ABCDE"[i % 5],
                "prompt": None,
                "response": None,
            }
        )
    return records


# ----------------------------------------------------------------------------- run configs


def run_config(case: Case, model_dir: Path, scale: Scale):
    """The medtune RunConfig of a case: QLoRA defaults (r16, all-linear, AdamW) plus the case's switches."""
    from medtune.config import validate_config

    packing: dict[str, Any] = {"mode": case.packing, "max_seq_len": scale.seq_len}
    if case.packing == "padded":
        packing["padding"] = "max_length"
    return validate_config(
        {
            "model": {"path": str(model_dir), "dtype": "auto"},
            "data": {"train": [{"path": "unused.jsonl"}]},
            "quantization": {"mode": case.quant},
            "packing": packing,
            "train": {
                "micro_batch_size": case.micro_batch,
                "gradient_checkpointing": case.checkpointing,
                "chunked_ce": case.chunked_ce,
                "lr": 1e-4,
            },
            "eval": {"batch_size": scale.eval_batch},
        }
    )


def planned(cfg) -> dict[str, Any]:
    """What `medtune plan` predicts for this run config on one GPU (1 GiB CUDA overhead included)."""
    from medtune.plan import options_from_run_config, plan_memory, read_config_json

    opts = options_from_run_config(cfg, gpus=1, seq_len=None)
    plan = plan_memory(read_config_json(Path(cfg.model.path)), opts)
    overhead = int(opts.overhead_gb * GIB)
    return {
        "total_bytes": plan.total_bytes,
        "total_without_overhead_bytes": plan.total_bytes - overhead,
        "components": plan.components,
        "options": asdict(opts),
    }


# ----------------------------------------------------------------------------- measurements


def cuda_memory(scale: Scale) -> dict[str, int | None]:
    """Allocator statistics on CUDA; None on the CPU (the dry run)."""
    import torch

    if scale.device != "cuda":
        return {"allocated": None, "max_allocated": None, "max_reserved": None}
    torch.cuda.synchronize()
    return {
        "allocated": torch.cuda.memory_allocated(),
        "max_allocated": torch.cuda.max_memory_allocated(),
        "max_reserved": torch.cuda.max_memory_reserved(),
    }


def reset_peak(scale: Scale) -> None:
    import torch

    if scale.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def train_case(case: Case, model_dir: Path, scale: Scale) -> dict[str, Any]:
    """Load through medtune, then time `warmup + steps` trainer optimiser steps; peak VRAM over all."""
    import torch

    from medtune.loss import CausalLMLoss
    from medtune.model.load import compute_dtype, load_model_for_training
    from medtune.packing import build_rows, packing_stats
    from medtune.train.distributed import DistInfo
    from medtune.train.loop import optimizer_step
    from medtune.train.optim import build_optimizer

    cfg = run_config(case, model_dir, scale)
    device = torch.device(scale.device)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    reset_peak(scale)
    model = load_model_for_training(cfg, device=device)
    module = CausalLMLoss(model, cfg.train)
    after_load = cuda_memory(scale)  # its max_* is the loading peak (bf16 shards before quantisation)
    optimizer = build_optimizer(cfg.train, [p for p in module.parameters() if p.requires_grad], device)
    examples = synthetic_examples(64 * case.micro_batch, scale.seq_len, TOKENIZER_VOCAB)
    lengths = [len(e["input_ids"]) for e in examples]
    rows = build_rows(lengths, cfg.packing, seed=0, epoch=0)
    per_step = case.micro_batch
    module.train()  # before the first forward (bitsandbytes' eval-mode repacking, as train/loop.py)
    reset_peak(scale)  # from here the peak is the training steps' (weights stay allocated, so counted)
    steps = []
    for step in range(scale.warmup + scale.steps):
        window = rows[step * per_step : (step + 1) * per_step]
        started = time.perf_counter()
        loss, targets, real, slots, _ = optimizer_step(cfg, module, optimizer, examples, window, info)
        if scale.device == "cuda":
            torch.cuda.synchronize()
        steps.append(
            {
                "seconds": time.perf_counter() - started,
                "loss": loss,
                "real_tokens": real,
                "slots": slots,
                "target_tokens": targets,
            }
        )
    memory = cuda_memory(scale)
    timed = steps[scale.warmup :]
    seconds = statistics.median(s["seconds"] for s in timed)
    real = statistics.mean(s["real_tokens"] for s in timed)
    slots = statistics.mean(s["slots"] for s in timed)
    plan = planned(cfg)
    del module, model, optimizer
    return {
        "dtype": str(compute_dtype(cfg.model, device)).removeprefix("torch."),
        "step_seconds_median": seconds,
        "real_tokens_per_s": real / seconds,
        "slot_tokens_per_s": slots / seconds,
        "real_token_fraction": real / slots,
        "steps": steps,
        "memory_after_load_bytes": after_load["allocated"],
        "peak_while_loading_bytes": after_load["max_allocated"],
        "peak_allocated_bytes": memory["max_allocated"],
        "peak_reserved_bytes": memory["max_reserved"],
        "planned": plan,
        "planned_over_peak_allocated": (
            plan["total_without_overhead_bytes"] / memory["max_allocated"]
            if memory["max_allocated"]
            else None
        ),
        "packing": packing_stats(rows, lengths, cfg.packing, case.micro_batch),
    }


def eval_case(case: Case, model_dir: Path, scale: Scale) -> dict[str, Any]:
    """Letter-mode questions/s through `letter_scores`, the scorer `medtune eval` uses, after a warm-up."""
    from medtune.evaluate.prompts import build_items
    from medtune.evaluate.score import letter_scores
    from medtune.format import encode_prompts
    from medtune.model.load import load_model_for_inference

    cfg = run_config(case, model_dir, scale)
    reset_peak(scale)
    model, tokenizer = load_model_for_inference(cfg)
    items = build_items(synthetic_records(scale.eval_items), tokenizer, cfg.format)
    letter_scores(model, tokenizer, items[: scale.eval_batch], scale.eval_batch)  # warm-up
    started = time.perf_counter()
    scores = letter_scores(model, tokenizer, items, scale.eval_batch)
    seconds = time.perf_counter() - started
    memory = cuda_memory(scale)
    prompt_tokens = [len(ids) for ids in encode_prompts([it["prompt"] for it in items], tokenizer)]
    del model
    return {
        "items": len(items),
        "batch_size": scale.eval_batch,
        "seconds": seconds,
        "questions_per_s": len(items) / seconds,
        "prompt_tokens_mean": statistics.mean(prompt_tokens),
        "scores_finite": all(x == x for row in scores for x in row),
        "peak_allocated_bytes": memory["max_allocated"],
        "peak_reserved_bytes": memory["max_reserved"],
    }


# ----------------------------------------------------------------------------- the run


class CaseTimeout(Exception):
    """Raised by SIGALRM inside a case that ran past its limit."""


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Interrupt the block after `seconds` (between Python bytecodes; a running CUDA kernel finishes)."""

    def expire(_signum, _frame):
        raise CaseTimeout(f"case ran past its {seconds} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_case(case: Case, model_dir: Callable[[str], Path], scale: Scale, limit_s: int) -> dict[str, Any]:
    """One case as a JSON record: status ok / error / timeout, its numbers or the error text."""
    record: dict[str, Any] = {"name": case.name, "settings": asdict(case), "status": "ok", "error": None}
    started = time.perf_counter()
    try:
        with time_limit(limit_s):
            directory = model_dir(case.model)
            measure = eval_case if case.kind == "eval" else train_case
            record["result"] = measure(case, directory, scale)
    except CaseTimeout as exc:
        record.update(status="timeout", error=str(exc))
    except Exception as exc:  # a failed case is recorded and the next one still runs
        record.update(
            status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(-6)
        )
    record["seconds"] = round(time.perf_counter() - started, 2)
    free_memory(scale)
    return record


def comparisons(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The paper's bf16-padded vs QLoRA-packed figures, when both cases finished."""
    by_name = {c["name"]: c.get("result") for c in cases if c["status"] == "ok"}
    base, ours = (by_name.get(name) for name in PAPER)
    if not (base and ours):
        return {"paper_bf16_padded_vs_qlora_packed": None}
    return {
        "paper_bf16_padded_vs_qlora_packed": {
            "cases": list(PAPER),
            "paper_claim": "48 GB -> 20 GB peak, 5x real tokens/s (MedGemma 4B)",
            "peak_reserved_gib": [_gib(base["peak_reserved_bytes"]), _gib(ours["peak_reserved_bytes"])],
            "real_tokens_per_s": [base["real_tokens_per_s"], ours["real_tokens_per_s"]],
            "tokens_per_s_ratio": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        }
    }


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def environment(scale: Scale, dry_run: bool) -> dict[str, Any]:
    """What ran where: GPU name (None in the dry run), versions of everything that matters."""
    import importlib.metadata as md

    import torch

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    gpu = torch.cuda.get_device_name() if scale.device == "cuda" else None
    return {
        "dry_run": dry_run,
        "gpu": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if gpu else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "versions": {
            d: version(d) for d in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pydantic")
        },
        "scale": asdict(scale),
        "installed_wheels": os.environ.get("MEDTUNE_GPU_INSTALLED", "").split(),
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }


def write(path: Path, payload: dict[str, Any]) -> None:
    """Atomic rewrite: a run killed mid-write leaves the previous complete file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def unavailable(case: Case, scale: Scale) -> str | None:
    """Why a fused-kernel case cannot run here (CUDA only, its package carried in), else None."""
    from medtune.loss import fused_ce_available

    if case.chunked_ce not in ("liger", "cce"):
        return None
    if scale.device != "cuda":
        return f"chunked_ce: {case.chunked_ce} runs on CUDA only"
    if not fused_ce_available(case.chunked_ce):
        return f"chunked_ce: {case.chunked_ce}: its package is not installed (fetch_wheels.sh brings it)"
    return None


def run(
    results: Path, scale: Scale, dry_run: bool, budget_s: float, case_timeout_s: int, cases: list[Case]
) -> dict[str, Any]:
    """Every case in order until the budget is spent; the JSON is rewritten after each case."""
    results.mkdir(parents=True, exist_ok=True)
    out = results / RESULT_FILE
    started = time.perf_counter()
    payload: dict[str, Any] = {"schema": SCHEMA, "environment": environment(scale, dry_run), "cases": []}
    write(out, payload)
    with tempfile.TemporaryDirectory(prefix="medtune-gpu-") as tmp:
        dirs: dict[str, Path] = {}

        def model_dir(name: str) -> Path:
            if name not in dirs:
                dirs[name] = build_model_dir(name, Path(tmp), scale)
            return dirs[name]

        for case in cases:
            left = budget_s - (time.perf_counter() - started)
            why_not = f"time budget of {budget_s:.0f} s spent" if left < 20 else unavailable(case, scale)
            if why_not:
                record = {
                    "name": case.name,
                    "settings": asdict(case),
                    "status": "skipped",
                    "error": why_not,
                    "seconds": 0.0,
                }
            else:
                record = run_case(case, model_dir, scale, int(min(case_timeout_s, left)))
            payload["cases"].append(record)
            payload["comparisons"] = comparisons(payload["cases"])
            payload["wall_seconds"] = round(time.perf_counter() - started, 1)
            write(out, payload)
            print(summary_line(record), flush=True)
    return payload


def summary_line(record: dict[str, Any]) -> str:
    result = record.get("result") or {}
    if record["status"] != "ok":
        return f"{record['name']:<46} {record['status']}: {str(record['error'])[:120]}"
    if "questions_per_s" in result:
        return f"{record['name']:<46} {result['questions_per_s']:.1f} questions/s ({record['seconds']} s)"
    peak = _gib(result["peak_reserved_bytes"])
    plan = _gib(result["planned"]["total_bytes"])
    return (
        f"{record['name']:<46} {result['real_tokens_per_s']:.0f} real tok/s, peak reserved {peak} GiB, "
        f"planned {plan} GiB ({record['seconds']} s)"
    )


def missing_imports() -> list[str]:
    """The modules a run needs that do not import here (with the error), checked before any work."""
    missing = []
    for module in ("medtune.train", "medtune.evaluate.score", "peft", "bitsandbytes"):
        try:
            __import__(module)
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
    return missing


def select_cases(names: str | None, parser: argparse.ArgumentParser) -> list[Case]:
    """CASES, or the named ones in CASES' order; an unknown name is a usage error."""
    if not names:
        return CASES
    wanted = set(names.split(","))
    unknown = wanted - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}; known: {[c.name for c in CASES]}")
    return [c for c in CASES if c.name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help=f"folder for {RESULT_FILE}")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU; never touches CUDA")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting cases after this long")
    parser.add_argument("--case-timeout-s", type=int, default=180, help="limit for one case")
    parser.add_argument("--cases", help="comma-separated case names (default: all, in order of importance)")
    args = parser.parse_args(argv)
    cases = select_cases(args.cases, parser)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # medtune's default_device() must pick the CPU
    from medtune.cuda_alloc import default_cuda_allocator

    default_cuda_allocator()  # as the CLI does, before torch first touches the GPU
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    missing = missing_imports()
    if missing:
        print(
            f"cannot import {missing} here: run benchmarks/gpu/fetch_wheels.sh where pip reaches PyPI "
            "and pass its folder to run.sh --wheels",
            file=sys.stderr,
        )
        return 3
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run on the GPU host, or pass --dry-run", file=sys.stderr)
        return 2
    scale = DRY if args.dry_run else GPU
    payload = run(args.results, scale, args.dry_run, args.budget_s, args.case_timeout_s, cases)
    failed = [c["name"] for c in payload["cases"] if c["status"] in ("error", "timeout")]
    print(
        f"wrote {args.results / RESULT_FILE}; {len(failed)} case(s) failed"
        + (f": {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
