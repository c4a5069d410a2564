"""Starting, stopping and resuming `medtune run` from the dashboard, as ordinary subprocesses.

The dashboard never trains in its own process: it runs the same command a user would type
(`python -m medtune run CONFIG -s output.dir=RUN [--resume]`), so a run started here behaves, logs
and resumes exactly like one started in a terminal. Each run gets its own process group, so Stop
reaches every process of it (torchrun's ranks too) and a dashboard that quits leaves it running.
What the dashboard knows about a run it started lives in `RUN/ui/`: `launch.json` (the command),
`pid`, `log.txt` and, once the process has ended, `exit.json` (its return code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.manifest import write_json_atomic

UI_DIR = "ui"
LOG_NAME = "log.txt"


def ui_dir(run_dir: Path) -> Path:
    return run_dir / UI_DIR


def read_pid(run_dir: Path) -> int | None:
    try:
        return int((ui_dir(run_dir) / "pid").read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True while `pid` is a live medtune process (a reused pid of another program does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal check is all there is
    zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
    return b"medtune" in cmdline and not zombie


def is_running(run_dir: Path) -> bool:
    pid = read_pid(run_dir)
    return pid is not None and pid_alive(pid)


def read_launch(run_dir: Path) -> dict[str, Any] | None:
    """`launch.json` and `exit.json` merged: how the dashboard started the run and how it ended."""
    record = read_json(ui_dir(run_dir) / "launch.json")
    if record is None:
        return None
    return record | (read_json(ui_dir(run_dir) / "exit.json") or {})


def start_run(config: Path, run_dir: Path, resume: bool = False) -> int:
    """Start `medtune run CONFIG` into `run_dir` in its own process group; return its pid."""
    if is_running(run_dir):
        raise MedtuneError(f"{run_dir.name} is already running (pid {read_pid(run_dir)})")
    folder = ui_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exit.json").unlink(missing_ok=True)
    # JSON is valid YAML: the path stays a string whatever characters it holds.
    argv = ["run", str(config), "-s", f"output.dir={json.dumps(str(run_dir))}"] + ["--resume"] * resume
    with (folder / LOG_NAME).open("a", encoding="utf-8") as log:
        log.write(f"\n$ medtune {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "medtune", *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (folder / "pid").write_text(f"{proc.pid}\n")
    write_json_atomic(folder / "launch.json", {"config": str(config), "argv": argv, "started_at": _now()})
    threading.Thread(target=_record_exit, args=(proc, folder), daemon=True).start()
    return proc.pid


def _record_exit(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """Wait for the run (this also reaps it) and write its return code for the Runs page."""
    code = proc.wait()
    write_json_atomic(folder / "exit.json", {"returncode": code, "finished_at": _now()})


def stop_run(run_dir: Path) -> None:
    """SIGTERM to the run's process group: training finishes its step, checkpoints and exits 0."""
    pid = read_pid(run_dir)
    if pid is None or not pid_alive(pid):
        raise MedtuneError(f"{run_dir.name} is not running")
    os.killpg(pid, signal.SIGTERM)


def resume_run(run_dir: Path) -> int:
    """Start the run's own command again with `--resume`."""
    launch = read_launch(run_dir)
    if launch is None:
        raise MedtuneError(f"{run_dir.name} was not started from the dashboard: resume it with the CLI")
    return start_run(Path(launch["config"]), run_dir, resume=True)


def log_tail(run_dir: Path, max_bytes: int = 6000) -> str:
    """The end of the run's log, for the Run page (rich progress bars leave carriage returns)."""
    path = ui_dir(run_dir) / LOG_NAME
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())


def read_json(path: Path) -> Any:
    """A JSON file, or None when it is absent or being replaced (the dashboard reads live run folders)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
