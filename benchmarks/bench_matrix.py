"""Efficiency matrix: what packing, QLoRA, gradient checkpointing and FSDP cost or save, per cell.

Runs `medtune.bench.run_bench` (every cell a few real `medtune train` steps in a fresh process) on
the quick-start data for two random-weight Llamas built on the spot: the tiny test model, and a
~145M-parameter one (hidden 1024, 12 layers) big enough that weights and activations, not Python
overhead, dominate. Every cell is reported as a ratio to the first (naive) cell of the same model in
the same run; absolute CPU timings on a shared machine mean little, ratios a bit more.

    python benchmarks/bench_matrix.py                        # tiny: full matrix; 145M: smoke cells
    python benchmarks/bench_matrix.py --models tiny --kind smoke --steps 3

Writes benchmarks/results/bench_matrix.json and prints one table per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from medtune.bench import machine_description, run_bench
from medtune.config import load_config
from medtune.model.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
MODELS = {
    "tiny": {},
    # ~145M parameters: 12 x (attention 2.6M + MLP 8.7M) + 8.4M untied embeddings at vocab 4096.
    "llama-145m": {
        "hidden_size": 1024,
        "num_hidden_layers": 12,
        "intermediate_size": 2816,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
    },
}


def bench_model(name: str, work: Path, kind: str, steps: int, seq_len: int, threads: int | None) -> dict:
    model_dir = build_tiny_model(work / f"model-{name}", "llama", **MODELS[name])
    cfg = load_config(
        QUICKSTART,
        {
            "model.path": str(model_dir),
            "output.dir": str(work / f"run-{name}"),
            "packing.max_seq_len": seq_len,
            "train.micro_batch_size": 2,
            "train.grad_accum": 1,
        },
    )
    started = time.time()
    result = run_bench(cfg, work / f"bench-{name}", steps=steps, cells=kind, threads_per_rank=threads)  # type: ignore[arg-type]
    result["wall_seconds"] = round(time.time() - started, 1)
    result["parameters"] = _parameter_count(model_dir)
    result["packing.max_seq_len"] = seq_len
    return result


def _parameter_count(model_dir: Path) -> int:
    from math import prod

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return sum(prod(f.get_slice(key).get_shape()) for key in f.keys())  # noqa: SIM118 - not a mapping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,llama-145m", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--kind", default="full", choices=["full", "smoke"], help="matrix for the tiny model")
    parser.add_argument(
        "--big-kind", default="smoke", choices=["full", "smoke"], help="matrix for bigger models"
    )
    parser.add_argument("--steps", type=int, default=4, help="training steps per cell (the first is warm-up)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--threads-per-rank",
        type=int,
        default=None,
        help="OMP_NUM_THREADS per rank (default: cores / ranks); 1 is steadier on a busy machine",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_matrix.json")
    args = parser.parse_args()
    results = {"machine": machine_description(), "command": " ".join(sys.argv), "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-matrix-") as tmp:
        for name in args.models.split(","):
            kind = args.kind if name == "tiny" else args.big_kind
            results["models"][name] = bench_model(
                name, Path(tmp), kind, args.steps, args.seq_len, args.threads_per_rank
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
