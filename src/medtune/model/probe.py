"""Does an exported model still compute what it came from? Fixed probes, compared within a tolerance.

The reference is the trained model as it ran (base + adapter, fp32, unmerged); an export is probed
the same way after it is written and reloaded as a user would: logits on fixed English and Korean
prompts, and the letter chosen on five fixed multiple-choice items. A GGUF file is also read back
tensor by tensor and loaded by transformers' own GGUF importer, which undoes llama.cpp's conventions
independently of our writer, so equal logits prove the q/k permutation and the Gemma norm offset.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

PROMPTS = (
    "A 54-year-old man has crushing chest pain radiating to the left arm. The first test to order is",
    "65세 여성이 3일 전부터 발열과 기침을 호소한다. 가장 먼저 시행할 검사는",
)
MCQA_ITEMS = (
    ("Which vitamin deficiency causes scurvy?", ("Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D")),
    ("Which organ produces insulin?", ("Liver", "Pancreas", "Kidney", "Spleen")),
    ("당뇨병 진단 기준에서 공복 혈당의 기준치는?", ("100 mg/dL", "110 mg/dL", "126 mg/dL", "200 mg/dL")),
    ("의료법상 진료기록부의 보존 기간은?", ("2년", "5년", "10년", "20년")),
    ("First-line treatment of anaphylaxis is", ("Antihistamine", "Epinephrine", "Steroid", "Fluids")),
)
LETTERS = "ABCD"
# Largest logit difference allowed, as a fraction of the reference's largest |logit|. Measured on tiny
# models: f16 storage ~1e-3, Q8_0 ~4e-2, a missing q/k permutation or Gemma norm offset 0.9-1.0.
TOLERANCE = {"float32": 1e-4, "f32": 1e-4, "f16": 2e-2, "bfloat16": 5e-2, "bf16": 5e-2, "q8_0": 1e-1}


@torch.no_grad()
def probe(model: Any, tokenizer: Any) -> dict[str, Any]:
    """Logits on the fixed prompts and letter scores on the fixed MCQA items, as float32 on the CPU."""
    device = next(model.parameters()).device
    logits = []
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        logits.append(model(input_ids=ids).logits[0].float().cpu())
    letter_ids = [tokenizer.encode(f" {letter}", add_special_tokens=False)[0] for letter in LETTERS]
    scores = []
    for question, options in MCQA_ITEMS:
        ids = tokenizer(mcqa_prompt(question, options), return_tensors="pt").input_ids.to(device)
        last = model(input_ids=ids).logits[0, -1].float().cpu()
        scores.append(last[letter_ids])
    return {"logits": logits, "letters": torch.stack(scores)}


def mcqa_prompt(question: str, options: tuple[str, ...]) -> str:
    lines = [f"Question: {question}"] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def compare_probes(ref: dict[str, Any], got: dict[str, Any], kind: str) -> dict[str, Any]:
    """Figures for export.json, and `passed`.

    Letters must agree on every item whose reference margin (best minus second-best letter logit)
    exceeds twice the largest logit error seen: closer calls may flip by rounding alone, and are
    reported as `near_ties` rather than hidden.
    """
    diffs = [(a - b).abs().max().item() for a, b in zip(ref["logits"], got["logits"], strict=True)]
    scale = max(t.abs().max().item() for t in ref["logits"])
    max_diff = max(diffs + [(ref["letters"] - got["letters"]).abs().max().item()])
    ref_pick, got_pick = ref["letters"].argmax(-1), got["letters"].argmax(-1)
    top2 = ref["letters"].topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    decisive = [m > 2 * max_diff for m in margin]
    bad = [i for i, d in enumerate(decisive) if d and ref_pick[i] != got_pick[i]]
    tolerance = TOLERANCE[kind] * max(scale, 1e-6)
    return {
        "max_abs_logit_diff": max_diff,
        "max_abs_logit_diff_per_prompt": dict(zip(("en", "ko"), diffs, strict=True)),
        "reference_max_abs_logit": scale,
        "tolerance": tolerance,
        "mcqa_reference": "".join(LETTERS[i] for i in ref_pick.tolist()),
        "mcqa_exported": "".join(LETTERS[i] for i in got_pick.tolist()),
        "mcqa_near_ties": [i for i, d in enumerate(decisive) if not d],
        "passed": max_diff <= tolerance and not bad,
    }


def release_memory() -> None:
    """Return a dropped model's memory now (callers `del` their references first): a 4B model in
    fp32 is 16 GB, and the reference and the exported copy must not both be resident."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_readback(merged: Path, gguf_path: Path, gguf_type: str) -> dict[str, Any]:
    """Every tensor back from the file: same names, same shapes, values within the type's rounding."""
    import numpy as np
    from safetensors.torch import load_file

    from medtune.model.gguf_export import gguf_tensors, read_back, text_config

    config = text_config(json.loads((merged / "config.json").read_text(encoding="utf-8")))
    state: dict[str, torch.Tensor] = {}
    for path in sorted(merged.glob("*.safetensors")):
        state.update(load_file(str(path)))
    expected, got = gguf_tensors(state, config), read_back(gguf_path)
    shape_errors = [n for n in expected if n in got and expected[n].shape != got[n].shape]
    worst = 0.0
    for name, array in expected.items():
        if name in got and name not in shape_errors:
            scale = max(float(np.abs(array).max()), 1e-6)
            worst = max(worst, float(np.abs(array - got[name]).max()) / scale)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    return {
        "tensors": len(got),
        "missing": missing,
        "unexpected": extra,
        "shape_mismatches": shape_errors,
        "max_relative_value_error": worst,
        "passed": not (missing or extra or shape_errors) and worst <= TOLERANCE[gguf_type],
    }


def transformers_gguf_check(out: Path, tokenizer: Any, ref: dict[str, Any], gguf_type: str) -> dict[str, Any]:
    """Load the GGUF with transformers' importer (config, weights and tokenizer) and compare with `ref`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    figures = compare_probes(ref, probe(model, tokenizer), gguf_type)
    del model
    release_memory()
    gguf_tok = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    same = [tokenizer(p).input_ids == gguf_tok(p).input_ids for p in PROMPTS]
    figures["tokenizer_matches"] = dict(zip(("en", "ko"), same, strict=True))
    figures["passed"] = figures["passed"] and all(same)
    return figures
