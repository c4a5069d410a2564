"""`run.json`: what produced a stage's output, so any result can be traced and reproduced.

Each stage writes one next to its outputs: the config hash, the seed, package versions, the git
revision of medtune, and timings. Writes are atomic (temp file + rename) so a killed run never
leaves a half-written manifest that a later stage would trust.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from medtune.config import RunConfig

PACKAGES = ("medtune", "torch", "transformers", "peft", "bitsandbytes", "datasets", "tokenizers")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> str | None:
    """The commit medtune's source is at (with `-dirty` when modified), or None outside a checkout."""
    src = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no", "--", "."],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def start_record(stage: str, cfg: RunConfig | None) -> dict[str, Any]:
    """What a stage's `run.json` says about its inputs; the stage adds `results` as it finishes.

    `cfg` is None for a stage that reads finished run dirs instead of a config (`report`).
    """
    record: dict[str, Any] = {"stage": stage}
    if cfg is not None:
        record.update(config_hash=cfg.config_hash(), seed=cfg.seed, config=cfg.model_dump(mode="json"))
    record.update(
        versions=package_versions(),
        git_revision=git_revision(),
        python=platform.python_version(),
        host={"platform": platform.platform(), "cpus": os.cpu_count()},
        started_at=_utc(time.time()),
        _started=time.time(),
    )
    return record


def finish_record(record: dict[str, Any], out_dir: Path) -> None:
    """Write `out_dir/run.json`: the last file a stage writes, so its presence means "complete"."""
    started = record.pop("_started")
    record["finished_at"] = _utc(time.time())
    record["seconds"] = round(time.time() - started, 3)
    write_json_atomic(out_dir / "run.json", record)


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's `run.json`, or None when the stage has not finished there."""
    path = stage_dir / "run.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
