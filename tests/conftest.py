"""Shared fixtures: tiny random models written as ordinary model directories, once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from medtune.data.schema import Record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
REQUIRE_REAL = "MEDTUNE_REQUIRE_REAL"


def stand_in_model_dir(path: Path) -> Path:
    """A folder that passes the config's `model.path` check, for tests whose stages never load it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    return path


def skip_unless_required(reason: str) -> None:
    """Skip a test whose real resource (a fetched model, a browser) is absent, unless CI requires it.

    `.ci/run` sets MEDTUNE_REQUIRE_REAL=1 after fetching the models and installing Chromium, so a
    missing resource there fails the run instead of quietly skipping the tests that meet real parts.
    """
    if os.environ.get(REQUIRE_REAL):
        pytest.fail(f"{reason} ({REQUIRE_REAL} is set: CI must run this test)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Tests call `medtune.cli.main` in this process, which sets MEDTUNE_DEBUG, PYTHONWARNINGS and
    TQDM_DISABLE for its child processes: undo that, so no test inherits another's settings."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medtune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medtune.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma"), "gemma3")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP spin-waiting across threads
    costs 10x. A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dims(
    vocab: int = 512, hidden: int = 64, inner: int = 128, layers: int = 2, heads: int = 4, kv: int = 2
) -> dict[str, int]:
    """The sizes of a tiny test transformer, under transformers' config names (`inner`: the MLP's)."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return dict(zip([*names, "num_key_value_heads"], (vocab, hidden, inner, layers, heads, kv), strict=True))


def validated_record(**fields: Any) -> Record:
    """A record through the real `build_record`, with a source, split, id and provenance filled in."""
    from medtune.data.validate import build_record

    defaults = {"source": "s", "split": "train", "row_id": "1", "provenance": {"file": "f", "line": 1}}
    return build_record(**{**defaults, **fields})


def mcqa_record(i: int, **fields: Any) -> dict[str, Any]:
    """Item `i` as prepare writes an MCQA record to eval.jsonl; `fields` replace the defaults."""
    return {
        "id": f"q{i}",
        "source": "quiz",
        "split": "eval",
        "kind": "mcqa",
        "language": "en",
        "subject": None,
        "tags": [],
        "question": f"question {i}?",
        "options": ["aspirin", "insulin", "rest", "fluids"],
        "answer": "ABCD"[i % 4],
        "explanation": None,
        "context": None,
        "prompt": None,
        "response": None,
        "provenance": {"file": "x", "line": i + 1},
        **fields,
    }
