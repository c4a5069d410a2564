"""The dashboard driven in headless Chromium: launch, live curve, stop, resume, report, compare.

Two small runs of the quick-start (a tiny random Llama, a few dozen examples, short sequences)
are started from the Launch page: one as it is, one from an edited copy. The test stops the first
mid-training from its page, resumes it, and compares the two once both have finished.
Set MEDTUNE_UI_SCREENSHOT=docs/ui.png to also save the Run page as the README's screenshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, skip_unless_required
from tests.test_multinode import free_port

RUN_WAIT_MS = 400_000  # a loaded 2-core machine; alone, a run takes about a minute


def browser_config(folder: Path, model_dir: Path) -> Path:
    """The quick-start, cut to a minute of CPU: few examples, short rows, one row per step."""
    body = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text(encoding="utf-8"))
    for source in [*body["data"]["train"], *body["data"]["eval"]]:
        source["path"] = str(EXAMPLES / source["path"])
        source["limit"] = 16
    body["model"]["path"] = str(model_dir)
    body["packing"]["max_seq_len"] = 192
    body["train"].update(max_steps=16, save_every=1, micro_batch_size=1, grad_accum=1, warmup_steps=1)
    body["eval"].update(max_items=8, nll=False)  # the held-out NLL scores every eval record: minutes
    path = folder / "browser.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture
def dashboard(tmp_path: Path, tiny_llama_dir: Path):
    """`medtune ui` in a subprocess, as a user starts it; yields its address and the runs folder."""
    runs, configs = tmp_path / "runs", tmp_path / "configs"
    configs.mkdir()
    browser_config(configs, tiny_llama_dir)
    port = free_port()
    cmd = [sys.executable, "-m", "medtune", "ui", "--runs", str(runs), "--configs", str(configs)]
    server = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, server)
        yield url, runs
    finally:
        server.terminate()
        server.wait(timeout=30)
        for run in runs.glob("*/ui/pid"):  # a run the test left going must not outlive it
            try:
                os.killpg(int(run.read_text()), 15)
            except (ProcessLookupError, ValueError):
                pass


def _wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(server.stdout.read().decode())
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("medtune ui did not answer within 60 s")


@pytest.fixture
def chromium():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_unless_required("playwright is not installed (pip install -e '.[test]')")
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        skip_unless_required("no chromium on PATH (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


def launch(page, url: str, name: str, edit: tuple[str, str] | None = None) -> None:
    page.goto(f"{url}/launch")
    page.select_option("#config-pick", "browser.yaml")
    if edit is not None:
        box = page.locator("textarea[name=text]")
        box.fill(box.input_value().replace(*edit))
    page.fill("input[name=name]", name)
    page.click("#start")
    page.wait_for_url(f"{url}/runs/{name}")


def wait_for_loss_points(page, more_than: int, timeout_s: float) -> int:
    """Wait until the loss curve has more than `more_than` points; the page may reload meanwhile."""
    from playwright.sync_api import Error

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            points = page.evaluate("+document.querySelector('#loss-curve polyline')?.dataset.points || 0")
        except Error:  # evaluated during a reload (a stage finished)
            points = 0
        if points > more_than:
            return points
        page.wait_for_timeout(250)
    raise AssertionError(f"the loss curve did not grow past {more_than} points in {timeout_s} s")


@pytest.mark.slow
def test_launch_watch_stop_resume_report_compare(chromium, dashboard) -> None:
    from playwright.sync_api import expect

    url, runs = dashboard
    page = chromium.new_page(viewport={"width": 1280, "height": 900})
    launch(page, url, "run-b", edit=("seed: 0", "seed: 1"))  # an edited copy, run alongside
    assert (runs.parent / "configs" / "run-b.yaml").is_file()
    launch(page, url, "run-a")
    expect(page.locator("#status")).to_have_text("running")

    # The loss curve gains points while training runs, without the page reloading.
    first = wait_for_loss_points(page, 0, RUN_WAIT_MS / 1000)
    page.evaluate("window.notReloaded = true")  # the page reloads when a stage finishes, not per step
    wait_for_loss_points(page, first, 90)
    assert page.evaluate("window.notReloaded") is True
    if os.environ.get("MEDTUNE_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["MEDTUNE_UI_SCREENSHOT"], full_page=False)

    # Stop: SIGTERM, a checkpoint, exit 0; the run is stopped, not failed.
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped", timeout=60_000)
    assert not (runs / "run-a" / "train" / "run.json").exists()
    assert list((runs / "run-a" / "train" / "checkpoints").iterdir())
    metrics = (runs / "run-a" / "train" / "metrics.jsonl").read_text().splitlines()
    stopped_at = max(json.loads(line)["step"] for line in metrics)
    assert stopped_at < 16

    # Resume continues from the checkpoint to the end: eval, then the report.
    page.click("#resume")
    expect(page.locator("#status")).to_have_text("done", timeout=RUN_WAIT_MS)
    assert "--resume" in (runs / "run-a" / "ui" / "log.txt").read_text()
    expect(page.locator("table.eval").first).to_be_visible()
    page.click("#report")
    expect(page.locator("h1").first).to_be_visible()
    assert page.url.endswith("/files/run-a/report/report.html")

    # Compare with the second run once it is done too.
    page.goto(f"{url}/runs/run-b")
    expect(page.locator("#status")).to_have_text("done", timeout=RUN_WAIT_MS)
    page.goto(f"{url}/compare")
    page.select_option("select[name=a]", "run-a")
    page.select_option("select[name=b]", "run-b")
    page.click("#compare")
    rows = page.locator("table.deltas tr")
    expect(rows.first).to_be_visible()
    assert rows.count() > 1 and "McNemar p" in page.content()
    page.goto(url)
    expect(page.locator('tr[data-run="run-a"] .status')).to_have_text("done")
