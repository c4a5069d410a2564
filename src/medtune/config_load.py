"""The steps around validating a run config: reading the YAML, dotted overrides, keys that moved
section, relative paths, and error messages that name the key and suggest the fix.

Kept apart from `medtune.config` (the sections and their defaults) so that file reads as the schema.
Nothing here imports `medtune.config` at run time: the config model is passed in where it is needed.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

from medtune.errors import ConfigError

if TYPE_CHECKING:
    from medtune.config import RunConfig

log = logging.getLogger(__name__)
_WARNED: set[str] = set()
"""Moved keys already reported in this process: a config is validated again by every stage, and
every sweep cell, and one note per key is enough."""


def read_yaml_config(path: Path) -> dict[str, Any]:
    """The config file's top-level mapping; ConfigError for a missing file, non-UTF-8 or invalid YAML."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: an int past 4300 digits
        raise ConfigError(f"{path}: not valid YAML: {str(exc)[:300]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def move_format_keys(raw: Any, keys: list[str]) -> Any:
    """`packing.<key>` -> `format.<key>` for the rendering settings that moved to `format:`.

    The old spelling is still read, with a note once per process; the same key set in both places
    to different values is an error naming both, since either choice would silently drop one.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("packing"), dict):
        return raw
    moved = [k for k in keys if k in raw["packing"]]
    if not moved:
        return raw
    packing = dict(raw["packing"])
    fmt = dict(raw["format"]) if isinstance(raw.get("format"), dict) else {}
    for key in moved:
        value = packing.pop(key)
        if key in fmt and fmt[key] != value:
            raise ValueError(
                f"packing.{key} ({value!r}) and format.{key} ({fmt[key]!r}) disagree; "
                f"packing.{key} is the old spelling of format.{key}: keep only format.{key}"
            )
        fmt[key] = value
        if key not in _WARNED:
            _WARNED.add(key)
            log.warning("config: packing.%s is now format.%s; the old spelling still works for now", key, key)
    return {**raw, "packing": packing, "format": fmt}


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `train.lr`, or `data.train.0.limit` (an index into a list the config already holds)."""
    node: Any = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        if isinstance(node, dict) and node.get(key) is None:
            node[key] = {}
        node = node[key] if isinstance(node, dict) else node[_list_index(node, key, dotted)]
    if isinstance(node, dict):
        node[leaf] = value
    else:
        node[_list_index(node, leaf, dotted)] = value


def _list_index(node: Any, key: str, dotted: str) -> int:
    if isinstance(node, list) and key.isdecimal() and int(key) < len(node):
        return int(key)
    what = f"a list of {len(node)}" if isinstance(node, list) else f"a {type(node).__name__}"
    raise ConfigError(f"override {dotted[:100]}: cannot set {key[:40]!r} inside {what}")


def resolve_paths(cfg: RunConfig, base: Path) -> RunConfig:
    def resolve(p: Path) -> Path:
        return (base / p).resolve()

    for section, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        for i, source in enumerate(sources):
            source.path = resolve(source.path)
            if not source.path.exists():
                raise ConfigError(f"data.{section}.{i}.path: no such file or folder: {source.path}")
    cfg.model.path = resolve(cfg.model.path)
    _check_model_dir(cfg.model.path)
    cfg.output.dir = resolve(cfg.output.dir)
    return cfg


def _check_model_dir(path: Path) -> None:
    """model.path must be a model folder at load time, not when training starts after `prepare`."""
    if not path.is_dir():
        raise ConfigError(
            f"model.path: no such folder: {path}; point it at a local model directory, or make one "
            "with `medtune model tiny --out DIR`, `medtune model fetch NAME` or `medtune model import`"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a model directory (it has no config.json)")


def explain(exc: ValidationError, where: str, root: type[BaseModel]) -> str:
    """Turn pydantic's errors into one paragraph per problem: key path, what is wrong, a hint."""
    lines = [f"{where}: the config is not valid ({exc.error_count()} problem(s)):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            hint = _suggest(err["loc"], root)
            lines.append(f"  - {loc}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing")
        else:
            got = err.get("input")
            got_s = f" (got {_shown(got)})" if not isinstance(got, dict | list) else ""
            lines.append(f"  - {loc}: {err['msg']}{got_s}")
    lines.append("Run `medtune config show` on a valid config to see every key with its default.")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """A value in an error message: cut short (a pasted file), and safe for ints past 4300 digits."""
    try:
        text = repr(value)
    except ValueError:
        return "a number with thousands of digits"
    return text if len(text) <= 80 else f"{text[:77]}..."


def _suggest(loc: tuple[Any, ...], root: type[BaseModel]) -> str:
    """'did you mean ...' for a misspelled key, from the fields of the section that holds it."""
    model = root
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        inner = _section_type(field.annotation)
        if inner is None:
            return ""
        model = inner
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(model.model_fields)}"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None
