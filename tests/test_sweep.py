"""Ratio sweeps: parsing, one shared base evaluation, resumability, and failure isolation.

The fast tests swap the stage functions for fakes that write schema-correct files in milliseconds
(the real compare and report run on them); the slow test runs the real quick-start stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medtune.errors import ConfigError
from medtune.evaluate.compare import run_compare
from medtune.evaluate.stats import accuracy_table
from medtune.sweep import (
    Stages,
    SweepInterrupted,
    cell_config,
    cell_name,
    parse_ratios,
    run_sweep,
)

from .conftest import EXAMPLES, stand_in_model_dir

N_ITEMS = 24


def test_parse_ratios_reads_the_documented_form() -> None:
    assert parse_ratios("ko:en=1:0,1:1,10:3,3:10") == [
        {"ko": 1.0, "en": 0.0},
        {"ko": 1.0, "en": 1.0},
        {"ko": 10.0, "en": 3.0},
        {"ko": 3.0, "en": 10.0},
    ]
    assert parse_ratios(" ko : en = 0.5 : 2 ") == [{"ko": 0.5, "en": 2.0}]
    assert cell_name({"ko": 10.0, "en": 3.0}, 1) == "ko10-en3_seed1"
    assert cell_name({"ko": 0.5, "en": 1.0}, 7) == "ko0.5-en1_seed7"


@pytest.mark.parametrize(
    "bad", ["1:1", "ko:en=1:1:1", "ko:en=0:0", "ko:en=-1:2", "ko:en=a:b", "ko:ko=1:1", "ko:en=1:nan"]
)
def test_parse_ratios_rejects_malformed_specs(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_ratios(bad)


class FakeStages:
    """Stage fakes that write the on-disk contract and log their calls; `fail` names cells to break."""

    def __init__(self, fail: set[str] | None = None, interrupt: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail or set()
        self.interrupt = interrupt or set()

    def stages(self) -> Stages:
        return Stages(self.prepare, self.train, self.evaluate, run_compare)

    def prepare(self, cfg: Any, out: Path) -> dict:
        self.calls.append(("prepare", out.parent.name, None))
        out.mkdir(parents=True, exist_ok=True)
        items = [{"id": f"q{i}", "kind": "mcqa", "language": "ko" if i % 2 else "en"} for i in range(N_ITEMS)]
        (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
        manifest = {
            "mix": {
                "by": "examples",
                "target_share": cfg.data.mix.ratio,
                "achieved_share": cfg.data.mix.ratio,
            }
        }
        (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        return manifest

    def train(
        self, cfg: Any, prepare_dir: Path, out: Path, resume: bool = False, force: bool = False
    ) -> dict:
        name = out.parent.name
        self.calls.append(("train", name, resume))
        if name in self.fail:
            raise RuntimeError(f"boom in {name}")
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 5)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        if name in self.interrupt:
            self.interrupt.discard(name)
            (out / "checkpoints" / "step-2").mkdir(parents=True)
            (out / "checkpoints" / "step-2" / "COMPLETE").write_text("ok\n")
            return {"stopped_at_step": 2, "total_steps": 4}
        return {"steps": 4}

    def evaluate(self, cfg: Any, prepare_dir: Path, train_dir: Path | None, out: Path) -> dict:
        self.calls.append(("eval", out.parent.name, train_dir is None))
        models = {}
        labels = ["base"] if train_dir is None else ["tuned"]
        assert cfg.eval.eval_base == (train_dir is None), "cells must not re-score the base model"
        for label in labels:
            # Tuned cells get one more Korean item right per unit of Korean share: a visible effect.
            bonus = 0 if label == "base" else int(cfg.data.mix.ratio.get("ko", 0))
            preds = [
                {
                    "id": f"q{i}",
                    "correct": (i % 6 == 0) or (i % 2 == 1 and i < 2 * bonus),
                    "language": "ko" if i % 2 else "en",
                    "source": "fake",
                    "subject": None,
                    "tags": [],
                }
                for i in range(N_ITEMS)
            ]
            (out / label).mkdir(parents=True, exist_ok=True)
            (out / label / "predictions.jsonl").write_text(
                "".join(json.dumps(p) + "\n" for p in preds), encoding="utf-8"
            )
            models[label] = accuracy_table(preds, ("language",), n_samples=100)
            if cfg.eval.nll:  # tuned Korean text gets 0.1 nats/token cheaper per unit of Korean share
                rows = [
                    {**p, "kind": "mcqa", "tokens": 10, "nll": 10 * (3.0 - 0.1 * bonus * (i % 2))}
                    for i, p in enumerate(preds)
                ]
                (out / label / "nll.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
                )
        (out / "metrics.json").write_text(json.dumps({"models": models}), encoding="utf-8")
        return {"n_items": N_ITEMS}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    # The fake stages never load the model, but the config loader checks model.path is a model folder.
    stand_in_model_dir(tmp_path / "no-model-needed")
    text = f"""
