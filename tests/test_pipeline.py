"""`medtune run` end to end on the quick-start config and a tiny model, with the network blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES

# Loaded through PYTHONPATH into the child process: any attempt to open an internet socket fails.
BLOCK_SOCKETS = """
import socket
_connect = socket.socket.connect
def _refuse(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        raise OSError("medtune test: network access is blocked")
    return _connect(self, address)
socket.socket.connect = _refuse
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(OSError("network access is blocked"))
"""


def quickstart_config(tmp_path: Path, model_dir: Path, **train: object) -> Path:
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
    for source in [*body["data"]["train"], *body["data"]["eval"]]:
        source["path"] = str(EXAMPLES / source["path"])
    body["model"]["path"] = str(model_dir)
    body["output"]["dir"] = str(tmp_path / "run")
    body["train"].update({"max_steps": 6, "save_every": 3, **train})
    body["eval"]["max_items"] = 20
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    return path


@pytest.mark.slow
def test_run_writes_every_stage_offline(tmp_path: Path, tiny_llama_dir: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    cfg = quickstart_config(tmp_path, tiny_llama_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "medtune", "run", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run = tmp_path / "run"
    expected = [
        "prepare/train.jsonl",
        "prepare/eval.jsonl",
        "prepare/quarantine.jsonl",
        "prepare/manifest.json",
        "train/adapter/adapter_model.safetensors",
        "train/adapter/adapter_config.json",
        "train/metrics.jsonl",
        "eval/metrics.json",
        "eval/base/predictions.jsonl",
        "eval/tuned/predictions.jsonl",
        "report/report.html",
        "report/report.md",
    ]
    missing = [p for p in expected if not (run / p).is_file()]
    assert not missing, missing
    for stage in ("prepare", "train", "eval"):
        manifest = json.loads((run / stage / "run.json").read_text())
        assert manifest["stage"] == stage
        assert len(manifest["config_hash"]) == 16 and manifest["seed"] == 0
        assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
        assert "git_revision" in manifest and manifest["seconds"] > 0
        assert manifest["config"]["model"]["path"] == str(tiny_llama_dir)
    assert "report:" in result.stdout and "report.html" in result.stdout
