"""The prepare stage end to end on the bundled samples: outputs, counts, determinism, mix, inspect."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medtune.config import validate_config
from medtune.data.inspect import run_inspect
from medtune.data.prepare import (
    OUTPUTS,
    read_prepared,
    run_prepare,
    source_table,
    training_text,
)
from medtune.data.schema import Record
from medtune.errors import DataError, RunDirError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def config(tmp: Path, seed: int = 0, model: Path | None = None, **data) -> object:
    raw = {
        "seed": seed,
        "model": {"path": str(model or EXAMPLES / "no-model")},  # same path: same config hash
        "data": {
            "train": [
                {"path": str(EXAMPLES / "kormedmcqa"), "split": "train"},
                {"path": str(EXAMPLES / "medqa" / "train.jsonl"), "name": "medqa"},
                {"path": str(EXAMPLES / "genmedgpt")},
            ],
            "eval": [
                {"path": str(EXAMPLES / "kormedmcqa"), "split": "valid", "name": "kormedmcqa_valid"},
                {"path": str(EXAMPLES / "medqa" / "dev.jsonl"), "name": "medqa_dev"},
            ],
            "mix": {"ratio": {"ko": 1, "en": 1}},
            **data,
        },
    }
    return validate_config(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("prep")
    return tmp / "out", run_prepare(config(tmp), tmp / "out")


def test_outputs_counts_and_hashes(prepared):
    out, manifest = prepared
    for name in [*OUTPUTS, "manifest.json"]:
        assert (out / name).is_file()
    for name, meta in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == meta["sha256"]
    for name, c in manifest["sources"].items():
        assert (
            c["records_in"] == c["kept"] + c["quarantined"] + c["deduplicated"] + c["contaminated_removed"]
        ), name
    train = list(read_prepared(out, "train"))
    assert len(train) == manifest["totals"]["train_records"] == manifest["files"]["train.jsonl"]["lines"]
    assert set(train[0]) == set(Record.__annotations__)
    assert sum(c["mixed"] for c in manifest["sources"].values()) == len(train)
    langs = [r["language"] for r in train]
    assert abs(langs.count("ko") / len(langs) - 0.5) <= 0.005
    assert manifest["mix"]["achieved_share"] == {"en": 0.5, "ko": 0.5}
    assert {r["split"] for r in read_prepared(out, "eval")} == {"valid", "dev"}
    assert len({r["id"] for r in train}) == len(train)
    with pytest.raises(RunDirError):
        next(read_prepared(out, "test"))


def test_same_seed_is_byte_identical_and_another_seed_changes_the_mix(tmp_path):
    mix = {"ratio": {"ko": 1, "en": 2}}  # 450 ko / 450 en candidates: ko must be sampled
    runs = {name: tmp_path / name for name in ("a", "b", "seed1")}
    for name, out in runs.items():
        run_prepare(config(tmp_path, seed=1 if name == "seed1" else 0, mix=mix), out)
    for name in [*OUTPUTS, "manifest.json"]:
        assert (runs["a"] / name).read_bytes() == (runs["b"] / name).read_bytes(), name
    assert (runs["a"] / "train.jsonl").read_bytes() != (runs["seed1"] / "train.jsonl").read_bytes()
    assert (runs["a"] / "eval.jsonl").read_bytes() == (runs["seed1"] / "eval.jsonl").read_bytes()


def test_contamination_pii_and_quarantine_reach_the_manifest(tmp_path):
    dev = [json.loads(x) for x in (EXAMPLES / "medqa" / "dev.jsonl").read_text().splitlines()[:3]]
    rows = [
        dict(dev[0], options={"A": "w", "B": "x", "C": "y", "D": "z"}, answer_idx="A"),  # leaked stem
        {
            "question": "Call 010-1234-5678 about the patient, MRN: 7654321?",
            "options": {"A": "a", "B": "b"},
            "answer_idx": "A",
        },
        {"question": "Broken row", "options": {"A": "a", "B": "b"}, "answer_idx": "F"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = {"path": str(path), "name": "mine", "format": "medqa"}
    cfg = config(tmp_path, mix={}, train=[source])
    manifest = run_prepare(cfg, tmp_path / "out")
    mine = manifest["sources"]["train/mine"]
    assert (mine["records_in"], mine["kept"], mine["quarantined"], mine["contaminated_removed"]) == (
        3,
        1,
        1,
        1,
    )
    assert mine["pii"] == {"MRN": 1, "PHONE": 1}
    assert manifest["contamination"]["per_eval_source"]["medqa_dev"]["train_records_overlapping"] == 1
    (kept,) = read_prepared(tmp_path / "out", "train")
    assert kept["question"] == "Call [PHONE] about the patient, MRN: [MRN]?"
    leak = json.loads((tmp_path / "out" / "contaminated.jsonl").read_text())
    assert leak["removed"] and leak["eval_ids"][0].startswith("medqa_dev:")
    reported = run_prepare(
        config(tmp_path, mix={}, train=[source], contamination={"action": "report"}), tmp_path / "out2"
    )
    assert reported["sources"]["train/mine"]["kept"] == 2


def test_mix_by_tokens_uses_the_model_tokenizer(tmp_path, tiny_llama_dir):
    from transformers import AutoTokenizer

    cfg = config(tmp_path, model=tiny_llama_dir, mix={"ratio": {"ko": 1, "en": 3}, "by": "tokens"})
    manifest = run_prepare(cfg, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    per = {"ko": 0, "en": 0}
    for r in read_prepared(tmp_path / "out", "train"):
        per[r["language"]] += len(tok(training_text(r), add_special_tokens=False)["input_ids"])
    assert abs(per["ko"] / sum(per.values()) - 0.25) <= 0.005
    assert manifest["mix"]["weight_per_language"] == per


def test_inspect_reports_every_source(prepared, tmp_path, tiny_llama_dir):
    out, manifest = prepared
    report = run_inspect(config(tmp_path, model=tiny_llama_dir), tmp_path / "inspect.json")
    assert report["length_unit"] == "tokens"
    assert json.loads((tmp_path / "inspect.json").read_text())["sources"] == report["sources"]
    assert report["train"]["kormedmcqa"]["languages"] == {
        "ko": manifest["sources"]["train/kormedmcqa"]["kept"]
    }
    assert report["train"]["kormedmcqa"]["length"]["n"] > 0


def test_eval_only_config_prepares_an_empty_train_set(tmp_path):
    cfg = validate_config(
        {
            "model": {"path": str(tmp_path)},
            "data": {
                "eval": [{"path": str(EXAMPLES / "medqa" / "dev.jsonl")}],
                "mix": {"ratio": {"ko": 1, "en": 1}},
            },
        }
    )
    manifest = run_prepare(cfg, tmp_path / "out")
    assert manifest["totals"]["train_records"] == 0 and manifest["totals"]["eval_records"] == 120
    assert list(read_prepared(tmp_path / "out", "train")) == []


def test_sources_with_one_default_name_are_told_apart_and_repeated_names_refused(tmp_path):
    """`ko/train.jsonl` and `en/train.jsonl` both default to the name `train`: without distinct names
    their ids and counts merge, and the second one's rows were quarantined as duplicate ids."""
    (tmp_path / "config.json").write_text("{}")  # model.path must look like a model folder
    for lang in ("ko", "en"):
        (tmp_path / lang).mkdir()
        (tmp_path / lang / "train.jsonl").write_text(
            json.dumps({"question": f"{lang} question one?", "options": ["a", "b"], "answer": 0}) + "\n"
        )
    sources = [{"path": str(tmp_path / lang / "train.jsonl")} for lang in ("ko", "en")]
    cfg = validate_config(
        {"model": {"path": str(tmp_path)}, "data": {"train": sources}, "output": {"dir": str(tmp_path / "r")}}
    )
    manifest = run_prepare(cfg, tmp_path / "r" / "prepare")
    assert manifest["totals"]["kept"] == 2 and manifest["totals"]["quarantined"] == 0
    assert {"train/train/ko/train", "train/train/en/train"} <= manifest["sources"].keys()
    for src in cfg.data.train:
        src.name = "mine"
    with pytest.raises(DataError, match=r"data.train\[0\] and data.train\[1\] are both named 'mine'"):
        run_prepare(cfg, tmp_path / "r" / "prepare")


