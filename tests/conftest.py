"""Shared fixtures: tiny random models written as ordinary model directories, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
