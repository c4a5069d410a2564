"""benchmarks/gpu/run.sh without a GPU: argument handling, the offline wheel install, and the dry run.

Nothing here reaches the network: the wheel folder holds a wheel built by the test, installed with
pip --no-index, and the dry run hides CUDA, so this runs as it will in CI.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"
PROBE = "medtune_gpu_probe"


def make_wheel(folder: Path, dist: str, version: str, module: str | None = None) -> Path:
    """A minimal pure-Python wheel (one module) that pip installs offline."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if module:
        files[f"{module}/__init__.py"] = "PROBED = True\n"
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def run_sh(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": ""}
    return subprocess.run(
        ["bash", str(RUN), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run_sh().returncode == 2
    assert run_sh(str(tmp_path), "--no-such-flag").returncode == 2
    assert run_sh(str(tmp_path / "a"), str(tmp_path / "b")).returncode == 2


def test_installs_only_wheels_the_host_lacks_and_never_torch(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, PROBE, "0.0.1", module=PROBE)  # not installed: goes in
    make_wheel(wheels, "pydantic", md.version("pydantic"))  # same version as installed: skipped
    make_wheel(wheels, "torch", "0.0.1")  # the host's torch stack is never replaced
    # An unknown case name stops measure.py at argument parsing, right after the install step.
    done = run_sh(str(tmp_path / "out"), "--dry-run", "--wheels", str(wheels), "--cases", "nope", timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    installing = [line for line in done.stdout.splitlines() if line.startswith("installing from")]
    assert installing == [f"installing from {wheels}: {PROBE}-0.0.1-py3-none-any.whl"], done.stdout
    assert "unknown case(s) ['nope']" in done.stdout


def test_missing_wheel_folder_installs_nothing(tmp_path: Path) -> None:
    done = run_sh(str(tmp_path / "out"), "--dry-run", "--wheels", str(tmp_path / "none"), "--cases", "nope")
    assert "no wheels to install" in done.stdout and done.returncode == 2


@pytest.mark.slow
def test_dry_run_writes_every_case_into_the_json(tmp_path: Path) -> None:
    """All cases on tiny CPU models (~1-2 minutes on 2 cores): the skeleton a GPU run fills in."""
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    try:
        import measure
    finally:
        sys.path.pop(0)
    wheels = tmp_path / "wheels"
    make_wheel(wheels, PROBE, "0.0.1", module=PROBE)
    out = tmp_path / "results"
    done = run_sh(str(out), "--dry-run", "--wheels", str(wheels))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((out / "gpu_bench.json").read_text())
    env = data["environment"]
    assert data["schema"] == measure.SCHEMA and env["dry_run"] is True and env["gpu"] is None
    assert env["installed_wheels"] == [f"{PROBE}-0.0.1-py3-none-any.whl"]
    assert [c["name"] for c in data["cases"]] == [c.name for c in measure.CASES]
    fused = [c for c in data["cases"] if c["settings"]["chunked_ce"] in ("liger", "cce")]
    assert fused and all(c["status"] == "skipped" and "CUDA only" in c["error"] for c in fused)
    ran = [c for c in data["cases"] if c not in fused]
    assert all(c["status"] == "ok" for c in ran), [c.get("error") for c in ran]
    for case in ran:
        result = case["result"]
        if case["settings"]["kind"] == "eval":
            assert result["questions_per_s"] > 0 and result["scores_finite"]
            continue
        assert result["real_tokens_per_s"] > 0 and 0 < result["real_token_fraction"] <= 1
        assert result["peak_reserved_bytes"] is None, "no CUDA in the dry run"
        assert result["planned"]["total_bytes"] > 0
        assert len(result["steps"]) == env["scale"]["warmup"] + env["scale"]["steps"]
    padded = next(c for c in ran if c["settings"]["packing"] == "padded")["result"]
    packed = data["cases"][0]["result"]
    assert packed["real_token_fraction"] > padded["real_token_fraction"], (
        "packing fills rows, padding does not"
    )
    assert data["comparisons"]["paper_bf16_padded_vs_qlora_packed"]["tokens_per_s_ratio"] > 0
    assert (out / "log.txt").is_file()
