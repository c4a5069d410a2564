"""Throughput and peak memory of `prepare` (ingest -> validate -> langid -> PII -> dedupe -> mix).

Builds N training records from the real shared data (or the bundled samples), each replica
perturbed (words swapped for words from other records, options shuffled) so most are distinct
and some stay near duplicates, writes them as one JSONL file, then times on the same machine:
  1. baseline: `json.loads` of every line (the floor any reader pays),
  2. read + validate (`iter_source`),
  3. the whole `run_prepare` (plus language id, PII scrub, exact + MinHash dedupe, 1:1 mix, writing).
CPU timings are reported as ratios to the baseline as well as records/s.

    python benchmarks/prepare_throughput.py --records 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import tempfile
import time
from pathlib import Path

from medtune.config import SourceConfig, validate_config
from medtune.data.prepare import run_prepare
from medtune.data.read import iter_source

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "prepare_throughput.json"


def seed_records() -> list[dict]:
    """Real MCQA records, Korean and English, as the generator's templates."""
    base = SHARED if SHARED.is_dir() else REPO / "examples" / "data"
    out = []
    for name in ("kormedmcqa", "medqa", "medmcqa", "mmlu_medical"):
        if (base / name).exists():
            out += [r for r in iter_source(SourceConfig(path=base / name), "train") if isinstance(r, dict)]
    return out


def write_records(path: Path, n: int, seed: int = 0) -> None:
    """n perturbed replicas, streamed to disk (never a list of n dicts)."""
    rng = random.Random(seed)
    templates = seed_records()
    rng.shuffle(templates)  # interleave Korean and English templates at any N
    vocab = [w for r in templates[:2000] for w in r["question"].split()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            t = templates[i % len(templates)]
            words = t["question"].split()
            for _ in range(max(1, len(words) // 4)):  # replace ~25% of words: mostly distinct records
                words[rng.randrange(len(words))] = rng.choice(vocab)
            order = list(range(len(t["options"])))
            rng.shuffle(order)
            options = [t["options"][j] for j in order]
            answer = "ABCDE"[order.index("ABCDE".index(t["answer"]))]
            f.write(
                json.dumps(
                    {"id": f"r{i}", "question": " ".join(words), "options": options, "answer": answer},
                    ensure_ascii=False,
                )
                + "\n"
            )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result). The pipeline is single-threaded, so on an
    idle machine wall ~= CPU; on the shared build machine wall includes waiting for other jobs."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - cpu, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.records
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        data = Path(tmp) / "records.jsonl"
        gen_s, _, _ = timed(lambda: write_records(data, n))
        rss_before = peak_rss_mb()

        def baseline() -> int:
            with data.open(encoding="utf-8") as f:
                return sum(1 for line in f if json.loads(line))

        base_s, base_cpu, _ = timed(baseline)
        read_s, read_cpu, _ = timed(
            lambda: sum(1 for _ in iter_source(SourceConfig(path=data, name="bench"), "train"))
        )
        cfg = validate_config(
            {
                "model": {"path": tmp},
                "data": {
                    "train": [{"path": str(data), "name": "bench"}],
                    "mix": {"ratio": {"ko": 1, "en": 1}},
                },
            }
        )
        full_s, full_cpu, manifest = timed(lambda: run_prepare(cfg, Path(tmp) / "out"))
    rss = peak_rss_mb()
    counts = manifest["sources"]["train/bench"]
    rows = [
        ("json.loads baseline", base_s, base_cpu),
        ("read + validate", read_s, read_cpu),
        ("full prepare", full_s, full_cpu),
    ]
    print(
        f"prepare throughput: {n:,} records | {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared), Python {platform.python_version()}, "
        f"load avg {os.getloadavg()[0]:.1f}"
    )
    print(f"{'stage':<22} {'wall s':>8} {'CPU s':>8} {'records/CPU-s':>14} {'CPU x baseline':>15}")
    for name, wall, cpu in rows:
        print(f"{name:<22} {wall:>8.1f} {cpu:>8.1f} {n / cpu:>14,.0f} {cpu / base_cpu:>15.1f}")
    print(f"peak RSS {rss:,.0f} MB (after generating the file: {rss_before:,.0f} MB)")
    print(
        f"dedupe: {counts['duplicates_exact']:,} exact, {counts['duplicates_near']:,} near; kept "
        f"{counts['kept']:,}; train.jsonl {manifest['totals']['train_records']:,} records"
    )
    scale = 1_000_000 / n
    est_rss = (rss - rss_before) * scale + rss_before
    print(
        f"linear extrapolation to 1M records on an idle core: full prepare ~{full_cpu * scale / 60:.1f} min "
        f"(CPU time); peak RSS ~{est_rss:,.0f} MB (targets: < 10 min, < 4096 MB)"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "records": n,
                "machine": {
                    "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "load_average_at_end": round(os.getloadavg()[0], 1),
                    "note": "shared 2-core build machine with other jobs running: use CPU seconds",
                },
                "wall_seconds": {name: round(w, 2) for name, w, _ in rows},
                "cpu_seconds": {name: round(c, 2) for name, _, c in rows},
                "cpu_ratio_to_baseline": {name: round(c / base_cpu, 2) for name, _, c in rows},
                "records_per_cpu_second": {name: round(n / c) for name, _, c in rows},
                "generate_seconds": round(gen_s, 2),
                "peak_rss_mb": round(rss),
                "rss_after_generation_mb": round(rss_before),
                "duplicates_exact": counts["duplicates_exact"],
                "duplicates_near": counts["duplicates_near"],
                "extrapolated_1m_cpu_minutes": round(full_cpu * scale / 60, 1),
                "extrapolated_1m_peak_rss_mb": round(est_rss),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
