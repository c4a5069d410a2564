"""The token store inside a real `medtune train`: start-up and peak RSS per rank, and step throughput.

`benchmarks/train_startup.py` times the data step alone in one process. This script runs the rest:

  startup: the real `medtune train CONFIG -s train.max_steps=1 [--nproc 2]` (torchrun, gloo on CPU)
           on Gemma 3 270M (QLoRA nf4, 256-token rows) over N prepared records whose store exists
           (written by `train_startup.tile_store`, the same bytes a build writes). The parent polls
           metrics.jsonl: "first step s" is launch to the first row (torchrun, imports, store map, row
           plan, model load, one step); "start s" subtracts that step's `step_seconds`. Peak RSS per
           rank is the row's `peak_memory_bytes_per_rank` (each rank's ru_maxrss). With `--today`,
           today's path is measured too: the same command with `train.data.tokenized_examples` swapped
           (through a sitecustomize on PYTHONPATH, so every torchrun rank gets it) for the pre-store
           code, `format.tokenize_example` of every record into Python lists on every rank.
  steps:   one process, one model, the same packed windows fed to `train.loop.optimizer_step` from the
           store (`StoredExamples`, slices of the mapped ids) and from today's lists
           (`tokenize_example` output), alternating which goes first per window; per window the
           ratio store/lists of the step's seconds. `collate` alone is timed the same way.
           On the tiny random Llama (models/tiny-llama) and on Gemma 3 270M.

    python benchmarks/train_step_store.py startup --records 100000 [--today]
    python benchmarks/train_step_store.py steps --steps 12 --gemma-steps 4

Results go to benchmarks/results/train_step_store_{startup_N,steps}.json. The machine is the shared
2-core build machine: other jobs run beside it, so compare sides of one run, never runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_startup import MODELS, REPO, machine, tile_store, write_prepared  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
TODAY_ENV = "MEDTUNE_BENCH_TODAY_PATH"
SITECUSTOMIZE = f"""import os
if os.environ.get({TODAY_ENV!r}):
    import train_step_store
    train_step_store.patch_today_path()
"""


# ------------------------------------------------------------------------------------- today's path


class ListExamples(list):
    """Today's examples: a list of {input_ids, labels} lists, with the `lengths()` train asks for."""

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self]


def today_examples(cfg: Any, prepare_dir: Path, info: Any = None) -> tuple[ListExamples, int]:
    """What `train.data.tokenized_examples` did before the store, on every rank."""
    from medtune.data.prepare import read_prepared
    from medtune.format import tokenize_example
    from medtune.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    examples = [tokenize_example(r, tokenizer, cfg.format) for r in read_prepared(prepare_dir, "train")]
    kept = ListExamples(e for e in examples if any(label != -100 for label in e["labels"]))
    return kept, len(examples) - len(kept)


def patch_today_path() -> None:
    import medtune.train.loop

    medtune.train.loop.tokenized_examples = today_examples


# ------------------------------------------------------------------------------------------ start-up


def train_config(prepare: Path, model: Path, out: Path) -> dict[str, Any]:
    """Gemma 3 270M, QLoRA nf4, 256-token rows, one step; the store key matches `bench_config`'s."""
    return {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(prepare / "train.jsonl")}]},
        "quantization": {"mode": "nf4"},
        "packing": {"max_seq_len": 256},
        "train": {"max_steps": 1},
        "output": {"dir": str(out)},
    }


def make_run(tmp: Path, n: int, model: Path) -> Path:
    """output.dir with a finished-looking prepare (N records, their store) and a config file."""
    out = tmp / "run"
    prepare = out / "prepare"
    write_prepared(prepare, n)
    tile_store(prepare, model, n)
    (prepare / "run.json").write_text(json.dumps({"stage": "prepare", "note": "benchmark stand-in"}))
    config = tmp / "config.yaml"
    config.write_text(json.dumps(train_config(prepare, model, out)))  # JSON is YAML
    return config


