"""Two "nodes" on localhost: `medtune train --nnodes 2 --node-rank R --rdzv-endpoint HOST:PORT`.

Each node is its own `medtune train` command with one process, meeting the other through torchrun's
c10d rendezvous, as two machines would (gloo on CPU). The job must equal one process with the same
global batch, and a node that dies must make the other stop with an error, not hang.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_train import _prepared_run_json, adapter, assert_same_adapter, make_run, metrics

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nodes_started() -> Iterator[list[subprocess.Popen]]:
    """Every node a test starts; any still running at the end (a failed test) is killed whole."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            kill_node(proc)


def start_node(config: Path, node_rank: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "medtune", "train", str(config), "--nnodes", "2"]
    cmd += ["--node-rank", str(node_rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its ranks in sessions of their own)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            queue.extend(int(c) for c in children)
    return found


def kill_node(proc: subprocess.Popen) -> None:
    """A machine going away: the launcher, torchrun's agent and its rank, all at once."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def test_two_nodes_match_one_process_with_the_same_global_batch(
    tmp_path: Path, tiny_llama_dir: Path, nodes_started: list[subprocess.Popen]
) -> None:
    single = make_run(tmp_path / "single", tiny_llama_dir, train={"max_steps": 8, "micro_batch_size": 4})
    nodes = make_run(tmp_path / "nodes", tiny_llama_dir, train={"max_steps": 8, "micro_batch_size": 2})
    for run in ("single", "nodes"):
        _prepared_run_json(tmp_path / run / "run")
    one = subprocess.run(
        [sys.executable, "-m", "medtune", "train", str(single)], capture_output=True, text=True, env=ENV
    )
    assert one.returncode == 0, one.stderr[-3000:]
    port = free_port()
    procs = [start_node(nodes, r, port, tmp_path / f"node{r}.log") for r in (0, 1)]
    nodes_started.extend(procs)
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], [(tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1)]
    a, b = metrics(tmp_path / "single" / "run"), metrics(tmp_path / "nodes" / "run")
    assert len(a) == len(b) == 8  # 2 rows x 2 nodes per step: equal losses only with both nodes in
    for row in b:  # every rank's memory, not only rank 0's
        peaks = row["peak_memory_bytes_per_rank"]
        assert len(peaks) == 2 and min(peaks) > 0 and row["peak_memory_bytes"] == max(peaks)
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x["step"], x["loss"], y["loss"])
    assert_same_adapter(adapter(tmp_path / "single" / "run"), adapter(tmp_path / "nodes" / "run"), atol=1e-4)


def test_a_dead_node_stops_the_other_with_an_error(
    tmp_path: Path, tiny_llama_dir: Path, nodes_started: list[subprocess.Popen]
) -> None:
    config = make_run(tmp_path, tiny_llama_dir, train={"max_steps": 2000})
    _prepared_run_json(tmp_path / "run")
    port = free_port()
    survivor, doomed = (start_node(config, r, port, tmp_path / f"node{r}.log") for r in (0, 1))
    nodes_started.extend([survivor, doomed])
    metrics_file = tmp_path / "run" / "train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.is_file() and metrics_file.read_text().strip()):  # both nodes are training
        assert time.monotonic() < deadline and survivor.poll() is None, (tmp_path / "node0.log").read_text()
        time.sleep(0.5)
    kill_node(doomed)
    started = time.monotonic()
    code = survivor.wait(timeout=300)
    log = (tmp_path / "node0.log").read_text()
    assert code == 2 and "distributed training failed" in log, log[-3000:]
    assert time.monotonic() - started < 120, "the surviving node waited for its dead peer"
