"""The efficiency matrix: which cells run, how metrics become figures and ratios, and (slow) a real
smoke matrix on the tiny model whose figures must be physically sensible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtune.bench import add_ratios, matrix_cells, run_bench, summarize_metrics


def test_full_matrix_crosses_every_axis_with_the_naive_baseline_first() -> None:
    cells = matrix_cells("full", vocab_size=4096)
    assert len(cells) == 16 and len({c.name for c in cells}) == 16
    assert cells[0].name == "lora-padded-gc0-r1"
    assert cells[0].overrides == {
        "quantization.mode": "none",
        "packing.mode": "padded",
        "train.gradient_checkpointing": False,
        "distributed.nproc": 1,
    }
    assert {c.nproc for c in cells} == {1, 2}
    assert sum(c.overrides["quantization.mode"] == "nf4" for c in cells) == 8
    assert not any("train.chunked_ce" in c.overrides for c in cells)  # small vocab: no CE cells


def test_chunked_ce_cells_appear_for_a_large_vocab_or_on_request() -> None:
    big = matrix_cells("full", vocab_size=262_144)
    assert [c.overrides.get("train.chunked_ce") for c in big[-2:]] == ["off", "on"]
    assert len(matrix_cells("full", vocab_size=4096, chunked_ce_cells=True)) == 18
    assert len(matrix_cells("full", vocab_size=262_144, chunked_ce_cells=False)) == 16


def test_smoke_matrix_is_a_small_single_rank_subset() -> None:
    cells = matrix_cells("smoke")
    assert len(cells) == 4 and all(c.nproc == 1 for c in cells)
    assert cells[0].name == matrix_cells("full")[0].name  # same baseline as the full matrix
    assert {c.overrides["packing.mode"] for c in cells} == {"padded", "packed"}


def _row(step: int, seconds: float, real: int, slots: int, peak: int) -> dict:
    return {
        "step": step,
        "loss": 1.0 / step,
        "real_tokens": real,
        "slots": slots,
        "step_seconds": seconds,
        "tokens_per_s": real / seconds,
        "peak_memory_bytes": peak,
        "real_token_fraction": real / slots,
    }


def test_summary_skips_the_warm_up_step_and_pools_padding_over_steps() -> None:
    rows = [
        _row(1, 10.0, 100, 400, 5),
        _row(2, 1.0, 300, 400, 7),
        _row(3, 3.0, 300, 400, 6),
        _row(4, 2.0, 300, 400, 6),
    ]
    s = summarize_metrics(rows)
    assert s["step_seconds"] == 2.0  # median of 1, 3, 2: the slow first step is left out
    assert s["tokens_per_s"] == 150.0  # median of 300, 100, 150
    assert s["padding_fraction"] == pytest.approx(1 - 1000 / 1600)
    assert s["peak_memory_bytes"] == 7 and s["steps"] == 4
    with pytest.raises(ValueError):
        summarize_metrics([])


def test_ratios_are_relative_to_the_first_cell_and_absent_when_it_failed() -> None:
    ok = {"status": "ok", "peak_memory_bytes": 100, "tokens_per_s": 50.0, "step_seconds": 2.0}
    results = [
        dict(ok),
        {**ok, "name": "b", "peak_memory_bytes": 50, "tokens_per_s": 100.0},
        {"status": "failed"},
    ]
    add_ratios(results)
    assert results[0]["ratios"] == {"peak_memory": 1.0, "tokens_per_s": 1.0, "step_seconds": 1.0}
    assert results[1]["ratios"] == {"peak_memory": 0.5, "tokens_per_s": 2.0, "step_seconds": 1.0}
    assert results[2]["ratios"] is None
    failed_base = [{"status": "failed"}, dict(ok)]
    add_ratios(failed_base)
    assert failed_base[1]["ratios"] is None


def test_report_shows_a_bench_result(tmp_path: Path) -> None:
    from medtune.report.build import run_report

    cells = [
        {"name": n, "status": "ok", **summarize_metrics([_row(1, 2.0, r, 400, m), _row(2, 1.0, r, 400, m)])}
        for n, r, m in (("lora-padded-gc0-r1", 200, 2**28), ("lora-packed-gc0-r1", 380, 2**27))
    ]
    cells.append({"name": "qlora-packed-gc0-r2", "status": "failed", "error": "exit code 1: no FSDP here"})
    add_ratios(cells)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "bench.json").write_text(
        json.dumps({"machine": "test", "steps": 2, "baseline": cells[0]["name"], "cells": cells})
    )
    out = run_report(tmp_path / "run", tmp_path / "run" / "report")
    page = (out / "report.html").read_text()
    assert (out / "efficiency.png").read_bytes().startswith(b"\x89PNG")
    assert "no FSDP here" in page and "0.50" in page  # packed halves peak memory in this fake
    run_json = json.loads((out / "run.json").read_text())  # the report is a stage like the others
    assert run_json["stage"] == "report" and run_json["source"] == str(tmp_path / "run")
    assert run_json["seconds"] >= 0 and run_json["versions"]["medtune"]


def test_shared_prepare_reuses_the_runs_data_only_when_the_same_config_made_it(tmp_path: Path) -> None:
    from medtune.bench import _shared_prepare
    from medtune.config import load_config
    from medtune.data.prepare import run_prepare
    from medtune.manifest import read_manifest, write_json_atomic

    from .conftest import EXAMPLES, stand_in_model_dir

    base = {"output.dir": str(tmp_path / "run"), "model.path": str(stand_in_model_dir(tmp_path / "model"))}
    cfg = load_config(EXAMPLES / "quickstart.yaml", base)
    other = load_config(EXAMPLES / "quickstart.yaml", {**base, "data.mix.ratio": {"ko": 1, "en": 0}})
    run_prepare(other, tmp_path / "run" / "prepare")  # the run dir holds another mix, finished
    finished = {"stage": "prepare", "config_hash": other.config_hash()}
    write_json_atomic(tmp_path / "run" / "prepare" / "run.json", finished)

    prepared = _shared_prepare(cfg, tmp_path / "bench")
    assert prepared == tmp_path / "bench" / "prepare"
    langs = {json.loads(line)["language"] for line in (prepared / "train.jsonl").read_text().splitlines()}
    assert langs == {"ko", "en"}, "the bench trained on a mix its config did not ask for"
    assert read_manifest(prepared)["config"]["data"]["mix"]["ratio"] == {"ko": 1, "en": 1}
    assert _shared_prepare(other, tmp_path / "bench2") == tmp_path / "run" / "prepare"


@pytest.mark.slow
def test_smoke_matrix_on_the_tiny_model_gives_sane_figures(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from medtune.config import load_config

    from .conftest import EXAMPLES

    cfg = load_config(
        EXAMPLES / "quickstart.yaml",
        {"model.path": str(tiny_llama_dir), "output.dir": str(tmp_path / "run"), "packing.max_seq_len": 256},
    )
    result = run_bench(cfg, tmp_path / "bench", steps=3, cells="smoke")
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["baseline"] == "lora-padded-gc0-r1"
    by = {c["name"]: c for c in result["cells"]}
    assert all(c["status"] == "ok" for c in by.values()), {n: c["error"] for n, c in by.items()}
    for c in by.values():
        assert c["steps"] == 3 and c["tokens_per_s"] > 0 and c["peak_memory_bytes"] > 0
        assert 0 <= c["padding_fraction"] < 1
    assert by["lora-padded-gc0-r1"]["ratios"] == {
        "peak_memory": 1.0,
        "tokens_per_s": 1.0,
        "step_seconds": 1.0,
    }
    # Packing fills rows with whole examples: less padding, more real tokens per step than padding.
    assert by["lora-packed-gc0-r1"]["padding_fraction"] < by["lora-padded-gc0-r1"]["padding_fraction"]
    assert by["lora-packed-gc0-r1"]["real_tokens_per_step"] > by["lora-padded-gc0-r1"]["real_tokens_per_step"]
