"""The CLI's contract: user errors are one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import EXAMPLES


def medtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medtune", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_bad_config_exits_2_with_the_key_and_no_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "m"}, "trian": {}, "data": {"train": [{"path": "x"}]}}))
    result = medtune("config", "validate", str(cfg))
    assert result.returncode == 2
    assert "trian: unknown key; did you mean `train`?" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = medtune("config", "show", str(tmp_path / "none.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_config_show_prints_defaults() -> None:
    result = medtune("config", "show", str(EXAMPLES / "quickstart.yaml"))
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["quantization"]["mode"] == "nf4" and shown["lora"]["r"] > 0
