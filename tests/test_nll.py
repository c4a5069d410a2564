"""Held-out NLL: per-item values equal a hand computation, paired comparisons behave, eval wires it in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.config import FormatConfig, PackingConfig, validate_config
from medtune.evaluate.nll import compare_nll, nll_table, score_nll
from medtune.format import render_prompt, render_target
from tests.conftest import mcqa_record

KEYS = ("language", "source", "subject", "tag")


def _mcqa(i: int, lang: str) -> dict:
    question = (
        "고혈압 환자의 치료는? " * (1 + 3 * i) if lang == "ko" else "Which drug lowers fever? " * (1 + i)
    )
    return mcqa_record(
        i,
        id=f"mcqa-{lang}-{i}",
        source=f"quiz_{lang}",
        language=lang,
        tags=["medical_law"] if i == 0 else [],
        question=question,
    )


def _dialogue(i: int) -> dict:
    return {
        **_mcqa(i, "en"),
        "id": f"chat-{i}",
        "source": "heldout_en",
        "kind": "instruction",
        "tags": [],
        "question": "",
        "options": [],
        "answer": None,
        "prompt": "Doctor, I have had a headache for three days. " * (1 + i),
        "response": "Rest, drink fluids and take paracetamol; see me if it gets worse.",
    }


def _by_hand(model, tokenizer, record: dict, cfg: FormatConfig, whole: bool) -> tuple[float, int]:
    """One record alone, full logits, F.cross_entropy over the tokens training would score."""
    prompt = tokenizer(render_prompt(record, tokenizer, cfg), add_special_tokens=True)["input_ids"]
    target = tokenizer(render_target(record, cfg, tokenizer), add_special_tokens=False)["input_ids"]
    target += [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    first = 0 if whole else len(prompt) - 1
    nll = F.cross_entropy(logits[first:], ids[0, 1:][first:], reduction="sum")
    return float(nll), ids.shape[1] - 1 - first


@pytest.mark.parametrize("scope", ["targets", "text"])
def test_packed_item_nll_equals_each_item_alone(tiny_llama_dir: Path, scope: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    records = (
        [_mcqa(i, "ko") for i in range(3)] + [_mcqa(i, "en") for i in range(2)] + [_dialogue(0), _dialogue(3)]
    )
    cfg = FormatConfig(template="plain")
    packing = PackingConfig(max_seq_len=64)  # some items are longer: they get a row alone
    rows = score_nll(model, tokenizer, records, cfg, packing, scope=scope)
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert scope == "targets" or max(r["tokens"] for r in rows) > 64  # long items get a row alone
    for record, row in zip(records, rows, strict=True):
        whole = scope == "text" and record["kind"] == "mcqa"  # `targets`: answers only, as trained
        want, n = _by_hand(model, tokenizer, record, cfg, whole)
        assert row["tokens"] == n, record["id"]
        assert row["nll"] == pytest.approx(want, rel=1e-4), record["id"]


def _rows(values: list[float], source: str = "s", lang: str = "en") -> list[dict]:
    return [
        {
            "id": f"{source}-{i}",
            "language": lang,
            "source": source,
            "subject": None,
            "tags": [],
            "tokens": 10,
            "nll": 10 * v,
        }
        for i, v in enumerate(values)
    ]


def test_compare_identical_models_is_zero_and_not_significant() -> None:
    rows = _rows([1.0, 2.0, 3.0, 2.5])
    result = compare_nll(rows, rows, KEYS, 500, 0)["all"]
    assert result["delta"] == 0 and result["ci95"] == [0.0, 0.0] and not result["significant"]


def test_compare_consistent_shift_is_significant_and_pairs_by_id() -> None:
    a = _rows([2.0 + 0.1 * (i % 7) for i in range(40)])
    b = list(reversed(_rows([1.9 + 0.1 * (i % 7) for i in range(40)])))  # order must not matter
    result = compare_nll(a, b, KEYS, 1000, 0)["all"]
    assert result["delta"] == pytest.approx(-0.1) and result["significant"]
    assert result["ci95"][1] < 0 and result["b_lower_share"] == 1.0
    table = nll_table(a, KEYS, 500, 0)["all"]
    assert table["n"] == 40 and table["tokens"] == 400 and table["ci95"][0] < table["nll"] < table["ci95"][1]


def test_run_eval_reports_heldout_nll_per_group(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from medtune.evaluate.run import run_eval

    prep = tmp_path / "prepare"
    prep.mkdir()
    evals = [_mcqa(i, "ko") for i in range(3)] + [_dialogue(i) for i in range(2)]
    (prep / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    (prep / "train.jsonl").write_text("")
    # A fresh adapter (B = 0) changes nothing: tuned - base must be exactly 0 per item.
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4)).save_pretrained(
        tmp_path / "train" / "adapter"
    )
    cfg = validate_config(
        {
            "model": {"path": str(tiny_llama_dir)},
            "quantization": {"mode": "none"},
            "data": {"eval": [{"path": str(prep / "eval.jsonl")}]},
            "format": {"template": "plain"},
            "eval": {"nll": True},
        }
    )
    out = tmp_path / "eval"
    run_eval(cfg, prep, tmp_path / "train", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_items"] == 3 and metrics["skipped"] == {"not_mcqa": 2}
    nll = metrics["nll"]
    assert nll["base"]["all"]["n"] == 5 and nll["base"]["source=heldout_en"]["n"] == 2
    assert nll["tuned"]["all"]["nll"] == pytest.approx(nll["base"]["all"]["nll"])
    assert nll["tuned_vs_base"]["language=ko"]["delta"] == pytest.approx(0, abs=1e-9)
    assert len((out / "tuned" / "nll.jsonl").read_text().splitlines()) == 5
    assert "Held-out NLL" in (out / "results.md").read_text()
