"""The token store: the same ids and labels as `tokenize_example`, the same bytes on every build,
rebuilt (with a message) when an input changes, reused on resume, and the same batches in training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.config import FormatConfig, ModelConfig, PackingConfig, SourceConfig, load_config
from medtune.data import token_store
from medtune.data.read import iter_source
from medtune.data.token_store import (
    TokenStore,
    build_token_store,
    ensure_token_store,
    open_token_store,
    store_inputs,
    store_path,
    train_sha256,
    training_examples,
)
from medtune.errors import ModelError
from medtune.format import IGNORE_INDEX, tokenize_example
from medtune.model.load import load_tokenizer
from medtune.packing import build_rows, collate
from medtune.train import run_train
from tests.conftest import EXAMPLES
from tests.test_train import make_run, metrics

SOURCES = [
    ("kormedmcqa", "kormedmcqa", "train"),
    ("medqa/train.jsonl", "medqa", None),
    ("genmedgpt/GenMedGPT-5k-ko.csv", "genmedgpt", None),
    ("genmedgpt/chatdoctor5k.json", "genmedgpt", None),
]


@pytest.fixture(scope="module")
def bundled_records() -> list[dict]:
    """The quick-start's bundled Korean and English MCQA and instruction records, normalised."""
    records = []
    for path, fmt, split in SOURCES:
        src = SourceConfig(path=EXAMPLES / "data" / path, format=fmt, split=split)
        records += [r for r in iter_source(src, "train") if isinstance(r, dict)]
    return records


