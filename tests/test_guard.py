"""The forgetting guard on synthetic predictions: planted regressions are caught, unchanged models pass,
and export refuses a failed model unless forced."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medtune.config import GuardRule, RunConfig, validate_config
from medtune.errors import ConfigError
from medtune.evaluate.guard import GuardFailed, evaluate_guard, export_verdict, guard_lines
from medtune.evaluate.run import record_guard

KEYS = ["language", "source", "subject", "tag"]


def predictions(correct: np.ndarray, languages: list[str]) -> dict[str, dict]:
    return {
        f"q{i}": {"id": f"q{i}", "correct": bool(c), "language": lang, "source": "s", "tags": []}
        for i, (c, lang) in enumerate(zip(correct, languages, strict=True))
    }


def nll_rows(per_token: np.ndarray, languages: list[str]) -> list[dict]:
    return [
        {"id": f"q{i}", "language": lang, "source": "s", "tags": [], "tokens": 10, "nll": 10 * float(x)}
        for i, (x, lang) in enumerate(zip(per_token, languages, strict=True))
    ]


LANGS = ["en", "ko"] * 100
EN = np.array([lang == "en" for lang in LANGS])


def test_planted_accuracy_regression_is_caught_and_an_unchanged_model_passes() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(200) < 0.7
    tuned = base.copy()
    tuned[EN & base] = rng.random(int((EN & base).sum())) < 0.6  # English loses ~28 pp
    rules = [GuardRule(group="language=en", max_drop_pp=5), GuardRule(group="language=ko", max_drop_pp=5)]
    failed = evaluate_guard(rules, predictions(base, LANGS), predictions(tuned, LANGS), None, None, KEYS, 200)
    assert not failed["passed"]
    en, ko = failed["checks"]
    assert not en["passed"] and en["delta"] < -5 and en["p"] < 0.05 and ko["passed"]
    assert "FAIL language=en" in "\n".join(guard_lines(failed))
    same = evaluate_guard(rules, predictions(base, LANGS), predictions(base, LANGS), None, None, KEYS, 200)
    assert same["passed"] and guard_lines(same)[0] == "forgetting guard: PASSED"


def test_accuracy_guard_false_failures_stay_under_alpha_and_real_drops_are_found() -> None:
    """Many tuned models: same accuracy as the base (items flip both ways) vs. a 15 pp planted drop."""
    rng = np.random.default_rng(1)
    rule = [GuardRule(group="all", max_drop_pp=0)]
    n, false_fail, caught = 300, 0, 0
    for _ in range(n):
        base = rng.random(200) < 0.6
        flip = rng.random(200) < 0.2
        same_rate = np.where(flip, rng.random(200) < 0.6, base)
        dropped = base & (rng.random(200) > 0.25)  # a quarter of the right answers lost: ~15 pp
        b = predictions(base, LANGS)
        false_fail += not evaluate_guard(rule, b, predictions(same_rate, LANGS), None, None, KEYS, 100)[
            "passed"
        ]
        caught += not evaluate_guard(rule, b, predictions(dropped, LANGS), None, None, KEYS, 100)["passed"]
    assert false_fail / n <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / n)
    assert caught / n >= 0.95


def test_planted_nll_regression_is_caught_within_and_beyond_the_allowance() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(3.0, 0.5, 200)
    worse = base + np.where(EN, 0.3, 0.0) + rng.normal(0, 0.05, 200)
    rules = [GuardRule(group="language=en", max_nll_increase=0.1)]
    verdict = evaluate_guard(rules, {}, {}, nll_rows(base, LANGS), nll_rows(worse, LANGS), KEYS, 500)
    assert not verdict["passed"] and verdict["checks"][0]["metric"] == "nll"
    assert verdict["checks"][0]["ci95"][0] > 0.1
    generous = [GuardRule(group="language=en", max_nll_increase=0.5)]
    assert evaluate_guard(generous, {}, {}, nll_rows(base, LANGS), nll_rows(worse, LANGS), KEYS, 500)[
        "passed"
    ]


def test_a_group_with_no_items_fails_and_names_the_groups_there_are() -> None:
    base = predictions(np.ones(200, dtype=bool), LANGS)
    verdict = evaluate_guard([GuardRule(group="language=fr")], base, base, None, None, KEYS, 100)
    assert not verdict["passed"] and "language=fr" in verdict["checks"][0]["why"]
    assert "language=en" in verdict["checks"][0]["why"]


def test_guard_rules_are_validated_at_config_load() -> None:
    base = {"model": {"path": "m"}, "data": {"eval": [{"path": "x"}]}}
    nll_rule = {"group": "all", "max_nll_increase": 0.1}
    cfg = validate_config(base | {"eval": {"nll": True, "guard": [nll_rule, {"group": "language=en"}]}})
    assert [r.metric for r in cfg.eval.guard] == ["nll", "accuracy"] and cfg.eval.guard[1].allowed == 0
    # A verdict rule judges finished stages: it must not change the hash that decides what re-runs.
    assert cfg.config_hash() == validate_config(base | {"eval": {"nll": True}}).config_hash()
    with pytest.raises(ConfigError, match="eval.nll"):
        validate_config(base | {"eval": {"guard": [nll_rule]}})
    with pytest.raises(ConfigError, match="not both"):
        validate_config(
            base | {"eval": {"guard": [{"group": "all", "max_drop_pp": 1, "max_nll_increase": 1}]}}
        )
    with pytest.raises(ConfigError, match="max_drop_pp is for metric accuracy"):
        validate_config(
            base | {"eval": {"nll": True, "guard": [{"group": "all", "metric": "nll", "max_drop_pp": 1}]}}
        )


def test_eval_records_the_verdict_and_export_refuses_it_unless_forced(tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(
        {
            "model": {"path": "m"},
            "data": {"eval": [{"path": "x"}]},
            "eval": {"bootstrap_samples": 100, "guard": [{"group": "language=ko", "max_drop_pp": 2}]},
        }
    )
    eval_dir = tmp_path / "run" / "eval"
    base = np.arange(200) % 3 != 0
    tuned = base & ~(np.array([lang == "ko" for lang in LANGS]) & (np.arange(200) % 2 == 1))
    for label, correct in (("base", base), ("tuned", tuned)):
        (eval_dir / label).mkdir(parents=True)
        lines = "".join(json.dumps(p) + "\n" for p in predictions(correct, LANGS).values())
        (eval_dir / label / "predictions.jsonl").write_text(lines)
    verdict = record_guard(cfg, eval_dir)
    assert not verdict["passed"]
    assert json.loads((eval_dir / "guard.json").read_text()) == verdict
    with pytest.raises(GuardFailed, match="--force"):
        export_verdict(tmp_path / "run", force=False)
    forced = export_verdict(tmp_path / "run", force=True)
    assert forced["status"] == "failed" and forced["forced"] and forced["checks"][0]["group"] == "language=ko"
    (eval_dir / "guard.json").write_text(json.dumps({"passed": True, "checks": []}))
    assert export_verdict(tmp_path / "run", force=False)["status"] == "passed"
    (eval_dir / "guard.json").unlink()
    assert export_verdict(tmp_path / "run", force=False) == {"status": "not checked", "forced": False}


def test_run_report_shows_the_verdict_first(tmp_path: Path) -> None:
    from medtune.report.build import run_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    check = {"group": "language=en", "metric": "accuracy", "allowed": 2.0, "passed": False, "why": "-9.0 pp"}
    (run / "eval" / "guard.json").write_text(json.dumps({"passed": False, "checks": [check]}))
    page = (run_report(run, run / "report") / "report.md").read_text()
    first_section = page.split("## ")[1]
    assert first_section.startswith("Forgetting guard: FAILED") and "-9.0 pp" in first_section
    assert "--force" in first_section
