"""The CUDA allocator default: expandable segments unless the user configured the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medtune.cuda_alloc import ALLOC_ENVS, DEFAULT, default_cuda_allocator


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ALLOC_ENVS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_default_is_expandable_segments(clean_env: pytest.MonkeyPatch) -> None:
    default_cuda_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == DEFAULT == "expandable_segments:True"


@pytest.mark.parametrize("name", ALLOC_ENVS)
def test_a_user_setting_under_either_name_wins(clean_env: pytest.MonkeyPatch, name: str) -> None:
    clean_env.setenv(name, "max_split_size_mb:128")
    default_cuda_allocator()
    assert os.environ[name] == "max_split_size_mb:128"
    assert all(os.environ.get(other) is None for other in ALLOC_ENVS if other != name)


def test_the_cli_sets_it_before_torch_is_imported() -> None:
    """torch reads the variable at CUDA's first use; the CLI module sets it at import."""
    env = {k: v for k, v in os.environ.items() if k not in ALLOC_ENVS}
    code = "import sys, medtune.cli, os; print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == DEFAULT
