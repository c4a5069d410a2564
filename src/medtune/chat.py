"""`medtune chat`: talk to a trained model in the terminal, to see what fine-tuning did before shipping it.

Works on a run directory (base + adapter, as trained), a merged export (plain HF folder) or a GGUF
export (through transformers' GGUF loader). Each turn is rendered by `format.render_conversation`
with the run's own format settings, so the model reads the prompt format it was trained on: the
chat template where training used it (what a server applying the same template sends), else
medtune's plain template. Replies stream as they are generated. `/reset`
forgets the conversation, `/quit` (or Ctrl-D) leaves. Greedy decoding by default, so a reply can be
reproduced; `temperature > 0` samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from medtune.config import FormatConfig
from medtune.errors import RunDirError
from medtune.format import encode_prompt as encode_rendered_prompt
from medtune.format import render_conversation

HELP = "Type a message (한국어 or English). /reset clears the conversation, /quit leaves."
END_OF_TURN = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>")


# ----------------------------------------------------------------------------- loading


def load_chat_model(target: Path) -> tuple[Any, Any, FormatConfig]:
    """(model, tokenizer, the prompt format it was trained with) from a run dir, a merged export or
    a GGUF export; RunDirError otherwise."""
    target = Path(target)
    if (target / "train" / "run.json").is_file() or (target / "train" / "adapter").is_dir():
        return _load_run(target)
    if (target / "model.gguf").is_file():
        return (*_load_exported(target, gguf_file="model.gguf"), _exported_format(target))
    if (target / "config.json").is_file() and list(target.glob("*.safetensors")):
        return (*_load_exported(target), _exported_format(target))
    if (target / "adapter_config.json").is_file():
        raise RunDirError(
            f"{target}: an adapter-only export; chat with the run directory it came from, or a merged export"
        )
    raise RunDirError(
        f"{target}: not a run directory (train/run.json + train/adapter/), a merged export "
        "(config.json + *.safetensors) or a GGUF export (model.gguf)"
    )


def _load_run(run_dir: Path) -> tuple[Any, Any, FormatConfig]:
    from medtune.export import full_precision, read_run
    from medtune.model.load import load_model_for_inference

    cfg, adapter = read_run(run_dir)
    if not torch.cuda.is_available():  # bitsandbytes 4-bit on a CPU is slow at best: load plain weights
        cfg = full_precision(cfg, "float32")
    return (*load_model_for_inference(cfg, adapter), cfg.format)


def _exported_format(model_dir: Path) -> FormatConfig:
    """The training run's format settings, recorded in `export.json`; defaults for other folders.

    Exports made before the `format:` section record the whole packing section: its row settings
    are left out here, since a format setting silently reset to its default would change the prompt.
    """
    try:
        recorded = json.loads((model_dir / "export.json").read_text(encoding="utf-8"))["prompt_format"]
        return FormatConfig.model_validate(
            {k: v for k, v in recorded.items() if k in FormatConfig.model_fields}
        )
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return FormatConfig()


def chat_dtype() -> torch.dtype:
    """Inference dtype of an exported model: bf16 on GPUs with bf16 units (compute capability >= 8.0),
    fp16 on older ones (V100, T4: fine for inference, no gradients to underflow), fp32 on the CPU."""
    from medtune.model.load import gpu_bf16_choice

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if gpu_bf16_choice(torch.device("cuda"))[0] else torch.float16


def _load_exported(model_dir: Path, gguf_file: str | None = None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = chat_dtype()
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True, **kwargs)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- prompting


def build_prompt(tokenizer: Any, messages: list[dict[str, str]], fmt: FormatConfig) -> str:
    """The conversation as the model was trained to read it, ending where the assistant speaks."""
    return render_conversation(messages, tokenizer, fmt)


def encode_prompt(
    tokenizer: Any, messages: list[dict[str, str]], fmt: FormatConfig, budget: int
) -> torch.Tensor:
    """Token ids of the prompt (BOS once, as in training), dropping the oldest exchanges to fit `budget`."""
    while True:
        ids = encode_rendered_prompt(build_prompt(tokenizer, messages, fmt), tokenizer)
        if len(ids) <= budget or len(messages) <= 1:
            return torch.tensor([ids[-budget:]])
        messages[:] = messages[2:]


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS and the end-of-turn markers: instruction models end a reply with these, not with EOS."""
    ids = model.generation_config.eos_token_id
    stop = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    stop.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(stop)


def make_streamer(tokenizer: Any, output: Console):
    """A TextStreamer that writes to `output` (a rich Console) instead of stdout."""
    from transformers import TextStreamer

    class ConsoleStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            output.print(text, end="\n" if stream_end else "", markup=False, highlight=False, soft_wrap=True)

    return ConsoleStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def generate_reply(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    output: Console,
    temperature: float = 0.0,
    fmt: FormatConfig | None = None,
) -> str:
    """Stream one assistant reply to `output` and return its text."""
    limit = getattr(model.config, "max_position_embeddings", None) or 4096
    budget = max(limit - max_new_tokens, 16)
    ids = encode_prompt(tokenizer, messages, fmt or FormatConfig(), budget).to(model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": 0.95}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=1,
        eos_token_id=stop_token_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        streamer=make_streamer(tokenizer, output),
        **sampling,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- the loop


def run_chat(
    target: Path,
    max_new_tokens: int = 256,
    input_fn: Callable[[str], str] = input,
    output: Console | None = None,
    temperature: float = 0.0,
) -> list[dict[str, Any]]:
    """Chat with `target` until /quit or end of input; return the turns (user, reply, context size).

    `input_fn` and `output` are injectable so a scripted session can be tested.
    """
    output = output or Console()
    model, tokenizer, fmt = load_chat_model(Path(target))
    output.print(Text.assemble(("medtune chat", "bold"), f" — {target}\n{HELP}"))
    messages: list[dict[str, str]] = []
    turns: list[dict[str, Any]] = []
    while True:
        try:
            line = input_fn("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            messages.clear()
            output.print("(conversation cleared)")
            continue
        if not line:
            continue
        context = len(messages)
        messages.append({"role": "user", "content": line})
        output.print("model> ", end="")
        reply = generate_reply(model, tokenizer, messages, max_new_tokens, output, temperature, fmt)
        messages.append({"role": "assistant", "content": reply})
        turns.append({"user": line, "reply": reply, "context_messages": context})
    return turns
