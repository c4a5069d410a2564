"""Paired comparison on constructed predictions, and `run_eval` end to end on a tiny model."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest

from medtune.evaluate.compare import (
    compare_predictions,
    compare_seeds,
    load_predictions,
    run_compare,
    run_compare_seeds,
)
from medtune.evaluate.stats import wilson_ci
from tests.conftest import mcqa_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _item(i: int, correct: bool | None, lang: str) -> dict:
    return {
        "id": f"q{i}",
        "gold": "A",
        "predicted": "A" if correct else "B",
        "correct": correct,
        "status": "unscorable" if correct is None else "ok",
        "scores": None,
        "language": lang,
        "source": "medqa" if lang == "en" else "kormedmcqa",
        "subject": None,
        "tags": ["medical_law"] if lang == "ko" and i % 2 else [],
    }


def _write(path: Path, items: list[dict], shuffle_seed: int | None = None) -> Path:
    items = list(items)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return path


def _pair_sets(only_a: int, only_b: int, both: int, neither: int, lang: str, start: int = 0):
    flags = (
        [(True, False)] * only_a
        + [(False, True)] * only_b
        + [(True, True)] * both
        + [(False, False)] * neither
    )
    a = [_item(start + i, fa, lang) for i, (fa, _) in enumerate(flags)]
    b = [_item(start + i, fb, lang) for i, (_, fb) in enumerate(flags)]
    return a, b


def test_identical_predictions_give_zero_delta_and_p_one(tmp_path: Path) -> None:
    a, _ = _pair_sets(5, 0, 30, 10, "en")
    result = run_compare(
        _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", a, 1), None, tmp_path / "out"
    )
    g = result["groups"]["all"]
    assert g["delta_pp"] == 0 and g["mcnemar_p"] == 1.0 and g["ci95_pp"] == [0.0, 0.0]
    assert not g["significant"] and g["verdict"].startswith("not significant")
    assert "not significant" in (tmp_path / "out" / "compare.md").read_text()
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["groups"]["all"]["n"] == 45


def test_known_discordant_counts(tmp_path: Path) -> None:
    a_en, b_en = _pair_sets(2, 14, 40, 20, "en")  # B clearly better on English
    a_ko, b_ko = _pair_sets(6, 4, 20, 10, "ko", start=1000)  # a wash on Korean
    result = compare_predictions(
        {x["id"]: x for x in a_en + a_ko}, {x["id"]: x for x in b_en + b_ko}, 2000, 0
    )
    en, ko = result["groups"]["language=en"], result["groups"]["language=ko"]
    assert en["mcnemar_p"] == pytest.approx(binomtest(2, 16, 0.5).pvalue)
    assert ko["mcnemar_p"] == pytest.approx(binomtest(4, 10, 0.5).pvalue)
    assert en["delta_pp"] == pytest.approx(100 * 12 / 76)
    assert en["significant"] and en["verdict"].startswith("B better")
    assert not ko["significant"] and "not significant" in ko["verdict"]
    assert en["ci95_pp"][0] > 0 and ko["ci95_pp"][0] < ko["delta_pp"] < ko["ci95_pp"][1]
    assert (en["only_a_correct"], en["only_b_correct"]) == (2, 14)
    assert result["groups"]["all"]["n"] == 116 and "tag=medical_law" in result["groups"]


def test_pairs_by_id_skipping_unscorable_and_unmatched(tmp_path: Path) -> None:
    a, b = _pair_sets(3, 3, 10, 4, "en")
    a.append(_item(500, True, "en"))  # only in A
    b[0] = {**b[0], "correct": None, "status": "unscorable"}
    result = compare_predictions({x["id"]: x for x in a}, {x["id"]: x for x in b})
    assert result["only_in_a"] == 1 and result["only_in_b"] == 0 and result["unscorable"] == 1
    assert result["groups"]["all"]["n"] == 19


def test_forgetting_table_lists_groups_worse_than_base(tmp_path: Path) -> None:
    base_en, tuned_en = _pair_sets(12, 1, 30, 5, "en")  # tuned forgot English
    base_ko, tuned_ko = _pair_sets(1, 9, 20, 5, "ko", start=1000)  # and learnt Korean
    base = _write(tmp_path / "base.jsonl", base_en + base_ko)
    tuned = _write(tmp_path / "tuned.jsonl", tuned_en + tuned_ko)
    result = run_compare(base, tuned, base, tmp_path / "out")
    rows = {(r["model"], r["group"]): r for r in result["forgetting"]}
    assert ("B", "language=en") in rows and ("B", "language=ko") not in rows
    assert rows[("B", "language=en")]["delta_pp"] == pytest.approx(-100 * 11 / 48)
    assert rows[("B", "language=en")]["significant"]
    assert not any(model == "A" for model, _ in rows)  # A is the base itself: no change
    assert "Forgetting vs base" in (tmp_path / "out" / "compare.md").read_text()


ONE_RUN = Path(__file__).parent / "data" / "compare" / "one_run"


def test_one_run_form_writes_what_it_always_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medtune compare A B --base BASE`: compare.md, compare.json and the terminal table byte for byte as
    the one-run code wrote them before seeds were supported (tests/data/compare/one_run/expected)."""
    from medtune.cli import main

    for name in ("a.jsonl", "b.jsonl", "base.jsonl"):
        shutil.copy(ONE_RUN / name, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "a.jsonl", "b.jsonl", "--base", "base.jsonl", "--out", "out"])
    assert exit_.value.code == 0
    expected = ONE_RUN / "expected"
    assert capsys.readouterr().out == (expected / "terminal.txt").read_text(encoding="utf-8")
    for name in ("compare.md", "compare.json"):
        assert (tmp_path / "out" / name).read_text(encoding="utf-8") == (expected / name).read_text(
            encoding="utf-8"
        ), name


