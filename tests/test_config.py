"""Config loading: defaults, path resolution, and errors that name the key before any work starts."""

from __future__ import annotations

import copy
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from medtune.config import RunConfig, SourceConfig, dump_config, load_config
from medtune.errors import ConfigError


def write(tmp_path: Path, body: dict) -> Path:
    (tmp_path / "d.jsonl").write_text("{}\n")
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(body, allow_unicode=True))
    return path


BASE = {"model": {"path": "m"}, "data": {"train": [{"path": "d.jsonl"}]}}


def test_defaults_and_relative_paths_resolve_against_the_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.model.path == tmp_path / "m"
    assert cfg.data.train[0].path == tmp_path / "d.jsonl"
    assert cfg.quantization.mode == "nf4" and cfg.quantization.double_quant
    assert cfg.lora.target_modules == "all-linear"
    assert "max_seq_len: 1024" in dump_config(cfg)


def test_misspelled_key_names_the_path_and_suggests_the_fix(tmp_path: Path) -> None:
    body = {**BASE, "train": {"lerning_rate": 1e-4}}
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, body))
    assert "train.lerning_rate: unknown key" in str(exc.value)


def test_wrong_type_names_the_key_and_the_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, {**BASE, "train": {"lr": "fast"}}))
    assert "train.lr" in str(exc.value) and "'fast'" in str(exc.value)


def test_missing_data_file_is_named(tmp_path: Path) -> None:
    body = {**BASE, "data": {"train": [{"path": "nope.jsonl"}]}}
    with pytest.raises(ConfigError, match=r"data\.train\.0\.path: no such file.*nope\.jsonl"):
        load_config(write(tmp_path, body))


# ------------------------------------------------------------- format: moved out of packing:

FORMAT_KEYS = {
    "template": "plain",
    "prompt_language": "en",
    "train_on_prompt": True,
    "include_explanation": False,
}


@pytest.mark.parametrize(("key", "value"), FORMAT_KEYS.items())
def test_old_packing_spelling_of_a_format_key_still_works_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, value: object
) -> None:
    import medtune.config_load

    medtune.config_load._WARNED.clear()  # once per process: start this test's process-wide count afresh
    old = {**BASE, "packing": {"max_seq_len": 64, key: value}}
    with caplog.at_level("WARNING", logger="medtune"):
        cfg, again = load_config(write(tmp_path, old)), load_config(write(tmp_path, old))
    assert getattr(cfg.format, key) == value and cfg.packing.max_seq_len == 64
    assert (
        cfg
        == again
        == load_config(write(tmp_path, {**BASE, "format": {key: value}, "packing": {"max_seq_len": 64}}))
    )
    notes = [r.getMessage() for r in caplog.records if f"packing.{key}" in r.getMessage()]
    assert len(notes) == 1 and f"format.{key}" in notes[0]


def test_old_and_new_spelling_that_disagree_is_an_error_naming_both(tmp_path: Path) -> None:
    body = {**BASE, "packing": {"template": "plain"}, "format": {"template": "chat"}}
    with pytest.raises(ConfigError, match=r"packing\.template.*format\.template"):
        load_config(write(tmp_path, body))
    same = {**BASE, "packing": {"template": "plain"}, "format": {"template": "plain"}}
    assert load_config(write(tmp_path, same)).format.template == "plain"


def test_moving_format_keys_keeps_the_config_hash(tmp_path: Path) -> None:
    """Finished stages are recognised by the config hash: the `format:` section hashes where its keys
    lived before (under packing), so runs made before the move are neither redone nor refused."""
    old = load_config(write(tmp_path, {**BASE, "packing": {"template": "plain", "max_seq_len": 64}}))
    new = load_config(
        write(tmp_path, {**BASE, "format": {"template": "plain"}, "packing": {"max_seq_len": 64}})
    )
    assert old.config_hash() == new.config_hash() != load_config(write(tmp_path, BASE)).config_hash()
    flat = old.model_dump(mode="json")  # as an earlier run.json recorded it: one packing section
    flat["packing"] |= flat.pop("format")
    assert RunConfig.model_validate(flat).config_hash() == old.config_hash()


# ---------------------------------------------------------------- hostile configs (hypothesis)

HUGE_INT = "1" + "0" * 5000  # past Python's int/str digit limit


def known_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config, sources as `data.train.0.<key>`."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys += known_keys(inner, f"{key}.")
    return keys + [f"data.train.0.{name}" for name in SourceConfig.model_fields]


