"""Training on a real pretrained model (Gemma 3 270M): QLoRA lowers the loss, packing stays exact.

Skipped, with the command to fetch it, when the model is absent. Looked up in
`$MEDTUNE_MODELS_DIR/gemma3-270m`, else `<repo>/models/gemma3-270m`. The data is the bundled
medical text (MedQA questions, ChatDoctor answers) run through `medtune prepare`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from medtune.config import FormatConfig, PackingConfig, validate_config
from medtune.data.prepare import read_prepared, run_prepare
from medtune.format import bos_prefix, shifted_labels, tokenize_example
from medtune.packing import collate, forward_kwargs
from medtune.train import run_train
from tests.conftest import skip_unless_required

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"
GEMMA_SLIDING_WINDOW = 512


@pytest.fixture(scope="module")
def gemma_dir() -> Path:
    base = Path(os.environ["MEDTUNE_MODELS_DIR"]) if os.environ.get("MEDTUNE_MODELS_DIR") else REPO / "models"
    model_dir = base / "gemma3-270m"
    if not (model_dir / "config.json").is_file():
        skip_unless_required(
            f"{model_dir} not found; run `medtune model fetch gemma3-270m` (one-time download)"
        )
    return model_dir


def _config(model_dir: Path, out: Path, **train: object):
    return validate_config(
        {
            "seed": 0,
            "model": {"path": str(model_dir)},
            "data": {
                "train": [
                    {"path": str(DATA / "medqa/train.jsonl"), "format": "medqa", "limit": 1},
                    {"path": str(DATA / "genmedgpt/chatdoctor5k.json"), "format": "genmedgpt", "limit": 2},
                ]
            },
            "quantization": {"mode": "nf4"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "packing": {"mode": "packed", "max_seq_len": 512},
            "train": train,
            "output": {"dir": str(out)},
        }
    )


@pytest.fixture(scope="module")
def prepared(gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real records (a MedQA question, two ChatDoctor dialogues), prepared as a run would."""
    out = tmp_path_factory.mktemp("real-prepare")
    run_prepare(_config(gemma_dir, out), out / "prepare")
    return out / "prepare"


def test_qlora_steps_lower_the_loss_on_real_text(gemma_dir: Path, prepared: Path, tmp_path: Path) -> None:
    # All rows fit in one micro-batch, so every step sees the same text: the loss logged at step k is
    # the loss on that text after k-1 updates, and step 1's is the pretrained model's.
    cfg = _config(
        gemma_dir,
        tmp_path,
        max_steps=3,
        micro_batch_size=4,
        grad_accum=1,
        lr=1e-3,
        warmup_steps=0,
        scheduler="constant",
    )
    summary = run_train(cfg, prepared, tmp_path / "train")
    assert summary["rows_per_epoch"] <= cfg.train.micro_batch_size
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "train" / "adapter" / "adapter_model.safetensors").is_file()


def _long_example(records: list[dict], tokenizer, n_tokens: int) -> dict[str, list[int]]:
    """~n_tokens of real medical text: the prepared records' questions and answers, one after another."""
    text = "\n\n".join(f"{r['question']}\n{r.get('response') or r.get('answer') or ''}" for r in records)
    ids = bos_prefix(tokenizer) + tokenizer(text * 4, add_special_tokens=False)["input_ids"]
    assert len(ids) >= n_tokens, "not enough text for the long example"
    ids = ids[:n_tokens]
    return {"input_ids": ids, "labels": shifted_labels(ids, 1, False)}


@torch.no_grad()
def test_packed_logits_equal_separate_runs_past_the_sliding_window(gemma_dir: Path, prepared: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    assert model.config.sliding_window == GEMMA_SLIDING_WINDOW
    cfg = PackingConfig(mode="packed", max_seq_len=1024)
    records = list(read_prepared(prepared, "train"))
    short = [tokenize_example(r, tokenizer, FormatConfig()) for r in records[:2]]
    long = _long_example(records, tokenizer, 600)
    examples = [short[0], long, short[1]]  # the long one in the middle: documents on both sides of it
    lengths = [len(e["input_ids"]) for e in examples]
    assert lengths[1] > GEMMA_SLIDING_WINDOW and sum(lengths) <= cfg.max_seq_len

    packed = collate(examples, [[0, 1, 2]], cfg)
    packed_logits = model(**forward_kwargs(model, packed)).logits[0]
    start, worst = 0, []
    for i, n in enumerate(lengths):
        alone = model(**forward_kwargs(model, collate(examples, [[i]], cfg))).logits[0]
        worst.append(float((packed_logits[start : start + n] - alone).abs().max()))
        start += n
    print(f"lengths {lengths}: max abs logit diff packed vs separate {worst}")
    assert max(worst) < 1e-3, worst