def _broken_source(tmp: Path) -> dict:
    path = tmp / "broken.jsonl"
    # Objects, so the file as a whole is JSON lines, but no row is usable (a whole file of
    # non-JSON is one error naming the file, before any row is read).
    path.write_text('{"note": "no question here"}\n' * 3 + "{also not json\n", encoding="utf-8")
    return {"path": str(path), "format": "jsonl", "name": "broken"}


def test_a_source_that_keeps_nothing_is_named_on_stderr(tmp_path, capsys):
    medqa = {"path": str(EXAMPLES / "medqa" / "train.jsonl"), "name": "medqa"}
    cfg = config(tmp_path, train=[medqa, _broken_source(tmp_path)], mix={"ratio": None})
    manifest = run_prepare(cfg, tmp_path / "out")
    err = capsys.readouterr().err
    assert "warning: train source 'broken'" in err and str(tmp_path / "broken.jsonl") in err
    assert "0 of 4 records kept" in err and "'empty' x3, 'unparseable JSON' x1" in err
    assert manifest["sources"]["train/broken"]["quarantined"] == 4


def test_nothing_surviving_names_each_source_and_its_top_reasons(tmp_path):
    cfg = config(tmp_path, train=[_broken_source(tmp_path)])
    with pytest.raises(DataError) as error:
        run_prepare(cfg, tmp_path / "out")
    message = str(error.value)
    assert "broken" in message and str(tmp_path / "broken.jsonl") in message
    assert "4 read" in message and "'empty' x3, 'unparseable JSON' x1" in message


def test_source_table_rows_add_up(prepared):
    from rich.console import Console

    _, manifest = prepared
    console = Console(record=True, width=200)
    console.print(source_table(manifest))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    for key, c in manifest["sources"].items():
        row = next(line for line in rows if line.split("│")[1].strip() == key.split("/", 1)[1])
        cells = [cell.strip().replace(",", "") for cell in row.split("│")[3:-1]]
        assert [int(x) for x in cells[:5]] == [
            c["records_in"],
            c["kept"],
            c["quarantined"],
            c["deduplicated"],
            c["contaminated_removed"],
        ]
        assert int(cells[0]) == sum(int(x) for x in cells[1:5])
        assert cells[5] == (str(c["mixed"]) if c["role"] == "train" else "")
    total = next(line for line in rows if line.split("│")[1].strip() == "all")
    assert total.split("│")[-2].strip().replace(",", "") == str(manifest["totals"]["train_records"])
