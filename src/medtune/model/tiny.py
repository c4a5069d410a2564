"""Tiny random-weight models for tests and the quick-start, saved as ordinary model directories.

Nothing downstream special-cases them: a tiny model is a folder with `config.json`,
`model.safetensors` and a tokenizer, loaded by the same code path as MedGemma or Llama. The
tokenizer is a byte-level BPE trained here on bundled Korean + English medical text, so Hangul
becomes a few tokens per word instead of one per byte.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast

Arch = Literal["llama", "gemma3"]

# Chat templates in the style of each family, so formatting is tested through a real template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIAL = {
    "llama": [
        "<pad>",
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    "gemma3": ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
}


def train_tokenizer(
    arch: Arch, vocab_size: int = 4096, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled corpus, with the family's special tokens."""
    special = SPECIAL[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = resources.files("medtune.model").joinpath("tiny_corpus.txt").read_text(encoding="utf-8")
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    bos, eos = special[1], special[2]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>")
    if chat_template:
        fast.chat_template = LLAMA3_TEMPLATE if arch == "llama" else GEMMA_TEMPLATE
    return fast


def tiny_config(arch: Arch, vocab_size: int, tokenizer: PreTrainedTokenizerFast, **overrides: object):
    """A 2-layer model config of a few hundred thousand parameters (hidden 64).

    initializer_range is 0.1, not the usual 0.02: with hidden 64 and a frozen lm_head of std 0.02,
    no hidden state can move a logit by more than ~1.3, so LoRA could barely lower the loss.
    """
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.1,
    }
    shared = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        **ids,
    )
    if arch == "llama":
        return LlamaConfig(**{**shared, "tie_word_embeddings": False, **overrides})
    gemma = dict(
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )
    return Gemma3TextConfig(**{**shared, **gemma, **overrides})


def build_tiny_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    seed: int = 0,
    vocab_size: int = 4096,
    chat_template: bool = True,
    **config_overrides: object,
) -> Path:
    """Write a random-initialised `arch` model + trained tokenizer to `out_dir`; return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(arch, vocab_size, chat_template)
    config = tiny_config(arch, len(tokenizer), tokenizer, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
