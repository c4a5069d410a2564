"""Peak memory of duplicate detection for one record with a 5 MB question, each case in a fresh process.

Cases (the same record, the same `DedupeConfig` defaults otherwise):
- `near, unbatched (before)`: the old path, rebuilt by setting `WORD_CHUNK_CHARS` and `SHINGLE_BATCH`
  past the text's size, so every shingle x permutation is materialised at once, and by restoring
  the old `normalise`, which built a list of every word.
- `near, batched (now)`: the shipped code.
- `near: false`: exact duplicates only, the floor any near-duplicate method sits on.

Each case runs in a child process started for it. After the record is built, the current RSS is
read (`rss_before`) and the kernel's peak-RSS mark is reset (`/proc/self/clear_refs`), so building
the text does not hide in the peak; after `Deduper.check` the peak (`VmHWM`) is read. `added` =
peak - rss_before is what detection cost. Linux only.

    python benchmarks/dedupe_memory.py            # prints the table, writes results/dedupe_memory.json
    python benchmarks/dedupe_memory.py --mb 2     # a smaller field
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_name

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dedupe_memory.json"
CASES = {
    "near, unbatched (before)": {"near": True, "unbatched": True},
    "near, batched (now)": {"near": True, "unbatched": False},
    "near: false": {"near": False, "unbatched": False},
}


def status_mb(key: str) -> float:
    """`VmRSS` (now) or `VmHWM` (peak since start or the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> None:
    """Let VmHWM start again from the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def field_text(chars: int) -> str:
    """About `chars` characters of words drawn from a 5,000-word vocabulary (fixed seed)."""
    rng = random.Random(0)
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(chars // 6))


def old_normalise(text: str) -> str:
    """`dedupe.normalise` before this benchmark was written: the same result, via a list of words."""
    import unicodedata

    from medtune.data.dedupe import _NON_WORD

    return " ".join(_NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).lower()).split())


def run_case(name: str, mb: float) -> dict:
    """In this (fresh) process: build the record, check it once, report RSS and time."""
    from medtune.config import DedupeConfig
    from medtune.data import dedupe
    from medtune.data.validate import build_record

    case = CASES[name]
    text = field_text(int(mb * 1_000_000))
    record = build_record(
        source="bench",
        split="train",
        row_id="1",
        provenance={"file": "bench", "line": 1},
        question=text,
        options=["a", "b", "c", "d"],
        answer="A",
    )
    if case["unbatched"]:
        dedupe.WORD_CHUNK_CHARS = dedupe.SHINGLE_BATCH = len(text) + 1
        dedupe.normalise = old_normalise
    deduper = dedupe.Deduper(DedupeConfig(near=case["near"]))
    gc.collect()
    before = status_mb("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    deduper.check(record)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")
    return {"field_chars": len(text), "rss_before_mb": before, "peak_rss_mb": peak, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=5.0, help="size of the question field in MB")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.mb)))
        return
    results = {}
    for name in CASES:
        child = subprocess.run(
            [sys.executable, __file__, "--case", name, "--mb", str(args.mb)],
            check=True,
            capture_output=True,
            text=True,
        )
        results[name] = json.loads(child.stdout)
    machine = cpu_name()
    print(f"duplicate detection of one record with a {args.mb:g} MB question | {machine}")
    print(f"{'case':<26} {'RSS before MB':>14} {'peak RSS MB':>12} {'added MB':>9} {'seconds':>8}")
    for name, r in results.items():
        r["added_mb"] = r["peak_rss_mb"] - r["rss_before_mb"]
        print(
            f"{name:<26} {r['rss_before_mb']:>14,.0f} {r['peak_rss_mb']:>12,.0f} "
            f"{r['added_mb']:>9,.0f} {r['seconds']:>8.1f}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rounded = {
        n: {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()} for n, r in results.items()
    }
    RESULTS.write_text(
        json.dumps({"field_mb": args.mb, "machine": machine, "cases": rounded}, indent=2) + "\n",
        encoding="utf-8",
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
