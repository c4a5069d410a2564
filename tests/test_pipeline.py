"""`medtune run` end to end on the quick-start config and a tiny model, with the network blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, stand_in_model_dir

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


def medtune_run(cfg: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`medtune run CFG` in a child process; fails the test, with the output's tail, unless it exits 0."""
    result = subprocess.run(
        [sys.executable, "-m", "medtune", "run", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_run_writes_every_stage_offline(tmp_path: Path, tiny_llama_dir: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_SOCKETS)
    cfg = quickstart_config(tmp_path, tiny_llama_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env.get("PYTHONPATH", "")])
    result = medtune_run(cfg, env)

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
    report_json = json.loads((run / "report" / "run.json").read_text())
    assert report_json["stage"] == "report"
    assert report_json["config_hash"] == manifest["config_hash"]

    # Again over the finished run: every stage is skipped (prepare/ untouched), the report rebuilt.
    prepared = {p.name: p.stat().st_mtime_ns for p in (run / "prepare").iterdir()}
    again = medtune_run(cfg, env)
    for stage in ("prepare", "train", "eval"):
        assert f"{stage}: already finished" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (run / "prepare").iterdir()} == prepared


# ---------------------------------------------------------------- stage rules, no model needed

DATA = EXAMPLES / "data"


def data_config(tmp_path: Path, train: list[dict] | None = None, **top: object) -> Path:
    """A prepare-only config on the bundled samples; `train` replaces the training sources."""
    model = stand_in_model_dir(tmp_path / "stand-in-model")  # prepare never loads it
    body = {
        "seed": 0,
        "model": {"path": str(model)},
        "data": {
            "train": train or [{"path": str(DATA / "medqa" / "train.jsonl"), "format": "medqa"}],
            "eval": [{"path": str(DATA / "medqa" / "dev.jsonl"), "format": "medqa", "name": "medqa_dev"}],
        },
        "output": {"dir": str(tmp_path / "run")},
        **top,
    }
    path = tmp_path / f"cfg-{abs(hash(json.dumps(body, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    return path


def medtune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    from medtune.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: what "untouched" means."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def broken_source(tmp_path: Path) -> dict:
    path = tmp_path / "broken.jsonl"
    path.write_text("not json\n" * 3 + '{"question": ""}\n', encoding="utf-8")
    return {"path": str(path), "format": "jsonl", "name": "broken"}


def test_prepare_again_with_the_same_config_skips_and_says_so(tmp_path: Path, capsys) -> None:
    cfg = data_config(tmp_path)
    assert medtune(capsys, "prepare", cfg)[0] == 0
    before = snapshot(tmp_path / "run" / "prepare")
    code, out, _ = medtune(capsys, "prepare", cfg)
    assert code == 0 and "prepare: already finished" in out and "skipping" in out
    assert snapshot(tmp_path / "run" / "prepare") == before


def test_prepare_refuses_over_another_configs_finished_stage(tmp_path: Path, capsys) -> None:
    assert medtune(capsys, "prepare", data_config(tmp_path))[0] == 0
    before = snapshot(tmp_path / "run" / "prepare")
    code, _, err = medtune(capsys, "prepare", data_config(tmp_path, seed=7))
    assert code == 2
    assert "finished `prepare` stage of another config" in err
    assert "new output.dir" in err and "--force" in err
    assert snapshot(tmp_path / "run" / "prepare") == before


def test_a_failed_prepare_leaves_the_previous_complete_output(tmp_path: Path, capsys) -> None:
    assert medtune(capsys, "prepare", data_config(tmp_path))[0] == 0
    before = snapshot(tmp_path / "run" / "prepare")
    broken = data_config(tmp_path, train=[broken_source(tmp_path)])
    code, _, err = medtune(capsys, "prepare", broken, "--force")
    assert code == 2 and "no training record survived" in err
    assert snapshot(tmp_path / "run" / "prepare") == before  # no spool, no new quarantine next to old data
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["prepare"]


def test_run_with_a_missing_model_fails_before_writing_anything(tmp_path: Path, capsys) -> None:
    code, _, err = medtune(capsys, "run", data_config(tmp_path, model={"path": str(tmp_path / "no-model")}))
    assert code == 2 and str(tmp_path / "no-model") in err and "model.path" in err
    assert not (tmp_path / "run").exists()


