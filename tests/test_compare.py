"""Paired comparison on constructed predictions, and `run_eval` end to end on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from scipy.stats import binomtest

from medtune.evaluate.compare import compare_predictions, load_predictions, run_compare
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


def test_load_predictions_errors(tmp_path: Path) -> None:
    from medtune.errors import RunDirError

    with pytest.raises(RunDirError):
        load_predictions(tmp_path / "missing.jsonl")
    (tmp_path / "dup.jsonl").write_text('{"id": "x"}\n{"id": "x"}\n')
    with pytest.raises(RunDirError, match="duplicate"):
        load_predictions(tmp_path / "dup.jsonl")


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
            "packing": {"template": "plain"},
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
