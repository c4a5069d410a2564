"""`medtune chat` driven by a scripted input_fn: replies, /reset, /quit, Korean, plain template."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from medtune.chat import build_prompt, run_chat
from medtune.errors import RunDirError
from tests.test_export import make_run


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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

    prompt = build_prompt(
        AutoTokenizer.from_pretrained(model_dir), [{"role": "user", "content": "안녕하세요"}]
    )
    assert prompt == "User: 안녕하세요\nAssistant:"
    input_fn, _ = scripted(["안녕하세요, 열이 나요."])
    turns = run_chat(model_dir, max_new_tokens=5, input_fn=input_fn, output=Console(file=io.StringIO()))
    assert len(turns) == 1 and turns[0]["reply"] and "\nUser:" not in turns[0]["reply"]


def test_chat_template_prompt_ends_where_the_assistant_speaks(tiny_llama_dir, tiny_gemma_dir):
    from transformers import AutoTokenizer

    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "두통"},
    ]
    llama = build_prompt(AutoTokenizer.from_pretrained(tiny_llama_dir), messages)
    gemma = build_prompt(AutoTokenizer.from_pretrained(tiny_gemma_dir), messages)
    assert llama.endswith("두통<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert (
        gemma.endswith("두통<end_of_turn>\n<start_of_turn>model\n") and "<start_of_turn>model\nHello" in gemma
    )


def test_not_a_model_or_run_dir(tmp_path: Path):
    with pytest.raises(RunDirError, match="not a run directory"):
        run_chat(tmp_path, input_fn=lambda _: "/quit")