def _dump(raw: dict) -> str:
    return yaml.safe_dump(raw, allow_unicode=True).replace(f"'{HUGE_INT}'", HUGE_INT)


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from([HUGE_INT, "", "-1", "0", "auto", "a\x00b", "x" * 5000, "../../etc", "~/m"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8,
)
PROPERTY = settings(max_examples=80, deadline=None)


def load_or_config_error(path: Path, overrides: dict | None = None) -> None:
    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        # names the config file, or starts with the key at fault (`data.train.0.path: ...`)
        assert str(path) in str(exc) or re.match(r"(override )?[\w.]+: ", str(exc)), exc
        return
    assert isinstance(cfg, RunConfig)
    dump_config(cfg)  # a loaded config can always be shown
    cfg.config_hash()


def _folder() -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory()
    (Path(tmp.name) / "d.jsonl").write_text("{}\n")
    (Path(tmp.name) / "m").mkdir()
    (Path(tmp.name) / "m" / "config.json").write_text("{}")
    return tmp


@PROPERTY
@given(data=st.binary(max_size=500) | st.text(max_size=500).map(str.encode))
def test_any_file_is_a_config_or_a_config_error(data: bytes) -> None:
    with _folder() as tmp:
        (Path(tmp) / "run.yaml").write_bytes(data)
        load_or_config_error(Path(tmp) / "run.yaml")


@PROPERTY
@given(key=st.sampled_from(known_keys()), value=values, as_override=st.booleans())
def test_any_value_at_a_known_key_is_valid_or_a_config_error(
    key: str, value: object, as_override: bool
) -> None:
    raw = copy.deepcopy(BASE)
    if not as_override:
        node: object = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value  # type: ignore[index]
    with _folder() as tmp:
        (Path(tmp) / "run.yaml").write_text(_dump(raw))
        load_or_config_error(Path(tmp) / "run.yaml", {key: value} if as_override else None)


@PROPERTY
@given(
    key=st.lists(st.sampled_from(["data", "train", "0", "path", "mix", "x", ""]), min_size=1, max_size=4).map(
        ".".join
    ),
    value=values,
    section=st.sampled_from([None, 5, "text", [1, 2]]),
)
def test_overrides_through_a_non_mapping_are_a_config_error(key: str, value: object, section: object) -> None:
    with _folder() as tmp:
        raw = {**BASE, "train": section} if section is not None else BASE
        (Path(tmp) / "run.yaml").write_text(_dump(raw))
        load_or_config_error(Path(tmp) / "run.yaml", {key: value})


def test_overrides_use_dotted_keys_and_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert load_config(path, {"train.max_steps": 7}).train.max_steps == 7
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(path, {"train.max_steps": 0})


def test_config_hash_changes_with_any_value(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert load_config(path).config_hash() == load_config(path).config_hash()
    assert load_config(path).config_hash() != load_config(path, {"seed": 1}).config_hash()


@pytest.mark.parametrize(
    ("ratio", "why"),
    [
        ({"ko": 0, "en": 0}, "at least one language a share above 0"),
        ({"ko": -1, "en": 1}, "greater than or equal to 0"),
        ({"ko": -1, "en": -1}, "greater than or equal to 0"),
        ({"ko": float("nan"), "en": 1}, "finite number"),
        ({"ko": float("inf"), "en": 1}, "finite number"),
    ],
)
def test_mix_ratio_is_finite_non_negative_and_not_all_zero(tmp_path: Path, ratio: dict, why: str) -> None:
    body = {**BASE, "data": {**BASE["data"], "mix": {"ratio": ratio}}}
    with pytest.raises(ConfigError, match=r"data\.mix\.ratio") as exc:
        load_config(write(tmp_path, body))
    assert why in str(exc.value)


def test_mix_ratio_with_a_zero_share_is_a_one_language_mix(tmp_path: Path) -> None:
    body = {**BASE, "data": {**BASE["data"], "mix": {"ratio": {"ko": 1, "en": 0}}}}
    assert load_config(write(tmp_path, body)).data.mix.ratio == {"ko": 1.0, "en": 0.0}


def test_mix_ratio_is_checked_on_assignment_too(tmp_path: Path) -> None:
    """The sweep sets each cell's ratio on a loaded config; a bad one must not slip through there."""
    cfg = load_config(write(tmp_path, BASE))
    with pytest.raises(ValueError, match="share above 0"):
        cfg.data.mix.ratio = {"ko": 0.0, "en": 0.0}


def test_model_path_must_be_a_model_directory(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "model": {"path": "missing"}})
    with pytest.raises(ConfigError, match=r"model\.path: no such folder.*missing") as exc:
        load_config(path)
    assert "medtune model tiny" in str(exc.value)
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(ConfigError, match=r"model\.path: .*not-a-model.*config\.json"):
        load_config(path, {"model.path": "not-a-model"})