def test_run_with_a_changed_config_refuses_before_touching_prepare(
    tmp_path: Path, tiny_llama_dir: Path, capsys
) -> None:
    model = {"path": str(tiny_llama_dir)}
    first = data_config(tmp_path, model=model)
    assert medtune(capsys, "prepare", first)[0] == 0
    before = snapshot(tmp_path / "run" / "prepare")
    code, _, err = medtune(capsys, "run", data_config(tmp_path, model=model, seed=5))
    assert code == 2 and "`prepare` stage of another config" in err
    assert snapshot(tmp_path / "run" / "prepare") == before


def test_train_stage_writes_run_json_last_and_only_when_finished(tmp_path: Path) -> None:
    from medtune.config import load_config
    from medtune.errors import RunDirError
    from medtune.manifest import write_json_atomic
    from medtune.pipeline import train_stage

    cfg = load_config(data_config(tmp_path))
    (cfg.output.dir / "prepare").mkdir(parents=True)
    write_json_atomic(cfg.output.dir / "prepare" / "run.json", {"config_hash": cfg.config_hash()})
    train_dir = cfg.output.dir / "train"
    train_dir.mkdir()
    write_json_atomic(train_dir / "run.json", {"stage": "train", "config_hash": "another"})
    seen: list[bool] = []

    def fake_train(cfg, prepared, out, resume=False, force=False) -> dict:
        seen.append((out / "run.json").exists())
        return {"steps": 4}

    with pytest.raises(RunDirError, match="finished `train` stage of another config"):
        train_stage(cfg, train=fake_train)
    assert train_stage(cfg, force=True, train=fake_train) == {"steps": 4}
    assert seen == [False], "training ran while an old run.json still said the stage was finished"
    assert json.loads((train_dir / "run.json").read_text())["results"] == {"steps": 4}
    assert train_stage(cfg, train=fake_train) == {"steps": 4}  # finished: skipped, results read back
    assert seen == [False]


def test_a_stage_killed_after_setting_the_old_folder_aside_gets_it_back(tmp_path: Path) -> None:
    from medtune.config import load_config
    from medtune.pipeline import run_stage

    cfg = load_config(data_config(tmp_path))
    calls: list[Path] = []
    assert run_stage("eval", cfg, lambda out: calls.append(out) or {"n": 1}) == {"n": 1}
    out = cfg.output.dir / "eval"
    # What a kill -9 midway leaves: the finished folder set aside, a half-written one in its place.
    out.rename(out.with_name(".eval.previous"))
    out.mkdir()
    (out / "metrics.json").write_text("{half")
    assert run_stage("eval", cfg, lambda out: calls.append(out) or {"n": 2}) == {"n": 1}  # finished
    assert len(calls) == 1 and not (out / "metrics.json").exists()
    assert not out.with_name(".eval.previous").exists()


@pytest.mark.slow
def test_a_full_eval_after_a_base_only_eval_scores_the_tuned_model(
    tmp_path: Path, tiny_llama_dir: Path, capsys
) -> None:
    """Both evals have one config hash; the base-only one must not count as the finished full one."""
    config = quickstart_config(tmp_path, tiny_llama_dir, max_steps=1, save_every=None)
    for verb in (["prepare"], ["train"], ["eval", "--base-only"]):
        assert medtune(capsys, *verb, config)[0] == 0
    assert not (tmp_path / "run" / "eval" / "tuned").exists()
    assert medtune(capsys, "eval", config)[0] == 0
    assert (tmp_path / "run" / "eval" / "tuned" / "predictions.jsonl").is_file()


def test_torchrun_dies_with_a_launcher_killed_by_sigkill(tmp_path: Path) -> None:
    """The child started with `terminate_with_parent` (as torchrun is) gets SIGTERM when its parent
    is SIGKILLed, instead of running on as an orphan holding the GPUs."""
    import signal
    import time

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    pid_file = tmp_path / "child.pid"
    parent = (
        "import subprocess, sys, time\n"
        "from medtune.pipeline import terminate_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " preexec_fn=terminate_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the child outlived its SIGKILLed parent"


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
