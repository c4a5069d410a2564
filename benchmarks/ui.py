"""`medtune ui`: how long until it answers, and how long the Runs page of 100 runs takes to render.

The claim (issue #20): the dashboard starts in under 2 seconds and a Runs page of 100 runs renders
in under 1 second. Start-up is timed from launching `python -m medtune ui` to its first answered
request; the page is timed over HTTP against that same server, with 100 synthetic run folders
(finished stages, a manifest, training metrics; a third of them mid-training) under `--runs`.
The baseline in the same run is `medtune --help`: the CLI's own import floor, which every verb pays.
Median of several repeats; a table on stdout and `benchmarks/results/ui.json`, with the machine's
load average (on a shared machine, every figure scales with it).

    python benchmarks/ui.py [--runs 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import cpu_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "ui.json"
sys.path.insert(0, str(REPO))  # the synthetic run folders are the ones tests/test_ui.py builds

from tests.test_ui import write_run  # noqa: E402

ALL_STAGES = ("prepare", "train", "eval", "report")


def make_runs(runs_dir: Path, n: int) -> None:
    for i in range(n):
        stages = ALL_STAGES[: 1 + i % 4]
        write_run(runs_dir / f"run-{i:03d}", stages, steps=200 if len(stages) > 1 else 37, total=200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(runs_dir: Path, configs_dir: Path) -> tuple[subprocess.Popen, str, float]:
    """Start `medtune ui`; return it, its address and the seconds until it first answered."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "medtune", "ui", "--runs", str(runs_dir), "--configs", str(configs_dir)]
    started = time.perf_counter()
    server = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=subprocess.DEVNULL)
    while True:
        try:
            urllib.request.urlopen(url + "launch", timeout=5).read()
            return server, url, time.perf_counter() - started
        except OSError:
            if server.poll() is not None:
                raise SystemExit("medtune ui exited before answering") from None
            time.sleep(0.02)


def time_cli_help() -> float:
    """The baseline: `medtune --help`, i.e. importing the CLI, which `medtune ui` does first."""
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medtune", "--help"], env=env, capture_output=True, check=True)
    return time.perf_counter() - started


def time_page(url: str) -> float:
    started = time.perf_counter()
    body = urllib.request.urlopen(url, timeout=60).read()
    elapsed = time.perf_counter() - started
    assert b"run-000" in body
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs_dir, configs_dir = Path(tmp) / "runs", Path(tmp) / "configs"
        configs_dir.mkdir()
        make_runs(runs_dir, args.runs)
        startups, pages, helps = [], [], []
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            helps.append(time_cli_help())
            server, url, seconds = start_server(runs_dir, configs_dir)
            try:
                startups.append(seconds)
                pages += [time_page(url) for _ in range(3)]
            finally:
                server.terminate()
                server.wait(timeout=30)
    result = {
        "machine": cpu_name(),
        "python": sys.version.split()[0],
        "load_average_1m_at_start": round(load, 2),
        "runs": args.runs,
        "repeats": args.repeats,
        "cli_help_s_median": round(statistics.median(helps), 3),
        "startup_s_median": round(statistics.median(startups), 3),
        "startup_s_all": [round(s, 3) for s in startups],
        "runs_page_s_median": round(statistics.median(pages), 4),
        "runs_page_s_all": [round(s, 4) for s in pages],
        "claim": {"startup_s": 2.0, "runs_page_s": 1.0},
    }
    print(f"medtune ui | {result['machine']} | load average {load:.1f}")
    print(f"{'measure':<40} {'median s':>9} {'claim s':>8}")
    print(f"{'baseline: medtune --help':<40} {result['cli_help_s_median']:>9.3f} {'':>8}")
    print(f"{'start-up until it answers':<40} {result['startup_s_median']:>9.3f} {2.0:>8.1f}")
    print(f"{'Runs page, ' + str(args.runs) + ' runs':<40} {result['runs_page_s_median']:>9.4f} {1.0:>8.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
