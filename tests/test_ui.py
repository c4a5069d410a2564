"""The dashboard over HTTP (no browser): run listing, safety refusals, config checking at the key."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient

from medtune.ui.app import Settings, create_app
from tests.conftest import EXAMPLES, stand_in_model_dir

LOCAL = "http://127.0.0.1"


def write_run(run_dir: Path, stages: tuple[str, ...] = ("prepare",), steps: int = 3, total: int = 10) -> Path:
    """A run folder as the pipeline leaves it: finished stages' run.json, a manifest, metrics rows."""
    config = {"seed": 0, "train": {"max_steps": total}}
    for i, stage in enumerate(stages):
        (run_dir / stage).mkdir(parents=True, exist_ok=True)
        record = {"stage": stage, "config_hash": "abc123", "config": config}
        record |= {"started_at": f"2026-01-01T00:0{i}:00Z", "finished_at": f"2026-01-01T00:0{i}:30Z"}
        (run_dir / stage / "run.json").write_text(json.dumps(record))
    prepare = run_dir / "prepare"
    prepare.mkdir(parents=True, exist_ok=True)
    source = {"records_in": 12, "kept": 9, "quarantined": 2, "deduplicated": 1, "contaminated_removed": 0}
    manifest = {
        "sources": {"train/medqa": source | {"languages": {"en": 9}}},
        "mix": {"by": "examples", "target_share": {"en": 1.0}, "achieved_share": {"en": 1.0}},
    }
    (prepare / "manifest.json").write_text(json.dumps(manifest))
    rejected = {"role": "train", "source": "medqa", "file": "medqa.jsonl", "line": 7, "reason": "no answer"}
    (prepare / "quarantine.jsonl").write_text(json.dumps(rejected) + "\n")
    (run_dir / "train").mkdir(exist_ok=True)
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3, "step_seconds": 2.0} for s in range(1, steps + 1)]
    (run_dir / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    runs, configs = tmp_path / "runs", tmp_path / "configs"
    runs.mkdir()
    configs.mkdir()
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
    for source in [*body["data"]["train"], *body["data"]["eval"]]:
        source["path"] = str(EXAMPLES / source["path"])
    body["model"]["path"] = str(stand_in_model_dir(tmp_path / "model"))
    (configs / "quick.yaml").write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return runs, configs


def client(dirs: tuple[Path, Path], token: str | None = None, base_url: str = LOCAL) -> TestClient:
    return TestClient(create_app(Settings(dirs[0], dirs[1], token)), base_url=base_url)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_runs_page_lists_each_run_with_stage_status_progress_and_loss(dirs: tuple[Path, Path]) -> None:
    write_run(dirs[0] / "alpha", ("prepare",), steps=4, total=10)
    write_run(dirs[0] / "beta", ("prepare", "train", "eval", "report"), steps=10, total=10)
    (dirs[0] / "not-a-run").mkdir()
    page = client(dirs).get("/").text
    rows = dict(re.findall(r'<tr data-run="([^"]+)">(.*?)</tr>', page, re.S))
    assert sorted(rows) == ["alpha", "beta"]
    assert "<td>train</td>" in rows["alpha"] and ">stopped<" in rows["alpha"]
    assert "step 4/10" in rows["alpha"] and "2.6" in rows["alpha"] and "abc123" in rows["alpha"]
    assert ">done<" in rows["beta"] and "100%" in rows["beta"]


def test_run_page_shows_manifest_tables_and_quarantine_rows(dirs: tuple[Path, Path]) -> None:
    write_run(dirs[0] / "alpha")
    http = client(dirs)
    page = http.get("/runs/alpha").text
    assert re.search(r"<td>train/medqa</td><td>12</td><td>9</td>", page)
    quarantine = http.get("/runs/alpha/quarantine").text
    assert "<td><code>medqa.jsonl</code></td><td>7</td><td>no answer</td>" in quarantine
    rows = http.get("/api/runs/alpha/metrics?after=1").json()["rows"]
    assert [r["step"] for r in rows] == [2, 3]


def test_run_page_shows_eval_tables_with_cis_and_held_out_nll(dirs: tuple[Path, Path]) -> None:
    run = write_run(dirs[0] / "alpha", ("prepare", "train", "eval"))
    group = {
        "n": 40,
        "accuracy": 0.25,
        "wilson_95": [0.14, 0.4],
        "bootstrap_95": [0.125, 0.4],
        "unscorable": 0,
    }
    nll_group = {"n": 40, "nll": 2.5, "ci95": [2.25, 2.75]}
    metrics = {
        "mode": "letter",
        "k_shot": 0,
        "n_items": 40,
        "models": {"base": {"groups": {"language=ko": group}}, "tuned": {"groups": {"language=ko": group}}},
        "compare": {
            "language=ko": {
                "delta_pp": -5.0,
                "ci95_pp": [-12.5, 2.5],
                "mcnemar_p": 0.0312,
                "significant": True,
            }
        },
        "nll": {
            "base": {"language=ko": nll_group},
            "tuned": {"language=ko": nll_group | {"nll": 2.0}},
            "tuned_vs_base": {"language=ko": {"delta": -0.5, "ci95": [-0.75, -0.25], "significant": True}},
        },
    }
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    page = client(dirs).get("/runs/alpha").text
    assert "<td>language=ko</td><td>40</td><td>25.0</td>\n<td>[14.0, 40.0]</td>" in page
    assert "<td>-5.0</td><td>[-12.5, +2.5]</td>\n<td>0.0312</td>" in page
    assert (
        "<td>2.500 [2.250, 2.750]</td><td>2.000 [2.250, 2.750]</td><td>-0.500 [-0.750, -0.250]</td>" in page
    )


@pytest.mark.parametrize(
    "path", ["/files/alpha/../../configs/quick.yaml", "/files/alpha/%2e%2e/%2e%2e/configs/quick.yaml"]
)
def test_files_outside_the_runs_folder_are_refused(dirs: tuple[Path, Path], path: str) -> None:
    write_run(dirs[0] / "alpha")
    http = client(dirs)
    assert http.get("/files/alpha/prepare/manifest.json").status_code == 200
    response = http.get(path)
    assert response.status_code in (403, 404) and "seed" not in response.text


def test_symlink_out_of_the_runs_folder_is_refused(dirs: tuple[Path, Path]) -> None:
    run = write_run(dirs[0] / "alpha")
    (run / "leak").symlink_to(dirs[1] / "quick.yaml")
    assert client(dirs).get("/files/alpha/leak").status_code == 403


def test_a_non_local_bind_requires_the_token_on_every_request(dirs: tuple[Path, Path]) -> None:
    write_run(dirs[0] / "alpha")
    http = client(dirs, token="s3cret", base_url="http://10.0.0.5")
    assert http.get("/").status_code == 401
    assert http.get("/runs/alpha", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert http.get("/?token=s3cret").status_code == 200  # redirected, then the cookie carries it
    assert http.get("/runs/alpha").status_code == 200


def test_a_local_bind_refuses_foreign_host_names(dirs: tuple[Path, Path]) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 must not reach the dashboard."""
    assert client(dirs, base_url="http://evil.example").get("/").status_code == 403


def test_posts_without_the_csrf_token_are_refused(dirs: tuple[Path, Path]) -> None:
    http = client(dirs)
    text = (dirs[1] / "quick.yaml").read_text()
    form = {"config": "quick.yaml", "text": text, "name": "r1", "action": "validate"}
    assert http.post("/launch", data=form).status_code == 403
    assert http.post("/launch", data=form | {"csrf": "forged"}).status_code == 403
    token = csrf_of(http.get("/launch").text)
    assert http.post("/launch", data=form | {"csrf": token}).status_code == 200


@pytest.mark.parametrize("chosen", ["../outside.yaml", "/etc/passwd", "sub/../../outside.yaml"])
def test_configs_outside_the_allowed_folder_are_refused(dirs: tuple[Path, Path], chosen: str) -> None:
    outside = dirs[1].parent / "outside.yaml"
    outside.write_text((dirs[1] / "quick.yaml").read_text())
    http = client(dirs)
    token = csrf_of(http.get("/launch").text)
    form = {"config": chosen, "text": outside.read_text(), "name": "r1", "action": "start", "csrf": token}
    assert http.post("/launch", data=form).status_code == 403
    assert http.get("/launch", params={"config": chosen}).status_code in (403, 404)
    assert not (dirs[0] / "r1").exists()


def test_a_config_error_is_shown_under_its_key(dirs: tuple[Path, Path]) -> None:
    http = client(dirs)
    text = (dirs[1] / "quick.yaml").read_text().replace("lr: 0.001", "lr: fast")
    assert "lr: fast" in text
    token = csrf_of(http.get("/launch").text)
    form = {"config": "quick.yaml", "text": text, "name": "", "action": "validate", "csrf": token}
    response = http.post("/launch", data=form)
    assert response.status_code == 422
    # the message sits right after the line of the offending key, not just somewhere on the page
    bad = re.search(
        r'<div class="line bad"><span class="n">(\d+)</span><code>([^<]*)</code></div>\s*'
        r'<div class="note" data-key="([^"]+)">',
        response.text,
    )
    assert bad is not None and bad.group(3) == "train.lr" and bad.group(2).strip() == "lr: fast"
    assert text.splitlines()[int(bad.group(1)) - 1].strip() == "lr: fast"
    assert not list(dirs[1].glob(".*check*"))  # the scratch copy is gone


def test_runs_and_configs_are_read_by_name_only(dirs: tuple[Path, Path]) -> None:
    http = client(dirs)
    assert http.get("/runs/%2e%2e").status_code == 404
    assert http.get("/runs/%2e%2e%2fconfigs").status_code == 404


def test_compare_shows_a_sweep_cell_by_cell_against_the_base(dirs: tuple[Path, Path]) -> None:
    sweep = dirs[0] / "mix-sweep"
    cells = []
    for label, delta in (("ko:en=1:0", -7.5), ("ko:en=1:1", 2.5)):
        name = f"{label.replace(':', '').replace('=', '-')}-s0"
        (sweep / "cells" / name / "eval").mkdir(parents=True)
        group = {"delta_pp": delta, "ci95_pp": [delta - 5, delta + 5], "mcnemar_p": 0.04, "significant": True}
        compare = {"groups": {"language=en": group}}
        (sweep / "cells" / name / "eval" / "compare.json").write_text(json.dumps(compare))
        cells.append(
            {"ratio_label": label, "seed": 0, "status": "ok", "compare": f"cells/{name}/eval/compare.json"}
        )
    (dirs[1] / "leak.json").write_text(json.dumps(compare))  # outside the sweep: must not be read
    cells.append({"ratio_label": "evil", "seed": 0, "status": "ok", "compare": "../../configs/leak.json"})
    (sweep / "sweep.json").write_text(json.dumps({"cells": cells}))
    (sweep / "report").mkdir()
    http = client(dirs)
    assert 'data-run="mix-sweep"' not in http.get("/").text  # a sweep is not listed as a run
    page = http.get("/compare", params={"sweep": "mix-sweep"}).text
    row = re.search(r"<tr><td>language=en</td>(.*?)</tr>", page, re.S).group(1)
    assert "<b>-7.5</b> [-12.5, -2.5]" in row and "<b>+2.5</b> [-2.5, +7.5]" in row
    assert row.count("<td") == 3 and row.endswith(">—</td>")  # the cell pointing outside reads nothing


@pytest.mark.slow
def test_a_launched_run_that_errors_is_failed_with_its_log(dirs: tuple[Path, Path]) -> None:
    """Start from the Launch page: `medtune run` in a subprocess; the stand-in model makes it exit 2."""
    http = client(dirs)
    token = csrf_of(http.get("/launch").text)
    text = (dirs[1] / "quick.yaml").read_text()
    form = {"config": "quick.yaml", "text": text, "name": "r1", "action": "start", "csrf": token}
    response = http.post("/launch", data=form, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/runs/r1"
    exit_file = dirs[0] / "r1" / "ui" / "exit.json"
    deadline = time.monotonic() + 120
    while not exit_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(exit_file.read_text())["returncode"] == 2
    page = http.get("/runs/r1").text
    assert '<span class="status failed" id="status">failed</span>' in page
    assert "error:" in page and "output.dir=" in page  # the log's command line and error
    assert http.post("/runs/r1/stop", data={"csrf": token}).status_code == 409  # not running