def test_load_predictions_errors(tmp_path: Path) -> None:
    from medtune.errors import RunDirError

    with pytest.raises(RunDirError):
        load_predictions(tmp_path / "missing.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": "x"}\n{"id": "x"}\n')
    with pytest.raises(RunDirError, match="duplicate"):
        load_predictions(tmp_path / "dup.jsonl")


# ------------------------------------------------------------------------------ several runs (seeds) per side
# A run's item i is correct with probability sigmoid(difficulty_i + run offset + effect): items share
# their difficulty across every run of both models, and each run (seed) lands somewhere of its own.


def seeded_runs(
    rng: np.random.Generator,
    difficulty: np.ndarray,
    n_runs: int,
    effect: dict[str, float],
    seed_sd: float,
) -> list[dict[str, dict]]:
    """Predictions of `n_runs` training runs of one model; `effect` (logits) per language."""
    langs = ["en" if i % 2 else "ko" for i in range(len(difficulty))]
    shift = np.array([effect.get(lang, 0.0) for lang in langs])
    runs = []
    for _ in range(n_runs):
        p = 1 / (1 + np.exp(-(difficulty + shift + rng.normal(0, seed_sd))))
        correct = rng.random(len(difficulty)) < p
        runs.append(
            {f"q{i}": _item(i, bool(c), lang) for i, (c, lang) in enumerate(zip(correct, langs, strict=True))}
        )
    return runs


def nll_rows(rng: np.random.Generator, items: dict[str, dict], shift: float) -> list[dict]:
    """An nll.jsonl beside one run's predictions: 20 target tokens per item, lower NLL when correct."""
    return [
        {**{k: it[k] for k in ("id", "language", "source", "subject", "tags")}, "kind": "mcqa", "tokens": 20}
        | {"nll": 20 * (2.0 + shift - 0.3 * it["correct"] + rng.normal(0, 0.2))}
        for it in items.values()
    ]


