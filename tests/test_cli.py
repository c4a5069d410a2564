"""The CLI's contract: user errors are one paragraph and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, stand_in_model_dir

# Folder names rich would read as markup or emoji codes: a closing tag with no opening one (crashes
# the printer), a style tag (vanishes from the path) and `:-1:` (becomes a thumbs-down).
# And a name longer than a terminal line, which rich would fold.
HOSTILE_NAMES = ["a[/red]b", "x[bold]y", "ko:-1:", "long-" + "x" * 150]


def medtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medtune", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def in_process(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `medtune ARGS` run through `medtune.cli.main` in this process."""
    from medtune.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


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


def test_config_show_prints_defaults(tmp_path: Path) -> None:
    model = stand_in_model_dir(tmp_path / "model")
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
    stand_in_model_dir(tmp_path / "nowhere")
    assert medtune("config", "validate", str(cfg)).returncode == 0


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_errors_print_paths_verbatim(tmp_path: Path, name: str, capsys) -> None:
    missing = tmp_path / name / "run.yaml"
    code, _, err = in_process(capsys, "config", "validate", missing)
    assert code == 2 and err == f"error: config file not found: {missing}\n"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_messages_print_paths_verbatim(tmp_path: Path, name: str, capsys) -> None:
    folder = tmp_path / name
    model = stand_in_model_dir(folder / "model")
    data = EXAMPLES / "data" / "medqa" / "dev.jsonl"
    cfg = folder / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model)}, "data": {"eval": [{"path": str(data)}]}}))
    code, out, err = in_process(capsys, "config", "validate", cfg)
    assert code == 0 and out.startswith(f"ok {cfg} (config hash "), err
    code, out, err = in_process(capsys, "config", "show", cfg)
    assert code == 0 and yaml.safe_load(out)["model"]["path"] == str(model), err
    code, out, err = in_process(capsys, "model", "tiny", "--out", model)
    assert code == 0 and out == f"{model} already holds a model; keeping it\n", err


@pytest.mark.slow
def test_library_warnings_stay_out_of_the_output_unless_debug(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """transformers warns that `is_gradient_checkpointing` is deprecated at every training start:
    noise to a user, shown only under --debug (in every rank, through MEDTUNE_DEBUG)."""
    from tests.test_pipeline import quickstart_config

    config = quickstart_config(tmp_path, tiny_llama_dir, max_steps=1, save_every=None)
    assert medtune("prepare", str(config)).returncode == 0
    quiet = medtune("train", str(config))
    assert quiet.returncode == 0, quiet.stderr
    assert "Warning" not in quiet.stdout + quiet.stderr, quiet.stderr
    again = f"output.dir={tmp_path / 'again'}"
    assert medtune("prepare", str(config), "-s", again).returncode == 0
    loud = medtune("train", str(config), "--debug", "-s", again)
    assert loud.returncode == 0 and "FutureWarning" in loud.stderr, loud.stderr


def test_tables_print_source_names_verbatim(tmp_path: Path, capsys) -> None:
    """A source name is data: in rich markup `a[/red]b` crashes the table printer."""
    from tests.test_pipeline import DATA, data_config

    name = HOSTILE_NAMES[0]
    config = data_config(tmp_path, [{"path": str(DATA / "medqa" / "train.jsonl"), "name": name}])
    code, out, err = in_process(capsys, "prepare", config)
    assert code == 0 and name in out, err
    code, out, err = in_process(capsys, "data", "inspect", config)
    assert code == 0 and name in out, err
