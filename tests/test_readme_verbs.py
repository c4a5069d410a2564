"""Every command in README.md's pipeline table runs with its default options on the tiny model.

The verbs come from the table itself: a verb documented there without a test here fails
`test_every_documented_verb_is_covered`. Commands run in-process through `medtune.cli.main` (one
torch import for the module), on one prepared, trained and evaluated run shared by the module; the
config is the quick-start with 2 training steps and 4 eval items per source.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from medtune.cli import main
from tests.conftest import EXAMPLES, REPO

NOT_RUN = {"model fetch": "downloads a real model: the one online step, tested by test_real_models"}
COVERED: set[str] = set()


def covers(*verbs: str) -> Callable:
    """Record which documented verbs a test runs, for the coverage check below."""

    def mark(test: Callable) -> Callable:
        COVERED.update(verbs)
        return test

    return mark


def pipeline_rows() -> list[str]:
    """The command column of README.md's pipeline table: `config validate/show CONFIG`, ..."""
    return re.findall(r"^\| `medtune ([^`]+)` \|", (REPO / "README.md").read_text(encoding="utf-8"), re.M)


def documented_verbs() -> set[str]:
    """'config validate', 'config show', 'prepare', ..., 'model tiny', 'model fetch', 'model import'."""
    verbs = set()
    for row in pipeline_rows():
        words = []
        for word in row.split():
            if not re.fullmatch(r"[a-z]+(/[a-z]+)*", word):
                break  # CONFIG, RUN, --options: arguments, not the verb
            words.append(word)
        *group, last = words
        verbs.update(" ".join([*group, name]) for name in last.split("/"))
    return verbs


def medtune(*args: str | Path) -> None:
    """Run one CLI command in-process; fail unless it exits 0, as a shell user would see it."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    assert exit_.value.code == 0, f"`medtune {' '.join(map(str, args))}` exited {exit_.value.code}"


def write_config(folder: Path, model_dir: Path) -> Path:
    """The quick-start config on the tiny model, shrunk to seconds: 2 steps, 4 eval items per source."""
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
    for source in [*body["data"]["train"], *body["data"]["eval"]]:
        source["path"] = str(EXAMPLES / source["path"])
    body["model"]["path"] = str(model_dir)
    body["output"]["dir"] = str(folder / "run")
    body["train"].update({"max_steps": 2, "save_every": None})
    body["eval"]["max_items"] = 4
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True), encoding="utf-8")
    return path


def missing(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name).exists()]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return write_config(tmp_path_factory.mktemp("readme"), tiny_llama_dir)


@pytest.fixture(scope="module")
def run_dir(config: Path) -> Path:
    """output.dir after `medtune prepare`, `medtune train` and `medtune eval`, each with defaults."""
    for verb in ("prepare", "train", "eval"):
        medtune(verb, config)
    return config.parent / "run"


# ----------------------------------------------------------------------------- the README itself


def test_every_documented_verb_is_covered() -> None:
    documented = documented_verbs()
    assert {"config validate", "prepare", "export", "model tiny"} <= documented  # the parser works
    assert documented - COVERED - set(NOT_RUN) == set(), "README verbs with no default-options test"
    assert COVERED - documented == set(), "tests for verbs the README does not document"


# ----------------------------------------------------------------------------- config, data, plan


@covers("config validate", "config show")
def test_config_validate_and_show(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medtune("config", "validate", config)
    assert capsys.readouterr().out.startswith(f"ok {config} (config hash ")
    medtune("config", "show", config)
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["max_steps"] == 2 and shown["quantization"]["mode"] == "nf4"


@covers("data inspect")
def test_data_inspect(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medtune("data", "inspect", config)
    out = capsys.readouterr().out
    assert "where every record went" in out and "PII replaced" in out


@covers("plan")
def test_plan_a_config_and_a_model_dir(
    config: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (config, tiny_llama_dir):
        medtune("plan", target)
        assert "verdict: fits" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the stages


@covers("prepare", "train", "eval")
def test_prepare_train_eval_write_what_the_readme_says(run_dir: Path) -> None:
    assert not missing(
        run_dir / "prepare",
        ["train.jsonl", "eval.jsonl", "quarantine.jsonl", "duplicates.jsonl", "manifest.json", "run.json"],
    )
    assert not missing(
        run_dir / "train", ["adapter/adapter_model.safetensors", "checkpoints", "metrics.jsonl", "run.json"]
    )
    eval_files = ["metrics.json", "compare.json", "results.md", "run.json"]
    eval_files += [f"{m}/{f}" for m in ("base", "tuned") for f in ("predictions.jsonl", "nll.jsonl")]
    assert not missing(run_dir / "eval", eval_files)
    assert json.loads((run_dir / "train" / "run.json").read_text())["results"]["steps"] == 2


@covers("compare")
def test_compare_writes_to_the_working_directory(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    medtune("compare", run_dir / "eval" / "base", run_dir / "eval" / "tuned")
    assert not missing(tmp_path / "compare", ["compare.md", "compare.json"])


@covers("report")
def test_report(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medtune("report", run_dir)
    assert not missing(run_dir / "report", ["report.html", "report.md"])
    assert f"report: {run_dir / 'report' / 'report.html'}" in capsys.readouterr().out


@covers("chat")
def test_chat_quits_on_quit(run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("/quit\n"))
    medtune("chat", run_dir)
    assert "medtune chat" in capsys.readouterr().out


@covers("model tiny")
def test_model_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    medtune("model", "tiny", "--out", tmp_path / "tiny")
    assert not missing(tmp_path / "tiny", ["config.json", "model.safetensors", "tokenizer.json"])
    medtune("model", "tiny", "--out", tmp_path / "tiny")
    assert "already holds a model" in capsys.readouterr().out


# ----------------------------------------------------------------------------- slow: whole runs


@pytest.mark.slow
@covers("export", "model import")
def test_export_every_format_to_its_default_folder(run_dir: Path, tmp_path: Path) -> None:
    """Each format lands in RUN/export/FORMAT and passes its verification; the GGUF imports back."""
    for fmt in ("merged", "peft", "gguf"):
        medtune("export", run_dir, "--format", fmt)
        record = json.loads((run_dir / "export" / fmt / "export.json").read_text())
        assert record["format"] == fmt and record["verification"]["passed"]
    medtune("model", "import", run_dir / "export" / "gguf" / "model.gguf", tmp_path / "imported")
    assert not missing(tmp_path / "imported", ["config.json", "model.safetensors"])


@pytest.mark.slow
@covers("run")
def test_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    medtune("run", write_config(tmp_path, tiny_llama_dir))
    stages = ["prepare/run.json", "train/run.json", "eval/run.json", "report/report.html"]
    assert not missing(tmp_path / "run", stages)


@pytest.mark.slow
@covers("sweep")
def test_sweep_with_the_readme_ratios(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """--ratios has no default; the README's example value, and every other option left alone."""
    (sweep_row,) = [row for row in pipeline_rows() if row.startswith("sweep ")]
    ratios = re.search(r'--ratios "([^"]+)"', sweep_row).group(1)  # type: ignore[union-attr]
    medtune("sweep", write_config(tmp_path, tiny_llama_dir), "--ratios", ratios)
    sweep = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    assert [c["status"] for c in sweep["cells"]] == ["ok"] * len(ratios.split(","))


@pytest.mark.slow
@covers("bench")
def test_bench(config: Path) -> None:
    medtune("bench", config)
    bench = json.loads((config.parent / "run" / "bench" / "bench.json").read_text())
    assert bench["complete"] and all(c["status"] == "ok" for c in bench["cells"])