def env_with(tmp: Path, today: bool) -> dict[str, str]:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ)
    paths = [str(site), str(Path(__file__).resolve().parent), str(REPO / "src"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop(TODAY_ENV, None)
    if today:
        env[TODAY_ENV] = "1"
    return env


def run_train(config: Path, ranks: int, today: bool) -> dict[str, Any]:
    """One `medtune train` of one step; seconds to the first metrics row, and that row."""
    out = Path(json.loads(config.read_text())["output"]["dir"])
    subprocess.run(["rm", "-rf", str(out / "train")], check=True)
    metrics = out / "train" / "metrics.jsonl"
    cmd = [sys.executable, "-m", "medtune", "train", str(config)] + (["--nproc", str(ranks)] * (ranks > 1))
    log = (config.parent / "train.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env_with(config.parent, today), stdout=log, stderr=subprocess.STDOUT)
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.perf_counter() - t0
        time.sleep(0.05)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"train failed ({proc.returncode}); see {config.parent / 'train.log'}:\n"
            + (config.parent / "train.log").read_text()[-3000:]
        )
    row = json.loads(metrics.read_text().splitlines()[0])
    first = first if first is not None else total
    return {
        "path": "today" if today else "store",
        "ranks": ranks,
        "first_step_s": first,
        "start_s": first - row["step_seconds"],
        "step_seconds": row["step_seconds"],
        "total_s": total,
        "peak_rss_bytes_per_rank": row["peak_memory_bytes_per_rank"],
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def startup(n: int, model: Path, today: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        config = make_run(Path(tmp), n, model)
        warm = [*Path(tmp).rglob("*"), *model.iterdir()]  # the page cache, as on a machine that prepared
        subprocess.run(
            ["cat", *map(str, (p for p in warm if p.is_file()))], stdout=subprocess.DEVNULL, check=True
        )
        cases = [(1, False), (2, False)] + [(1, True), (2, True)] * today
        rows = [run_train(config, ranks, t) for ranks, t in cases]
    print(f"medtune train start-up, {n:,} records, {model.name}, 1 step | {machine()}")
    head = f"{'path':<8} {'ranks':>5} {'first step s':>13} {'start s':>8} {'step s':>7}"
    print(f"{head} {'peak RSS MB per rank':>24}")
    for r in rows:
        peaks = ", ".join(f"{p / 2**20:,.0f}" for p in r["peak_rss_bytes_per_rank"])
        print(
            f"{r['path']:<8} {r['ranks']:>5} {r['first_step_s']:>13.1f} {r['start_s']:>8.1f} "
            f"{r['step_seconds']:>7.1f} {peaks:>24}"
        )
    return {
        "records": n,
        "model": model.name,
        "config": train_config(Path("PREPARE"), model, Path("OUT")),
        "machine": machine(),
        "runs": rows,
    }


# --------------------------------------------------------------------------------------- throughput


def spread(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "q1": q[0],
        "q3": q[2],
        "min": min(values),
        "max": max(values),
    }


def step_pairs(model: Path, steps: int, mbs: int) -> dict[str, Any]:
    """Per window: seconds of `collate` and of a whole optimiser step, from the store vs lists."""
    import torch

    from medtune.config import validate_config
    from medtune.loss import CausalLMLoss
    from medtune.model.load import load_model_for_training
    from medtune.packing import build_rows, collate
    from medtune.train.data import tokenized_examples
    from medtune.train.distributed import init_distributed
    from medtune.train.loop import optimizer_step
    from medtune.train.optim import build_optimizer

    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        prepare = Path(tmp) / "prepare"
        write_prepared(prepare, 900)
        raw = train_config(prepare, model, Path(tmp) / "out")
        raw["train"] = {"micro_batch_size": mbs, "grad_accum": 1}
        cfg = validate_config(raw)
        info = init_distributed(cfg.distributed)
        store, _ = tokenized_examples(cfg, prepare, info)
        lists, _ = today_examples(cfg, prepare)
        assert len(store) == len(lists) and all(store[i] == lists[i] for i in range(len(lists)))
        plan = build_rows(store.lengths(), cfg.packing, cfg.seed, 0)
        windows = [plan[k * mbs : (k + 1) * mbs] for k in range(steps + 1)]
        torch.manual_seed(0)
        module = CausalLMLoss(load_model_for_training(cfg, device=info.device), cfg.train)
        module.train()
        optimizer = build_optimizer(
            cfg.train, [p for p in module.parameters() if p.requires_grad], info.device
        )
        optimizer_step(cfg, module, optimizer, lists, windows[-1], info)  # warm-up
        sources = {"store": store, "lists": lists}
        secs: dict[str, list[float]] = {"store": [], "lists": []}
        coll: dict[str, list[float]] = {"store": [], "lists": []}
        tokens = []
        for k, window in enumerate(windows[:steps]):
            order = ("store", "lists") if k % 2 == 0 else ("lists", "store")
            for name in order:
                t0 = time.perf_counter()
                for _ in range(20):
                    collate(sources[name], window, cfg.packing)
                coll[name].append((time.perf_counter() - t0) / 20)
            for name in order:
                t0 = time.perf_counter()
                _, _, real, _, _ = optimizer_step(cfg, module, optimizer, sources[name], window, info)
                secs[name].append(time.perf_counter() - t0)
            tokens.append(real)
    step_ratio = [s / li for s, li in zip(secs["store"], secs["lists"], strict=True)]
    coll_ratio = [s / li for s, li in zip(coll["store"], coll["lists"], strict=True)]
    return {
        "model": model.name,
        "micro_batch_size": mbs,
        "max_seq_len": cfg.packing.max_seq_len,
        "steps_each_way": steps,
        "real_tokens_per_step": spread([float(t) for t in tokens]),
        "step_s": {name: spread(v) for name, v in secs.items()},
        "tokens_per_s": {name: sum(tokens) / sum(v) for name, v in secs.items()},
        "step_ratio_store_to_lists": spread(step_ratio),
        "collate_s": {name: spread(v) for name, v in coll.items()},
        "collate_ratio_store_to_lists": spread(coll_ratio),
        "collate_share_of_step": statistics.median(coll["store"]) / statistics.median(secs["store"]),
    }


def throughput(steps: int, gemma_steps: int) -> dict[str, Any]:
    cases = [(MODELS / "tiny-llama", steps, 4), (MODELS / "gemma3-270m", gemma_steps, 1)]
    rows = [step_pairs(model, n, mbs) for model, n, mbs in cases]
    print(f"step throughput, store vs today's lists, same windows alternated | {machine()}")
    head = f"{'model':<12} {'mbs':>3} {'store step s':>12} {'lists step s':>12} {'step ratio (q1-q3)':>22}"
    print(head + f" {'collate ms store/lists':>23} {'collate ratio':>14}")
    for r in rows:
        sr, cr = r["step_ratio_store_to_lists"], r["collate_ratio_store_to_lists"]
        print(
            f"{r['model']:<12} {r['micro_batch_size']:>3} {r['step_s']['store']['median']:>12.3f} "
            f"{r['step_s']['lists']['median']:>12.3f} "
            f"{sr['median']:>8.3f} ({sr['q1']:.3f}-{sr['q3']:.3f}) "
            f"{r['collate_s']['store']['median'] * 1e3:>10.2f}/"
            f"{r['collate_s']['lists']['median'] * 1e3:<10.2f}"
            f" {cr['median']:>6.2f}"
        )
    return {"machine": machine(), "models": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["startup", "steps"])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--model", type=Path, default=MODELS / "gemma3-270m")
    ap.add_argument("--today", action="store_true", help="also run today's path (lists on every rank)")
    ap.add_argument("--steps", type=int, default=12, help="windows on the tiny model, each run both ways")
    ap.add_argument("--gemma-steps", type=int, default=4, help="windows on Gemma 3 270M, each both ways")
    args = ap.parse_args()
    if args.part == "startup":
        result = startup(args.records, args.model, args.today)
        path = RESULTS / f"train_step_store_startup_{args.records}.json"
    else:
        result = throughput(args.steps, args.gemma_steps)
        path = RESULTS / "train_step_store_steps.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