def write_run(path: Path, items: dict[str, dict], nll: list[dict] | None = None) -> Path:
    """An eval dir as `medtune eval` leaves it: predictions.jsonl, and nll.jsonl when given."""
    path.mkdir(parents=True)
    _write(path / "predictions.jsonl", list(items.values()))
    if nll is not None:
        (path / "nll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in nll), encoding="utf-8")
    return path


def test_seed_aware_compare_finds_a_planted_effect_where_it_is() -> None:
    """B is better on Korean only (+1.2 logits), over three seeds a side."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1, 300)
    a = seeded_runs(rng, difficulty, 3, {}, seed_sd=0.2)
    b = seeded_runs(rng, difficulty, 3, {"ko": 1.2}, seed_sd=0.2)
    groups = compare_seeds(a, b, "accuracy")["groups"]
    ko, en = groups["language=ko"], groups["language=en"]
    assert ko["significant"] and ko["ci95"][0] > 0 and ko["verdict"].startswith("B better by")
    assert not en["significant"] and en["verdict"].startswith("not significant")
    assert ko["seeds"] == [3, 3] and ko["n"] == 150 and len(ko["b_seed_means"]) == 3


def test_seed_aware_compare_with_no_effect_is_significant_at_about_the_nominal_rate() -> None:
    """Equal models, three seeds a side, run-to-run spread larger than the items' noise: the seed-aware
    interval calls them different about 5% of the time. The items-only paired test on one seed each
    (the one-run form) is fooled far more often: the seeds matter in this simulation."""
    rng = np.random.default_rng(1)
    n, seed_aware, items_only = 300, 0, 0
    for _ in range(n):
        difficulty = rng.normal(0, 1, 120)
        a = seeded_runs(rng, difficulty, 3, {}, seed_sd=0.8)
        b = seeded_runs(rng, difficulty, 3, {}, seed_sd=0.8)
        seed_aware += compare_seeds(a, b, "accuracy")["groups"]["all"]["significant"]
        items_only += compare_predictions(a[0], b[0], 200, 0)["groups"]["all"]["significant"]
    slack = 3 * math.sqrt(0.05 * 0.95 / n)
    assert abs(seed_aware / n - 0.05) <= slack
    assert items_only / n > 0.05 + 2 * slack


def test_seed_dominance_is_said() -> None:
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 1, 400)
    a = seeded_runs(rng, difficulty, 3, {}, seed_sd=0.8)
    b = seeded_runs(rng, difficulty, 3, {}, seed_sd=0.8)
    row = compare_seeds(a, b, "accuracy")["groups"]["all"]
    assert row["seed_dominates"] and row["seed_share"] > 0.5
    assert row["verdict"].endswith("seed variation dominates")


def test_cli_compares_two_runs_per_side_on_accuracy_and_nll(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`medtune compare A1 A2 --vs B1 B2 --base BASE`: eval dirs with nll.jsonl beside the predictions;
    B is better on Korean and its held-out NLL is lower everywhere; B's seeds forgot some English."""
    from medtune.cli import main

    rng = np.random.default_rng(3)
    difficulty = rng.normal(0, 1, 200)
    (base,) = seeded_runs(rng, difficulty, 1, {"en": 0.8}, seed_sd=0.0)
    dirs = []
    for side, effect, shift in (("a", {}, 0.0), ("b", {"ko": 1.5, "en": -0.8}, -0.5)):
        for k, items in enumerate(seeded_runs(rng, difficulty, 2, effect, seed_sd=0.1)):
            dirs.append(write_run(tmp_path / f"{side}{k}", items, nll_rows(rng, items, shift)))
    write_run(tmp_path / "base", base, nll_rows(rng, base, 0.3))
    args = [*dirs[:2], "--vs", *dirs[2:], "--base", tmp_path / "base", "--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_:
        main(["compare", *map(str, args)])
    assert exit_.value.code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["seeds"] == [2, 2] and result["a"] == [str(d) for d in dirs[:2]]
    acc, nll = result["metrics"]["accuracy"], result["metrics"]["nll"]
    assert acc["groups"]["language=ko"]["significant"] and acc["groups"]["language=ko"]["estimate"] > 0
    assert nll["groups"]["all"]["significant"] and nll["groups"]["all"]["verdict"].startswith("B better")
    assert nll["groups"]["all"]["estimate"] == pytest.approx(-0.5, abs=0.1)
    forgot = {(r["model"], r["group"]) for r in acc["forgetting"] if r["significant"]}
    assert ("B", "language=en") in forgot and ("B", "language=ko") not in forgot
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "2 runs" in md and "## Held-out NLL" in md and "Forgetting vs base" in md
    out = capsys.readouterr().out
    assert "B vs A over seeds" in out and "language=ko" in out


def test_cli_with_several_runs_needs_vs_between_the_sides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from medtune.cli import main

    for args in (["a", "b", "c"], ["a", "--vs"], ["a", "--vs", "b", "--vs", "c"], ["a", "b", "--bsae", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["compare", *args, "--out", str(tmp_path / "out")])
        assert exit_.value.code == 2, args
    assert "--vs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_one_run_on_a_side_is_said_and_a_missing_nll_is_named(tmp_path: Path) -> None:
    """A base model has no seed to vary: one run against several is allowed, and the output says what
    that assumes. NLL is left out, with the file named, when one run lacks nll.jsonl."""
    rng = np.random.default_rng(4)
    difficulty = rng.normal(0, 1, 60)
    (a,) = seeded_runs(rng, difficulty, 1, {}, seed_sd=0.0)
    b = seeded_runs(rng, difficulty, 2, {}, seed_sd=0.3)
    paths_b = [write_run(tmp_path / f"b{k}", run, nll_rows(rng, run, 0.0)) for k, run in enumerate(b)]
    result = run_compare_seeds([write_run(tmp_path / "a", a)], paths_b, None, tmp_path / "out")
    assert list(result["metrics"]) == ["accuracy"]
    notes = " ".join(result["notes"])
    assert "A has one run" in notes and str(tmp_path / "a" / "nll.jsonl") in notes
    assert "A has one run" in (tmp_path / "out" / "compare.md").read_text()


# ------------------------------------------------------------------------------ run_eval end to end
def _records(n: int, source: str, lang: str, split: str) -> list[dict]:
    return [
        mcqa_record(
            i,
            id=f"{source}:{split}:{i}",
            source=source,
            split=split,
            language=lang,
            subject="nurse" if lang == "ko" else None,
            tags=["medical_law"] if i % 3 == 0 else [],
            question=f"{source} {split} question {i} about fever?",
        )
        for i in range(n)
    ]


def test_run_eval_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medtune.config import validate_config
    from medtune.evaluate.run import run_eval

    prep = tmp_path / "prepare"
    prep.mkdir()
    evals = _records(6, "medqa", "en", "eval") + _records(6, "kormedmcqa", "ko", "eval")
    (prep / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    train = _records(8, "medqa", "en", "train") + _records(8, "kormedmcqa", "ko", "train")
    (prep / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    # A freshly initialised LoRA adapter (B = 0) changes nothing: tuned must equal base item for item.
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4))
    peft_model.save_pretrained(tmp_path / "train" / "adapter")
    cfg = validate_config(
        {
            "model": {"path": str(tiny_llama_dir)},
            "quantization": {"mode": "none"},
            "data": {"eval": [{"path": str(prep / "eval.jsonl")}]},
            "format": {"template": "plain"},
            "eval": {"max_items": 4, "batch_size": 3, "k_shot": 1},
        }
    )
    out = tmp_path / "eval"
    summary = run_eval(cfg, prep, tmp_path / "train", out)
    assert summary["n_items"] == 8  # 4 per source
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"] == {"over_max_items": 4}
    base = [json.loads(x) for x in (out / "base" / "predictions.jsonl").read_text().splitlines()]
    tuned = [json.loads(x) for x in (out / "tuned" / "predictions.jsonl").read_text().splitlines()]
    assert [b["predicted"] for b in base] == [t["predicted"] for t in tuned]
    groups = metrics["models"]["base"]["groups"]
    assert groups["all"]["n"] == 8 and {
        "language=ko",
        "source=medqa",
        "subject=nurse",
        "tag=medical_law",
    } <= set(groups)
    k = groups["all"]["correct"]
    assert groups["all"]["wilson_95"] == pytest.approx(list(wilson_ci(k, 8)))
    assert metrics["compare"]["all"]["delta_pp"] == 0 and metrics["compare"]["all"]["mcnemar_p"] == 1.0
    assert (out / "results.md").is_file() and (out / "compare.md").is_file()