data:
  train: [{{path: {EXAMPLES / "data/medqa/train.jsonl"}, format: medqa}}]
  eval: [{{path: {EXAMPLES / "data/medqa/dev.jsonl"}, format: medqa}}]
model: {{path: {tmp_path / "no-model-needed"}}}
eval: {{bootstrap_samples: 100}}
output: {{dir: {tmp_path / "runs"}}}
"""
    path = tmp_path / "sweep.yaml"
    path.write_text(text, encoding="utf-8")
    return path


RATIOS = [{"ko": 1.0, "en": 0.0}, {"ko": 3.0, "en": 10.0}]


def _cells(sweep: dict) -> dict[str, dict]:
    return {c["name"]: c for c in sweep["cells"]}


def test_sweep_scores_base_once_and_isolates_a_failed_cell(config_file: Path, tmp_path: Path) -> None:
    fake = FakeStages(fail={"ko3-en10_seed2"})
    out = tmp_path / "sweep"
    result = run_sweep(config_file, RATIOS, [1, 2], out, stages=fake.stages())
    cells = _cells(result)
    assert list(cells) == ["ko1-en0_seed1", "ko1-en0_seed2", "ko3-en10_seed1", "ko3-en10_seed2"]
    assert {n: c["status"] for n, c in cells.items()} == {
        "ko1-en0_seed1": "ok",
        "ko1-en0_seed2": "ok",
        "ko3-en10_seed1": "ok",
        "ko3-en10_seed2": "failed",
    }
    assert "RuntimeError: boom in ko3-en10_seed2" in cells["ko3-en10_seed2"]["error"]
    assert cells["ko3-en10_seed2"]["stage"] == "train"
    assert (out / "cells" / "ko3-en10_seed2" / "error.log").read_text().count("boom") >= 1
    # The base model is scored exactly once, and every finished cell is paired with it.
    assert [c for c in fake.calls if c[0] == "eval" and c[2]] == [("eval", "base", True)]
    for name in ("ko1-en0_seed1", "ko3-en10_seed1"):
        compare = json.loads((out / cells[name]["compare"]).read_text())
        assert compare["a"].endswith("base/eval/base/predictions.jsonl")
        assert cells[name]["same_eval_set"] is True
    # Korean share 3 gives the tuned cell 3 more Korean items than base: delta_pp = 3/12 = +25.0.
    ko = json.loads((out / cells["ko3-en10_seed1"]["compare"]).read_text())["groups"]["language=ko"]
    assert ko["delta_pp"] == pytest.approx(25.0)
    # Per-cell config: the cell's ratio and seed, tuned-only eval.
    run_json = json.loads((out / "cells" / "ko1-en0_seed2" / "train" / "run.json").read_text())
    assert run_json["seed"] == 2 and run_json["config"]["data"]["mix"]["ratio"] == {"ko": 1.0, "en": 0.0}
    on_disk = json.loads((out / "sweep.json").read_text())
    assert on_disk["cells"][3]["status"] == "failed" and on_disk["report"].endswith("report.html")
    page = (out / "report" / "report.html").read_text()
    assert "ko3-en10_seed2" in page and "boom" in page


def test_rerun_skips_finished_cells_and_retries_failed_ones(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(config_file, RATIOS, [1, 2], out, stages=FakeStages(fail={"ko3-en10_seed2"}).stages())
    again = FakeStages()
    result = run_sweep(config_file, RATIOS, [1, 2], out, stages=again.stages())
    assert {c["name"]: c["status"] for c in result["cells"]} == {
        "ko1-en0_seed1": "skipped",
        "ko1-en0_seed2": "skipped",
        "ko3-en10_seed1": "skipped",
        "ko3-en10_seed2": "ok",
    }
    # Only the failed cell did work; its prepare had finished, so only train and eval ran again.
    assert [(s, n) for s, n, _ in again.calls] == [("train", "ko3-en10_seed2"), ("eval", "ko3-en10_seed2")]


def test_interrupted_training_stops_the_sweep_and_resumes_from_checkpoint(
    config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sweep"
    first = FakeStages(interrupt={"ko1-en0_seed2"})
    with pytest.raises(SweepInterrupted):
        run_sweep(config_file, RATIOS, [1, 2], out, stages=first.stages())
    recorded = json.loads((out / "sweep.json").read_text())
    assert [c["status"] for c in recorded["cells"]] == ["ok", "interrupted"]
    assert not any(n.startswith("ko3") for _, n, _ in first.calls), "the sweep must stop at the signal"
    second = FakeStages()
    result = run_sweep(config_file, RATIOS, [1, 2], out, stages=second.stages())
    assert ("train", "ko1-en0_seed2", True) in second.calls  # resumed from its checkpoint
    assert [c["status"] for c in result["cells"]] == ["skipped", "ok", "ok", "ok"]


def test_cell_config_changes_only_mix_seed_output_and_base_scoring(config_file: Path) -> None:
    from medtune.config import load_config

    cfg = load_config(config_file)
    cell = cell_config(cfg, {"ko": 1.0, "en": 0.0}, 5, Path("/tmp/x"))
    assert cell.seed == 5 and cell.data.mix.ratio == {"ko": 1.0, "en": 0.0} and cell.eval.eval_base is False
    assert cfg.data.mix.ratio is None and cfg.eval.eval_base is True  # the original is untouched
    a, b = cell.model_dump(), cfg.model_dump()
    for key in ("seed", "output", "data", "eval"):
        a.pop(key), b.pop(key)
    assert a == b


@pytest.mark.slow
def test_real_quickstart_sweep_two_ratios_two_seeds(tiny_llama_dir: Path, tmp_path: Path) -> None:
    overrides = {
        "model.path": str(tiny_llama_dir),
        "train.max_steps": 3,
        "train.save_every": None,
        "eval.max_items": 8,
        "eval.bootstrap_samples": 200,
        "quantization.mode": "none",
        "output.dir": str(tmp_path / "runs"),
    }
    result = run_sweep(
        EXAMPLES / "quickstart.yaml",
        [{"ko": 1.0, "en": 0.0}, {"ko": 1.0, "en": 1.0}],
        [1, 2],
        tmp_path / "sweep",
        overrides,
    )
    assert [c["status"] for c in result["cells"]] == ["ok"] * 4, [c["error"] for c in result["cells"]]
    assert result["base"]["status"] == "ok"
    for c in result["cells"]:
        assert c["same_eval_set"] is True
        compare = json.loads((tmp_path / "sweep" / c["compare"]).read_text())
        assert compare["only_in_a"] == 0 and compare["only_in_b"] == 0  # same items as the base
    ko_only = json.loads(
        (tmp_path / "sweep" / "cells" / "ko1-en0_seed1" / "prepare" / "manifest.json").read_text()
    )
    assert ko_only["mix"]["achieved_share"].get("en", 0) == 0
    assert (tmp_path / "sweep" / "report" / "report.html").is_file()


def test_sweep_pairs_each_cells_heldout_nll_with_the_base(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(config_file, RATIOS, [1], out, {"eval.nll": True}, stages=FakeStages().stages())
    ko_only = json.loads((out / "cells" / "ko1-en0_seed1" / "eval" / "nll_vs_base.json").read_text())
    heavy_en = json.loads((out / "cells" / "ko3-en10_seed1" / "eval" / "nll_vs_base.json").read_text())
    assert ko_only["language=ko"]["delta"] == pytest.approx(-0.1) and ko_only["language=ko"]["significant"]
    assert heavy_en["language=ko"]["delta"] == pytest.approx(-0.3)
    assert heavy_en["language=en"]["delta"] == 0 and not heavy_en["language=en"]["significant"]
    page = (out / "report" / "report.html").read_text()
    assert "Held-out NLL: each cell vs the base model" in page and "-0.300 [-0.300, -0.300]" in page


def test_sweep_without_nll_writes_no_nll_comparison(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(config_file, RATIOS[:1], [1], out, stages=FakeStages().stages())
    assert not (out / "cells" / "ko1-en0_seed1" / "eval" / "nll_vs_base.json").exists()
    assert "Held-out NLL" not in (out / "report" / "report.html").read_text()


ADVISOR = {"sweep.target": "language=ko", "sweep.protect": ["language=en"], "sweep.metric": "nll"}


def test_sweep_recommends_the_ratio_best_on_the_target_with_seed_aware_tables(
    config_file: Path, tmp_path: Path
) -> None:
    """The fakes make Korean text 0.1 nats/token cheaper per unit of Korean share on every item and leave
    English alone: ko3-en10 is best on Korean and harms nothing, on both seeds."""
    out = tmp_path / "sweep"
    result = run_sweep(
        config_file, RATIOS, [1, 2], out, {"eval.nll": True, **ADVISOR}, stages=FakeStages().stages()
    )
    advice = json.loads((out / "sweep.json").read_text())["advice"]
    assert advice == json.loads(json.dumps(result["advice"]))
    assert (
        advice["ratios"]["ko3-en10"]["seeds"] == [1, 2] and advice["ratios"]["ko1-en0"]["english_share"] == 0
    )
    rec = advice["recommendation"]
    assert rec["recommended"] == "ko3-en10" and rec["excluded"] == {} and rec["protect"] == ["language=en"]
    ko = advice["metrics"]["nll"]["groups"]["language=ko"]["ratios"]["ko3-en10"]
    assert ko["delta_vs_base"] == pytest.approx(-0.3) and ko["seed_means"] == pytest.approx([2.7, 2.7])
    assert set(advice["metrics"]) == {"accuracy", "nll"}
    page = (out / "report" / "report.md").read_text()
    assert "recommended: ko3-en10" in page and "score_vs_english_share_nll.png" in page
    assert (out / "report" / "score_vs_english_share_nll.png").is_file()


def test_sweep_says_when_the_data_cannot_tell_ratios_apart(config_file: Path, tmp_path: Path) -> None:
    """On accuracy the fakes differ by 2 Korean items of 12: too few to separate the ratios."""
    out = tmp_path / "sweep"
    overrides = {"sweep.target": "language=ko", "sweep.metric": "accuracy"}
    rec = run_sweep(config_file, RATIOS, [1, 2], out, overrides, stages=FakeStages().stages())["advice"][
        "recommendation"
    ]
    assert rec["recommended"] is None and rec["best"] == "ko3-en10" and rec["tied_with_best"] == ["ko1-en0"]
    assert "cannot tell these ratios apart" in rec["message"] and rec["needed"]["items"] > 12
    assert "cannot tell these ratios apart" in (out / "report" / "report.md").read_text()


def test_changing_the_question_does_not_rerun_cells(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run_sweep(config_file, RATIOS, [1], out, {"eval.nll": True}, stages=FakeStages().stages())
    again = FakeStages()
    guard = [{"group": "language=en", "max_drop_pp": 0}]
    result = run_sweep(
        config_file,
        RATIOS,
        [1],
        out,
        {"eval.nll": True, "eval.guard": guard, **ADVISOR},
        stages=again.stages(),
    )
    assert [c["status"] for c in result["cells"]] == ["skipped", "skipped"] and again.calls == []
    assert result["advice"]["recommendation"]["recommended"] == "ko3-en10"
    verdict = json.loads((out / "cells" / "ko3-en10_seed1" / "eval" / "guard.json").read_text())
    assert verdict["passed"] and verdict["checks"][0]["group"] == "language=en"


def test_sweep_cli_takes_target_protect_margin_metric(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import medtune.sweep
    from medtune.cli import app

    monkeypatch.setattr(medtune.sweep, "default_stages", lambda: FakeStages().stages())
    out = tmp_path / "sweep"
    args = ["sweep", str(config_file), "--ratios", "ko:en=1:0,3:10", "--seeds", "1,2", "--out", str(out)]
    args += ["--target", "language=ko", "--protect", "language=en", "--margin", "0.05", "--metric", "nll"]
    result = CliRunner().invoke(app, [*args, "--set", "eval.nll=true"])
    assert result.exit_code == 0, result.output
    assert "recommended: ko3-en10" in result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["overrides"]["sweep.margin"] == 0.05 and sweep["advice"]["recommendation"]["margin"] == 0.05
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "other")])  # nll without eval.nll
    assert bad.exit_code != 0 and "eval.nll" in str(bad.exception)
