"""Real pretrained models fetched with `medtune model fetch`: the import is faithful and the model works.

Skipped, with the command to run, when the model directory is absent. Looked up in
`$MEDTUNE_MODELS_DIR/<name>`, else `<repo>/models/<name>` (where `fetch` puts them when run from the repo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.model.fetch import IMPORT_RECORD, PROVENANCE, RELEASES, is_fetched
from medtune.model.gguf import PARITY_PROMPTS
from tests.conftest import skip_unless_required

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EXPECTED = {
    "gemma3-270m": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "chat_template": False,
    },
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "chat_template": True},
}


def _model_dir(name: str) -> Path:
    base = Path(os.environ["MEDTUNE_MODELS_DIR"]) if os.environ.get("MEDTUNE_MODELS_DIR") else REPO / "models"
    model_dir = base / name
    if not is_fetched(model_dir, RELEASES[name]):
        skip_unless_required(
            f"{model_dir} is not a complete fetch; run `medtune model fetch {name}` (one-time download)"
        )
    return model_dir


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def real_model(request: pytest.FixtureRequest):
    model_dir = _model_dir(request.param)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    return request.param, model_dir, model, tokenizer


def test_import_was_verified_against_the_gguf(real_model):
    name, model_dir, model, _ = real_model
    record = json.loads((model_dir / IMPORT_RECORD).read_text())
    provenance = json.loads((model_dir / PROVENANCE).read_text())
    assert record["source_sha256"] == provenance["gguf_sha256"] == RELEASES[name].sha256
    # One bf16 step at the logits' scale is the most import_gguf accepts; a real model's logits reach ~50.
    assert set(record["parity_max_abs_diff"]) == set(PARITY_PROMPTS)
    assert all(0 <= d <= 0.5 for d in record["parity_max_abs_diff"].values()), record["parity_max_abs_diff"]
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == EXPECTED[name]["architectures"]
    assert config["model_type"] == EXPECTED[name]["model_type"] == model.config.model_type
    assert all((model_dir / f).is_file() for f in provenance["licence_files"])


def test_tokenizer_round_trips_korean_and_english(real_model):
    name, _, _, tokenizer = real_model
    for text in ("고혈압 환자의 치료", "Hypertension is treated with ACE inhibitors."):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert bool(tokenizer.chat_template) == EXPECTED[name]["chat_template"]
    if name == "gemma3-270m":
        # Gemma's 262k vocabulary has Korean words: ~6 tokens, where a byte-level vocabulary needs 20+.
        assert len(tokenizer("고혈압 환자의 치료", add_special_tokens=False).input_ids) <= 8


@torch.no_grad()
def test_greedy_generation_knows_a_fact(real_model):
    name, _, model, tokenizer = real_model
    # A base model continues text, so it gets a Q/A prompt; an instruct model gets its chat template.
    prompt = "Q: What is the capital of France?\nA:"
    if tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
            tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip(), "empty generation"
    # A garbled import (wrong q/k permutation, wrong norm offset) still generates text, but not this.
    assert "Paris" in text, (name, text)


@torch.no_grad()
def test_natural_text_is_far_more_likely_than_shuffled(real_model):
    """A faithful pretrained model predicts real prose well and the same tokens shuffled badly."""
    _, _, model, tokenizer = real_model
    text = (
        "Hypertension is a chronic condition in which the blood pressure in the arteries is persistently "
        "elevated. It is a major risk factor for stroke and heart disease."
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.cat(
        [ids[:, :1], ids[:, 1:][:, torch.randperm(ids.shape[1] - 1, generator=generator)]], 1
    )
    natural_loss = model(input_ids=ids, labels=ids).loss.item()
    shuffled_loss = model(input_ids=shuffled, labels=shuffled).loss.item()
    # Measured: gemma3-270m 1.6 vs 7.7 nats/token. Random weights give ~ln(vocab) = 11-12 for both.
    assert natural_loss < 3.0 and shuffled_loss - natural_loss > 3.0, (natural_loss, shuffled_loss)