def write_prepared(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return folder


def build(prepare: Path, model_dir: Path, packing: FormatConfig, workers: int = 1) -> tuple[Path, bool]:
    model = ModelConfig(path=model_dir)
    return ensure_token_store(prepare, model, packing, store_inputs(prepare, model, packing), workers)


@pytest.mark.parametrize(
    "packing",
    [
        FormatConfig(),
        FormatConfig(train_on_prompt=True),
        FormatConfig(template="plain", include_explanation=False, prompt_language="en"),
    ],
    ids=["auto", "train_on_prompt", "plain"],
)
def test_the_store_holds_exactly_what_tokenize_example_gives(
    tmp_path: Path, tiny_llama_dir: Path, bundled_records: list[dict], packing: FormatConfig
) -> None:
    prepare = write_prepared(tmp_path / "prepare", bundled_records)
    path, built = build(prepare, tiny_llama_dir, packing)
    assert built
    examples, without_target = training_examples(open_token_store(path), packing.train_on_prompt)
    tokenizer = load_tokenizer(ModelConfig(path=tiny_llama_dir))
    expected = [tokenize_example(r, tokenizer, packing) for r in bundled_records]
    kept = [e for e in expected if any(label != IGNORE_INDEX for label in e["labels"])]
    assert without_target == len(expected) - len(kept)
    assert len(examples) == len(kept) == 900
    assert [examples[i] for i in range(len(examples))] == kept
    assert examples.lengths() == [len(e["input_ids"]) for e in kept]


def test_examples_without_a_target_are_left_out_and_counted() -> None:
    """Example 1's prompt fills it (prompt_tokens == length): no label unless the prompt is trained."""
    ids = np.arange(1, 10, dtype=np.int32)
    store = TokenStore(Path("."), ids, np.array([0, 4, 7, 9]), np.array([2, 3, 1], dtype=np.int32))
    examples, left_out = training_examples(store, train_on_prompt=False)
    assert left_out == 1 and len(examples) == 2
    assert examples[1] == {"input_ids": [8, 9], "labels": [9, IGNORE_INDEX]}
    examples, left_out = training_examples(store, train_on_prompt=True)
    assert left_out == 0 and examples[1] == {"input_ids": [5, 6, 7], "labels": [6, 7, IGNORE_INDEX]}


def test_a_parallel_build_writes_the_same_bytes_as_a_serial_one(
    tmp_path: Path, tiny_llama_dir: Path, bundled_records: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(token_store, "_CHUNK_BYTES", 32 << 10)  # several chunks for two workers
    prepare = write_prepared(tmp_path / "prepare", bundled_records)
    model, packing = ModelConfig(path=tiny_llama_dir), FormatConfig()
    inputs = store_inputs(prepare, model, packing)
    build_token_store(prepare, model, packing, inputs, tmp_path / "serial", workers=1)
    build_token_store(prepare, model, packing, inputs, tmp_path / "parallel", workers=2)
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert names == ["ids.bin", "meta.json", "offsets.npy", "prompt_tokens.npy"]
    assert len(token_store._chunks(prepare / "train.jsonl")) > 2
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes(), name
    meta = json.loads((tmp_path / "serial" / "meta.json").read_text())
    assert meta["examples"] == 900
    assert (tmp_path / "serial" / "ids.bin").stat().st_size == 4 * meta["tokens"]
    assert not list(tmp_path.glob(".tmp-*"))


def _edit_tokenizer(model_dir: Path) -> None:
    path = model_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["model_max_length"] = 12345  # changes the file, not the ids: still a new store
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("template", "changed: packing.template"),
        ("tokenizer", "changed: tokenizer_files.tokenizer_config.json"),
        ("data", "changed: train_jsonl_sha256"),
    ],
)
def test_a_changed_input_builds_a_new_store_and_says_why(
    tmp_path: Path,
    tiny_llama_dir: Path,
    bundled_records: list[dict],
    capsys: pytest.CaptureFixture[str],
    change: str,
    reason: str,
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    prepare = write_prepared(tmp_path / "prepare", bundled_records[:50])
    first, _ = build(prepare, model_dir, FormatConfig())
    _, built = build(prepare, model_dir, FormatConfig())
    assert not built and "reusing token store" in capsys.readouterr().out
    packing = FormatConfig()
    if change == "template":
        packing = FormatConfig(template="plain")
    elif change == "tokenizer":
        _edit_tokenizer(model_dir)
    else:
        write_prepared(prepare, bundled_records[:51])
    second, built = build(prepare, model_dir, packing)
    out = capsys.readouterr().out
    assert built and second != first
    assert "building token store" in out and reason in out, out


def test_settings_that_act_at_collation_share_one_store(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """max_seq_len, overlong, mode and train_on_prompt do not change the stored ids."""
    prepare = write_prepared(tmp_path / "prepare", [])
    model = ModelConfig(path=tiny_llama_dir)
    other = FormatConfig(train_on_prompt=True)  # packing's row settings never reach the store
    assert store_path(prepare, store_inputs(prepare, model, FormatConfig())) == store_path(
        prepare, store_inputs(prepare, model, other)
    )


def test_the_manifest_hash_is_used_only_while_the_file_size_matches(tmp_path: Path) -> None:
    prepare = write_prepared(tmp_path, [{"id": "a"}])
    size = (prepare / "train.jsonl").stat().st_size
    manifest = {"files": {"train.jsonl": {"sha256": "f" * 64, "bytes": size}}}
    (prepare / "manifest.json").write_text(json.dumps(manifest))
    assert train_sha256(prepare) == "f" * 64  # trusted: hashing a 1M-record file costs seconds
    write_prepared(tmp_path, [{"id": "ab"}])
    assert train_sha256(prepare) != "f" * 64


def test_batches_from_the_store_equal_those_from_tokenised_lists(
    tmp_path: Path, tiny_llama_dir: Path, bundled_records: list[dict]
) -> None:
    """What `train.loop.optimizer_step` collates, for two epochs of row plans: the same tensors as before."""
    packing, fmt = PackingConfig(max_seq_len=256), FormatConfig()
    prepare = write_prepared(tmp_path / "prepare", bundled_records)
    path, _ = build(prepare, tiny_llama_dir, fmt)
    stored, _ = training_examples(open_token_store(path), fmt.train_on_prompt)
    tokenizer = load_tokenizer(ModelConfig(path=tiny_llama_dir))
    lists = [tokenize_example(r, tokenizer, fmt) for r in bundled_records]
    lengths = [len(e["input_ids"]) for e in lists]
    assert stored.lengths() == lengths
    for epoch in range(2):
        plan = build_rows(stored.lengths(), packing, seed=3, epoch=epoch)
        assert plan == build_rows(lengths, packing, seed=3, epoch=epoch)
        for s in range(0, len(plan), 4):
            a, b = collate(stored, plan[s : s + 4], packing), collate(lists, plan[s : s + 4], packing)
            assert a["seq_lens"] == b["seq_lens"]
            for key in ("input_ids", "labels", "position_ids"):
                assert torch.equal(a[key], b[key]), (epoch, s, key)


def test_a_resumed_run_reuses_the_store(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_config(make_run(tmp_path, tiny_llama_dir, train={"max_steps": 2, "save_every": 1}))
    prepare, out = cfg.output.dir / "prepare", cfg.output.dir / "train"
    run_train(cfg, prepare, out)
    first = capsys.readouterr().out
    assert "building token store" in first and "(0 left out: no target token)" in first
    (store,) = (prepare / "tokens").iterdir()
    stamp = (store / "ids.bin").stat().st_mtime_ns
    losses = [r["loss"] for r in metrics(cfg.output.dir)]
    run_train(cfg, prepare, out, resume=True)
    again = capsys.readouterr().out
    assert f"reusing token store {store}" in again and "building" not in again
    assert (store / "ids.bin").stat().st_mtime_ns == stamp
    assert [r["loss"] for r in metrics(cfg.output.dir)] == losses


def test_a_worker_that_cannot_load_the_tokenizer_fails_the_build(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error, not a hang: multiprocessing restarts a pool initializer that raises, forever."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    (model_dir / "tokenizer.json").write_text("{not json")
    monkeypatch.setattr(token_store, "_CHUNK_BYTES", 16 << 10)
    prepare = write_prepared(tmp_path / "prepare", [{"id": str(i)} for i in range(4000)])
    with pytest.raises(ModelError, match="cannot load the tokenizer"):
        build(prepare, model_dir, FormatConfig(), workers=2)
    assert not list((prepare / "tokens").iterdir())  # no store, no temp folder
