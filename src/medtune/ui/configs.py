"""The Launch page's configs: listed and read only under the allowed folder, checked by `load_config`.

A config is checked by the same loader as the CLI (`medtune.config.load_config`), so the page
refuses exactly what `medtune run` would. The loader resolves relative paths against the config's
own folder, so an edited copy is checked and saved next to the file it was copied from. The
loader's messages name the key (`train.lr: ...`); `errors_by_line` finds that key's line in the
YAML so the page can show each message under the line it is about.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from medtune.config import load_config
from medtune.errors import ConfigError, MedtuneError
from medtune.ui.runs import RUN_NAME
from medtune.ui.security import PathRefused, contained

CONFIG_SUFFIXES = (".yaml", ".yml")
KEY_MESSAGE = re.compile(r"^\s*(?:- )?([A-Za-z_][\w]*(?:\.[\w]+)*): (.+)$")

Problem = tuple[str | None, str]  # (dotted key or None, message)


class ConfigProblem(MedtuneError):
    """The config (or the run name) is not valid; `problems` are the loader's messages by key."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


def config_files(configs_dir: Path) -> list[str]:
    """YAML files under the allowed folder, as paths relative to it (what the page offers)."""
    base = configs_dir.resolve()
    return sorted(
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.suffix in CONFIG_SUFFIXES and p.is_file() and p.resolve().is_relative_to(base)
    )


def allowed_config(configs_dir: Path, chosen: str) -> Path:
    """The chosen config file, refused when it is not a YAML file under the allowed folder."""
    path = contained(configs_dir, chosen)
    if path.suffix not in CONFIG_SUFFIXES or not path.is_file():
        raise PathRefused(f"{chosen!r} is not a YAML config under {configs_dir.resolve()}")
    return path


def validate_text(configs_dir: Path, chosen: str, text: str, name: str, save: bool) -> Path:
    """Check `text` (the chosen config, maybe edited) with the CLI's loader; return the file to run.

    An unedited config runs as it is. An edited one is checked from a scratch file beside the
    original and, with `save`, kept there as `NAME.yaml`, so the run and its record point at a file.
    """
    original = allowed_config(configs_dir, chosen)
    if text.replace("\r\n", "\n") == original.read_text(encoding="utf-8"):
        _check(original)
        return original
    if save and not RUN_NAME.match(name):
        raise ConfigProblem("run name: use letters, digits, '.', '_' or '-' (it names a folder)", [])
    target = original.with_name(f"{name}.yaml")
    if save and target.exists() and target.read_text(encoding="utf-8") != text:
        raise ConfigProblem(f"run name: {target} already exists with other contents; pick another name", [])
    scratch = original.with_name(f".{original.stem}.check-{os.getpid()}.yaml")
    scratch.write_text(text, encoding="utf-8")
    try:
        _check(scratch)
    finally:
        scratch.unlink(missing_ok=True)
    if not save:
        return original
    target.write_text(text, encoding="utf-8")
    return target


def _check(path: Path) -> None:
    try:
        load_config(path)
    except ConfigError as exc:
        raise ConfigProblem(str(exc), parse_problems(str(exc))) from None


def parse_problems(message: str) -> list[Problem]:
    """The loader's message as (key, text) pairs: one per listed problem, or the whole message."""
    problems: list[Problem] = []
    for line in message.splitlines():
        found = KEY_MESSAGE.match(line)
        if found and not found.group(1).startswith(("/", ".")):
            problems.append((found.group(1), found.group(2)))
    return problems or [(None, message)]


def errors_by_line(text: str, problems: list[Problem]) -> list[tuple[int, str, list[str]]]:
    """The YAML as (line number, line, messages about a key on that line), for the inline view.

    A message about a missing key goes under the nearest parent that is present; one that names
    no key goes under line 1.
    """
    lines = text.splitlines() or [""]
    found: dict[int, list[str]] = {}
    for key, message in problems:
        line = _key_line(text, key.split(".")) if key else 0
        found.setdefault(min(line, len(lines) - 1), []).append(f"{key}: {message}" if key else message)
    return [(i + 1, line, found.get(i, [])) for i, line in enumerate(lines)]


def _key_line(text: str, parts: list[str]) -> int:
    """0-based line of the deepest part of a dotted key present in the YAML (0 when unparsable)."""
    try:
        node: Any = yaml.compose(text)
    except yaml.YAMLError:
        return 0
    line = 0
    for part in parts:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next(((k, v) for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and part.isdecimal() and int(part) < len(node.value):
            item = node.value[int(part)]
            child = (item, item)
        if child is None:
            break
        line, node = child[0].start_mark.line, child[1]
    return line
