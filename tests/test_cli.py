"""The CLI's contract: user errors are one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES

# Folder names rich would read as markup or emoji codes: a closing tag with no opening one (crashes
# the printer), a style tag (vanishes from the path) and `:-1:` (becomes a thumbs-down).
HOSTILE_NAMES = ["a[/red]b", "x[bold]y", "ko:-1:"]


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


def fake_model_dir(path: Path) -> Path:
    """Enough of a model directory for the config loader, which checks only that config.json exists."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_config_show_prints_defaults(tmp_path: Path) -> None:
    model = fake_model_dir(tmp_path / "model")
    result = medtune("config", "show", str(EXAMPLES / "quickstart.yaml"), "-s", f"model.path={model}")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["quantization"]["mode"] == "nf4" and shown["lora"]["r"] > 0


def test_config_validate_refuses_a_missing_model_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    data = EXAMPLES / "data" / "medqa" / "dev.jsonl"
    cfg.write_text(yaml.safe_dump({"model": {"path": "nowhere"}, "data": {"eval": [{"path": str(data)}]}}))
    result = medtune("config", "validate", str(cfg))
    assert result.returncode == 2 and "ok" not in result.stdout
    assert "model.path: no such folder" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    fake_model_dir(tmp_path / "nowhere")
    assert medtune("config", "validate", str(cfg)).returncode == 0


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_errors_print_paths_verbatim(tmp_path: Path, name: str) -> None:
    missing = tmp_path / name / "run.yaml"
    result = medtune("config", "validate", str(missing))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"config file not found: {missing}" in result.stderr


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_messages_print_paths_verbatim(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    model = fake_model_dir(folder / "model")
    data = EXAMPLES / "data" / "medqa" / "dev.jsonl"
    cfg = folder / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": {"eval": [{"path": str(data)}]}}))
    result = medtune("config", "validate", str(cfg))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok {cfg} (config hash ")
    result = medtune("model", "tiny", "--out", str(model))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{model} already holds a model; keeping it"
