"""The report renders from stage outputs alone: every image and link resolves, charts are real PNGs,
non-significant deltas are marked in words, and a sweep dir gets per-cell tables."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from medtune.report.build import run_report
from medtune.report.inputs import delta_rows, model_groups
from tests.conftest import skip_unless_required

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(k: int, n: int) -> dict:
    acc = k / n
    return {
        "n": n,
        "correct": k,
        "accuracy": acc,
        "wilson_95": [max(0.0, acc - 0.1), min(1.0, acc + 0.1)],
        "bootstrap_95": [max(0.0, acc - 0.09), min(1.0, acc + 0.09)],
        "unscorable": 0,
        "unanswered": 0,
    }


def _metrics(shift: int) -> dict:
    groups = {
        "all": _summary(50 + shift, 120),
        "language=ko": _summary(20 + shift, 60),
        "language=en": _summary(30, 60),
        "source=kormedmcqa": _summary(20 + shift, 60),
        "source=medqa": _summary(30, 60),
        "subject=doctor": _summary(11, 30),
        "subject=nurse": _summary(9 + shift, 30),
    }
    return {"groups": groups, "macro": {"language": 0.4}}


def _compare() -> dict:
    return {
        "groups": {
            "all": {
                "n": 120,
                "delta_pp": 8.3,
                "ci95_pp": [2.1, 14.0],
                "mcnemar_p": 0.004,
                "significant": True,
            },
            "language=ko": {
                "n": 60,
                "delta_pp": 16.7,
                "ci95_pp": [5.0, 28.0],
                "mcnemar_p": 0.01,
                "significant": True,
            },
            "language=en": {
                "n": 60,
                "delta_pp": 1.7,
                "ci95_pp": [-6.0, 9.0],
                "mcnemar_p": 0.81,
                "significant": False,
            },
        }
    }


def _write(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def make_run_dir(root: Path, seed: int = 0, with_base: bool = True) -> Path:
    """A schema-correct run dir written by hand (no stage runs)."""
    config = {
        "seed": seed,
        "model": {"path": "/models/tiny"},
        "quantization": {"mode": "nf4"},
        "packing": {"mode": "packed", "max_seq_len": 512},
        "data": {"mix": {"ratio": {"ko": 1, "en": 1}}},
    }
    for stage in ("prepare", "train", "eval"):
        _write(
            root / stage / "run.json",
            {
                "stage": stage,
                "config_hash": "abc",
                "seed": seed,
                "config": config,
                "seconds": 1.0,
                "results": {},
            },
        )
    _write(
        root / "prepare" / "manifest.json",
        {
            "stage": "prepare",
            "seed": seed,
            "sources": {
                "kormedmcqa": {
                    "records_in": 100,
                    "quarantined": 2,
                    "deduplicated": 3,
                    "contaminated_removed": 1,
                    "kept": 94,
                    "mixed": 60,
                    "languages": {"ko": 94},
                    "pii": {"phone": 2},
                }
            },
            "totals": {"records_in": 100, "train_records": 120, "eval_records": 120, "pii": {"phone": 2}},
            "mix": {
                "by": "examples",
                "ratio": {"ko": 1, "en": 1},
                "target_share": {"ko": 0.5, "en": 0.5},
                "achieved_share": {"ko": 0.5, "en": 0.5},
                "weight_per_language": {"ko": 60, "en": 60},
            },
            "files": {"train.jsonl": {"sha256": "x"}},
        },
    )
    rows = [
        {
            "step": s,
            "epoch": 0,
            "loss": 3.0 / s,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "target_tokens": 100,
            "real_tokens": 400,
            "slots": 512,
            "real_token_fraction": 400 / 512,
            "tokens_per_s": 1000.0 + s,
            "step_seconds": 0.4,
            "peak_memory_bytes": 2**28,
        }
        for s in range(1, 11)
    ]
    (root / "train" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
    )
    metrics = {"mode": "letter", "n_items": 120, "models": {"tuned": _metrics(10)}}
    if with_base:
        metrics["models"] = {"base": _metrics(0), **metrics["models"]}
        _write(root / "eval" / "compare.json", _compare())
        (root / "eval" / "base").mkdir(parents=True, exist_ok=True)
        (root / "eval" / "base" / "predictions.jsonl").write_text("{}\n", encoding="utf-8")
    _write(root / "eval" / "metrics.json", metrics)
    return root


def _nll_metrics() -> dict:
    """metrics.json["nll"] as `eval.nll: true` writes it: per model per group, then tuned - base."""

    def table(shift: float) -> dict:
        return {
            "all": {"n": 80, "tokens": 9000, "nll": 2.9 + shift, "ci95": [2.8 + shift, 3.0 + shift]},
            "language=ko": {"n": 40, "tokens": 5000, "nll": 3.2 + shift, "ci95": [3.1 + shift, 3.3 + shift]},
        }

    pair = {"n": 40, "a": 3.2, "b": 3.1, "b_lower_share": 0.9}
    return {
        "base": table(0.0),
        "tuned": table(-0.1),
        "tuned_vs_base": {
            "all": {**pair, "delta": -0.004, "ci95": [-0.01, 0.002], "significant": False},
            "language=ko": {**pair, "delta": -0.121, "ci95": [-0.179, -0.078], "significant": True},
        },
    }


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"] or "")
        elif tag == "a":
            self.links.append(a["href"] or "")


def _check_refs(report_dir: Path) -> _Refs:
    refs = _Refs()
    refs.feed((report_dir / "report.html").read_text(encoding="utf-8"))
    for src in refs.imgs:
        if src.startswith("data:image/png;base64,"):
            data = base64.b64decode(src.split(",", 1)[1])
        else:
            path = report_dir / unquote(src)
            assert path.is_file(), f"<img src={src}> does not resolve"
            data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), f"{src} is not a PNG"
        assert len(data) > 2000, f"{src} is suspiciously small"
    for href in refs.links:
        assert (report_dir / unquote(href)).is_file(), f"<a href={href}> does not resolve"
    return refs


def test_run_report_renders_with_resolving_images_and_links(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    out = run_report(run, run / "report")
    refs = _check_refs(out)
    assert len(refs.imgs) >= 3  # accuracy by language, subject and source, plus loss
    assert any("loss" in s for s in refs.imgs)
    assert any(h.endswith("compare.json") for h in refs.links)
    page = (out / "report.html").read_text(encoding="utf-8")
    md = (out / "report.md").read_text(encoding="utf-8")
    # The en delta (p = 0.81) is marked in words in both formats, and the significant ones are not.
    en_row = next(r for r in re.findall(r"<tr[^>]*>.*?</tr>", page) if "language=en" in r and "0.81" in r)
    assert "not significant" in en_row and 'class="ns"' in en_row
    ko_row = next(r for r in re.findall(r"<tr[^>]*>.*?</tr>", page) if "language=ko" in r and "0.01" in r)
    assert "not significant" not in ko_row
    assert re.search(r"\| language=en \| \+1\.7 \|.*not significant", md)
    # Numbers come from the files, not recomputed: tuned all = 60/120, base ko = 20/60.
    assert "50.0%" in page and "33.3%" in page
    assert "+8.3" in page and "[+2.1, +14.0]" in page


def test_heldout_nll_section_only_when_scored(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    page = (run_report(run, run / "report") / "report.html").read_text(encoding="utf-8")
    assert "Held-out NLL" not in page
    metrics = json.loads((run / "eval" / "metrics.json").read_text(encoding="utf-8"))
    _write(run / "eval" / "metrics.json", {**metrics, "nll": _nll_metrics()})
    out = run_report(run, run / "report")
    page = (out / "report.html").read_text(encoding="utf-8")
    rows = re.findall(r"<tr[^>]*>.*?</tr>", page)
    assert "Held-out NLL" in page
    ko = next(r for r in rows if "3.100 [3.000, 3.200]" in r)
    assert "-0.121 [-0.179, -0.078]" in ko and 'class="ns"' not in ko
    everything = next(r for r in rows if "-0.004" in r)
    assert "n.s." in everything and 'class="ns"' in everything
    assert (
        "| language=ko | 40 | 3.200 [3.100, 3.300] | 3.100 [3.000, 3.200] |"
        in (out / "report.md").read_text()
    )


def test_missing_stage_files_are_noted_not_invented(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run", with_base=False)
    (run / "train" / "metrics.jsonl").unlink()
    out = run_report(run, tmp_path / "elsewhere" / "report")  # links must resolve from another folder too
    _check_refs(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "No paired comparison" in page and "No training log" in page
    assert "significant" not in page.replace("not significant", "").replace("called significant", "")


def test_sweep_report_has_every_cell_and_the_shared_base(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    make_run_dir(sweep / "base")
    cells = []
    for ratio, label in (({"ko": 1.0, "en": 0.0}, "ko1-en0"), ({"ko": 1.0, "en": 1.0}, "ko1-en1")):
        for seed in (1, 2):
            name = f"{label}_seed{seed}"
            make_run_dir(sweep / "cells" / name, seed=seed)
            cells.append(
                {
                    "name": name,
                    "ratio": ratio,
                    "ratio_label": label,
                    "seed": seed,
                    "dir": f"cells/{name}",
                    "status": "ok",
                    "error": None,
                }
            )
    cells.append(
        {
            "name": "ko3-en10_seed1",
            "ratio": {"ko": 3.0, "en": 10.0},
            "ratio_label": "ko3-en10",
            "seed": 1,
            "dir": "cells/ko3-en10_seed1",
            "status": "failed",
            "error": "RuntimeError: boom",
        }
    )
    _write(sweep / "sweep.json", {"seeds": [1, 2], "base": {"dir": "base"}, "cells": cells})
    out = run_report(sweep, sweep / "report")
    _check_refs(out)
    page = (out / "report.html").read_text(encoding="utf-8")
    for c in cells:
        assert c["name"] in page
    assert "RuntimeError: boom" in page
    assert "Mean over seeds per ratio" in page and "not significant" in page


def test_readers_accept_list_shaped_groups() -> None:
    metrics = {"base": {"groups": [{"group": "all", **_summary(3, 4)}]}}
    assert model_groups(metrics)["base"]["all"]["accuracy"] == 0.75
    rows = delta_rows({"groups": [{"group": "all", "delta": 0.05, "mcnemar_p": 0.5}]})
    assert rows[0]["delta_pp"] == pytest.approx(5.0) and rows[0]["significant"] is False


def test_report_is_deterministic(tmp_path: Path) -> None:
    run = make_run_dir(tmp_path / "run")
    a = run_report(run, tmp_path / "a")
    b = run_report(run, tmp_path / "b")
    for f in sorted(p.name for p in a.iterdir()):
        if f.endswith(".png") or f == "report.md":
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_screenshot_in_headless_chromium(tmp_path: Path) -> None:
    if _chromium() is None:
        skip_unless_required("no chromium on PATH (apt-get install -y chromium)")
    run = make_run_dir(tmp_path / "run")
    out = run_report(run, run / "report")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,2000",
            (out / "report.html").resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a rendered page, not a blank one
