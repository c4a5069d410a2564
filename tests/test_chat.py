"""`medtune chat` driven by a scripted input_fn: replies, /reset, /quit, Korean, plain template."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from medtune.chat import build_prompt, encode_prompt, load_chat_model, run_chat
from medtune.config import FormatConfig
from medtune.errors import RunDirError
from tests.test_export import make_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def scripted(lines: list[str]):
    """An input_fn that replays `lines`, then raises EOFError like input() at end of stdin."""
    pending = iter(lines)
    asked: list[str] = []

    def input_fn(prompt: str) -> str:
        asked.append(prompt)
        try:
            return next(pending)
        except StopIteration:
            raise EOFError from None

    return input_fn, pending


def test_scripted_session_on_a_run_dir_with_reset_and_quit(tmp_path, tiny_llama_dir):
    run = make_run(tmp_path, tiny_llama_dir)
    input_fn, pending = scripted(
        [
            "What causes fever?",
            "환자가 두통을 호소합니다. 원인은?",
            "/reset",
            "",
            "Hello again",
            "/quit",
            "unread",
        ]
    )
    buffer = io.StringIO()
    turns = run_chat(run, max_new_tokens=6, input_fn=input_fn, output=Console(file=buffer, width=200))
    assert [t["user"] for t in turns] == [
        "What causes fever?",
        "환자가 두통을 호소합니다. 원인은?",
        "Hello again",
    ]
    assert all(t["reply"] for t in turns)
    # the second turn sees the first exchange; after /reset the history is gone
    assert [t["context_messages"] for t in turns] == [0, 2, 0]
    assert list(pending) == ["unread"]  # /quit stopped reading
    shown = buffer.getvalue()
    assert "conversation cleared" in shown and turns[0]["reply"][:3] in shown  # replies were streamed


def test_plain_template_and_end_of_input(tmp_path):
    from medtune.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "plain", "gemma3", chat_template=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The plain template training used (`render_prompt` of an instruction record), not "User: ...":
    # chat used to talk to plain-template models in a format they never saw.
    assert (
        build_prompt(tok, [{"role": "user", "content": "안녕하세요"}], FormatConfig())
        == "안녕하세요\n\n답변:"
    )
    two = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        *[{"role": "user", "content": "Fever?"}],
    ]
    assert build_prompt(tok, two, FormatConfig()) == "Hi\n\nResponse: Hello.\n\nFever?\n\nResponse:"
    input_fn, _ = scripted(["안녕하세요, 열이 나요."])
    turns = run_chat(model_dir, max_new_tokens=5, input_fn=input_fn, output=Console(file=io.StringIO()))
    assert len(turns) == 1 and turns[0]["reply"]


def _record(kind: str) -> dict:
    return {
        "id": "x", "kind": kind, "language": "ko", "source": "s", "subject": None, "context": None,
        "question": "두통이 3일째 계속됩니다. 어떻게 해야 하나요?", "prompt": "두통이 3일째 계속됩니다.",
        "options": ["휴식", "진통제", "응급실"], "answer": "B", "response": "병원에 가세요.",
        "explanation": None,
    }  # fmt: skip


@pytest.mark.parametrize("chat_template", [True, False])
def test_train_eval_and_chat_see_the_same_prompt_tokens(tmp_path, chat_template: bool):
    """One record through the training path, the evaluation paths and chat: the same prompt ids.

    Chat turns are instructions (a user types a message), scored as such by held-out NLL; exam items
    are MCQA records, scored by letter."""
    from transformers import AutoTokenizer

    from medtune.evaluate.prompts import build_items
    from medtune.format import encode_prompt as train_prompt_ids
    from medtune.format import encode_prompts, render_prompt, tokenize_example
    from medtune.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m", "llama", chat_template=chat_template)
    tok, cfg = AutoTokenizer.from_pretrained(model_dir), FormatConfig()
    instruction, mcqa = _record("instruction"), _record("mcqa")
    train = train_prompt_ids(render_prompt(instruction, tok, cfg), tok)
    chat = encode_prompt(tok, [{"role": "user", "content": instruction["prompt"]}], cfg, 4096)
    nll = tokenize_example(instruction, tok, cfg)["input_ids"][: len(train)]  # evaluate/nll.py's path
    assert chat[0].tolist() == train == nll
    (item,) = build_items([mcqa], tok, cfg)
    assert encode_prompts([item["prompt"]], tok)[0] == train_prompt_ids(render_prompt(mcqa, tok, cfg), tok)


def test_chat_template_prompt_ends_where_the_assistant_speaks(tiny_llama_dir, tiny_gemma_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "두통"},
    ]
    llama = build_prompt(AutoTokenizer.from_pretrained(tiny_llama_dir), messages, FormatConfig())
    gemma = build_prompt(AutoTokenizer.from_pretrained(tiny_gemma_dir), messages, FormatConfig())
    assert llama.endswith("두통<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (
        gemma.endswith("두통<end_of_turn>\n<start_of_turn>model\n") and "<start_of_turn>model\nHello" in gemma
    )


def test_not_a_model_or_run_dir(tmp_path: Path):
    with pytest.raises(RunDirError, match="not a run directory"):
        run_chat(tmp_path, input_fn=lambda _: "/quit")


@pytest.mark.parametrize("layout", ["packing section (older exports)", "format section"])
def test_exported_model_chats_in_the_format_its_run_recorded(tmp_path: Path, layout: str) -> None:
    """export.json's `prompt_format` holds the whole packing section in older exports and the format
    section since: either way chat renders with the recorded template, not the default."""
    from medtune.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "merged", "llama")  # has a chat template: auto would use it
    recorded = {
        "template": "plain",
        "prompt_language": "en",
        "train_on_prompt": False,
        "include_explanation": True,
    }
    if layout.startswith("packing"):
        recorded |= {"mode": "packed", "max_seq_len": 512, "padding": "longest", "overlong": "truncate"}
    (model_dir / "export.json").write_text(json.dumps({"format": "merged", "prompt_format": recorded}))
    _, tok, fmt = load_chat_model(model_dir)
    assert fmt == FormatConfig(template="plain", prompt_language="en")
    assert build_prompt(tok, [{"role": "user", "content": "두통"}], fmt) == "두통\n\nResponse:"


def test_chat_dtype_follows_the_device(monkeypatch) -> None:
    import torch

    from medtune.chat import chat_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert chat_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert chat_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert chat_dtype() == torch.float16
