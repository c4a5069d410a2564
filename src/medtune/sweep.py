"""`medtune sweep`: the language-ratio experiment, one prepare/train/eval per (ratio, seed) cell.

The question a sweep answers is "does the Korean:English mix of the training data change accuracy
per language?", so everything except the mix and the seed is held fixed: every cell sees the same
eval items, and the base model is scored once (in `base/`) and every cell's tuned predictions are
paired against those same base predictions. Cells run one after another in this process; each is
an ordinary run dir (`cells/ko1-en1_seed1/{prepare,train,eval}`) that `medtune report` can read on
its own. A sweep is resumable: a cell whose eval finished is skipped, a cell whose training left
checkpoints continues from the latest one, and a cell that fails is recorded in `sweep.json` with
its error while the other cells go on.
"""

from __future__ import annotations

import hashlib
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.config import RunConfig, load_config
from medtune.errors import ConfigError, MedtuneError
from medtune.manifest import write_json_atomic
from medtune.pipeline import finished, run_stage, train_stage

SWEEP_FILE = "sweep.json"
NLL_VS_BASE = "nll_vs_base.json"
_RATIO_SPEC = re.compile(r"^\s*([A-Za-z_]+(?:\s*:\s*[A-Za-z_]+)+)\s*=\s*(.+)$")


@dataclass(frozen=True)
class Stages:
    """The stage functions a cell calls. Tests pass cheap fakes; `default_stages` gives the real ones."""

    prepare: Callable[..., dict]
    train: Callable[..., dict]
    evaluate: Callable[..., dict]
    compare: Callable[..., dict]


class SweepInterrupted(MedtuneError):
    """Training stopped on a signal: the user wants the whole sweep to stop, not the next cell to start."""


def default_stages() -> Stages:
    """The real stages, imported late so `medtune sweep --help` does not load torch."""
    from medtune.data.prepare import run_prepare
    from medtune.evaluate.compare import run_compare
    from medtune.evaluate.run import run_eval
    from medtune.train import run_train

    return Stages(run_prepare, run_train, run_eval, run_compare)


def parse_ratios(text: str) -> list[dict[str, float]]:
    """`"ko:en=1:0,1:1,10:3,3:10"` -> `[{ko: 1, en: 0}, {ko: 1, en: 1}, ...]`.

    A zero share is allowed (`1:0` is a Korean-only mix); negative shares and all-zero mixes are not,
    because the mixer could not give them a meaning.
    """
    match = _RATIO_SPEC.match(text)
    if not match:
        raise ConfigError(f"--ratios {text!r}: expected LANG:LANG=A:B,C:D (e.g. ko:en=1:0,1:1,10:3,3:10)")
    langs = [lang.strip() for lang in match.group(1).split(":")]
    if len(set(langs)) != len(langs):
        raise ConfigError(f"--ratios {text!r}: a language is named twice")
    ratios = []
    for item in match.group(2).split(","):
        parts = [p.strip() for p in item.split(":")]
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"--ratios: {item.strip()!r} is not {':'.join(['NUMBER'] * len(langs))}"
            ) from None
        if len(shares) != len(langs):
            raise ConfigError(
                f"--ratios: {item.strip()!r} has {len(shares)} shares for {len(langs)} languages"
            )
        if any(s < 0 or s != s or s == float("inf") for s in shares) or not any(shares):
            raise ConfigError(f"--ratios: {item.strip()!r} needs finite shares >= 0, at least one above 0")
        ratios.append(dict(zip(langs, shares, strict=True)))
    return ratios


def ratio_label(ratio: dict[str, float]) -> str:
    """`{ko: 10, en: 3}` -> `ko10-en3`: readable, and safe as a folder name."""
    return "-".join(f"{lang}{share:g}" for lang, share in ratio.items())


def cell_name(ratio: dict[str, float], seed: int) -> str:
    return f"{ratio_label(ratio)}_seed{seed}"


def cell_config(cfg: RunConfig, ratio: dict[str, float], seed: int, run_dir: Path) -> RunConfig:
    """The sweep's config with this cell's mix, seed and output dir; the tuned model only is scored."""
    cell = cfg.model_copy(deep=True)
    cell.seed = seed
    cell.data.mix.ratio = dict(ratio)
    cell.output.dir = run_dir
    cell.eval.eval_base = False
    return cell


def run_sweep(
    cfg_path: Path,
    ratios: list[dict[str, float]],
    seeds: list[int],
    out_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    stages: Stages | None = None,
) -> dict[str, Any]:
    """Run every (ratio, seed) cell, write `sweep.json` and the sweep report; return the sweep record."""
    from rich.console import Console

    from medtune.evaluate.sweep_advice import advice_lines, sweep_advice
    from medtune.report.build import run_report

    cfg = load_config(cfg_path, overrides)
    _check_sweep(cfg, ratios, seeds)
    stages = stages or default_stages()
    sweep_dir = (Path(out_dir) if out_dir is not None else cfg.output.dir / "sweep").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "config": str(cfg_path),
        "config_hash": cfg.config_hash(),
        "overrides": overrides or {},
        "ratios": ratios,
        "seeds": seeds,
        "base": {},
        "cells": [],
    }
    try:
        record["base"] = _run_base(cfg, sweep_dir, stages)
        _save(sweep_dir, record)
        for ratio in ratios:
            for seed in seeds:
                record["cells"].append(_run_cell(cfg, ratio, seed, sweep_dir, record["base"], stages))
                _save(sweep_dir, record)
                if record["cells"][-1]["status"] == "interrupted":
                    raise SweepInterrupted(record["cells"][-1]["error"])
    finally:
        _save(sweep_dir, record)
    _guard_cells(cfg, sweep_dir, record)
    record["advice"] = sweep_advice(sweep_dir, record, cfg.sweep)
    _save(sweep_dir, record)  # the report reads the advice from sweep.json
    for line in advice_lines(record["advice"]):
        Console().print(line, markup=False, highlight=False, soft_wrap=True)
    record["report"] = str(run_report(sweep_dir, sweep_dir / "report") / "report.html")
    _save(sweep_dir, record)
    return record


def _check_sweep(cfg: RunConfig, ratios: list[dict[str, float]], seeds: list[int]) -> None:
    """ConfigError for a sweep this process cannot run, before any cell starts."""
    if cfg.distributed.nproc > 1:
        raise ConfigError(
            "sweep: cells train in this one process; set distributed.nproc=1 (or run the "
            "cells yourself with `medtune run --set data.mix.ratio=...`)"
        )
    if not ratios or not seeds:
        raise ConfigError("sweep: give at least one ratio and one seed")


def _guard_cells(cfg: RunConfig, sweep_dir: Path, record: dict[str, Any]) -> None:
    """With `eval.guard`, judge each finished cell against the shared base and write its eval/guard.json,
    so `medtune export` on a cell refuses a model that forgot a protected group."""
    from medtune.evaluate.run import group_keys
    from medtune.evaluate.versus_base import guard_vs_base

    base_dir = sweep_dir / "base" / "eval" / "base"
    if not cfg.eval.guard or not (base_dir / "predictions.jsonl").is_file():
        return
    for cell in record["cells"]:
        tuned_dir = sweep_dir / cell["dir"] / "eval" / "tuned"
        if cell["status"] not in ("ok", "skipped") or not (tuned_dir / "predictions.jsonl").is_file():
            continue
        cell["guard_passed"] = guard_vs_base(cfg, base_dir, tuned_dir, group_keys(cfg))["passed"]


def _save(sweep_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(sweep_dir / SWEEP_FILE, record)


def _run_base(cfg: RunConfig, sweep_dir: Path, stages: Stages) -> dict[str, Any]:
    """Prepare once with the config as given and score the base model: the reference for every cell."""
    base_dir = sweep_dir / "base"
    base = cfg.model_copy(deep=True)
    base.output.dir = base_dir
    base.eval.eval_base = True
    entry: dict[str, Any] = {
        "dir": "base",
        "status": "ok",
        "error": None,
        "predictions": "base/eval/base/predictions.jsonl",
        "metrics": "base/eval/metrics.json",
    }
    try:
        run_stage("prepare", base, lambda out: stages.prepare(base, out))
        run_stage("eval", base, lambda out: stages.evaluate(base, base_dir / "prepare", None, out))
        entry["eval_sha256"] = _sha256(base_dir / "prepare" / "eval.jsonl")
    except Exception as exc:  # noqa: BLE001 - recorded; the cells still train and score their tuned model
        entry.update(status="failed", error=_describe(exc, base_dir))
    return entry


def _run_cell(
    cfg: RunConfig, ratio: dict[str, float], seed: int, sweep_dir: Path, base: dict[str, Any], stages: Stages
) -> dict[str, Any]:
    name = cell_name(ratio, seed)
    run_dir = sweep_dir / "cells" / name
    ccfg = cell_config(cfg, ratio, seed, run_dir)
    rel = f"cells/{name}"
    entry: dict[str, Any] = {
        "name": name,
        "ratio": ratio,
        "ratio_label": ratio_label(ratio),
        "seed": seed,
        "dir": rel,
        "status": "ok",
        "error": None,
        "stage": None,
        "train_metrics": f"{rel}/train/metrics.jsonl",
        "metrics": f"{rel}/eval/metrics.json",
        "compare": f"{rel}/eval/compare.json",
    }
    started = time.time()
    try:
        if finished(ccfg, "eval", run_dir / "eval"):
            entry["status"] = "skipped"  # finished by an earlier invocation of this sweep
            if not (run_dir / "eval" / "compare.json").is_file():  # the base had failed back then
                entry.update(_compare_with_base(ccfg, run_dir / "eval", sweep_dir, base, stages))
                entry.pop("vs_base_all", None)
            return entry
        (run_dir / "error.log").unlink(missing_ok=True)  # from an earlier failed attempt
        entry["stage"] = "prepare"
        run_stage("prepare", ccfg, lambda out: stages.prepare(ccfg, out))
        entry["stage"] = "train"
        _train_cell(ccfg, run_dir, stages)
        entry["stage"] = "eval"
        entry.update(_eval_cell(ccfg, run_dir, sweep_dir, base, stages))
        entry["stage"] = None
    except SweepInterrupted as exc:
        entry.update(status="interrupted", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken cell must not cost the others
        entry.update(status="failed", error=_describe(exc, run_dir))
    entry["seconds"] = round(time.time() - started, 3)
    return entry


def _train_cell(ccfg: RunConfig, run_dir: Path, stages: Stages) -> None:
    # run_train(resume=True) continues from the latest *complete* checkpoint and starts fresh when
    # there is none, so any checkpoint folder is reason enough to ask for a resume.
    resume = (run_dir / "train" / "checkpoints").is_dir()
    results = train_stage(ccfg, resume=resume, train=stages.train)
    if "stopped_at_step" in results:  # a checkpoint, not a finished stage: no run.json
        raise SweepInterrupted(
            f"training of {run_dir.name} stopped by a signal at step "
            f"{results['stopped_at_step']}; run the sweep again to resume"
        )


def _eval_cell(
    ccfg: RunConfig, run_dir: Path, sweep_dir: Path, base: dict[str, Any], stages: Stages
) -> dict[str, Any]:
    """Score the tuned model, then pair it with the shared base predictions (one stage, so a
    finished eval/run.json means the comparison exists too, unless the base model failed)."""
    notes: dict[str, Any] = {}

    def evaluate(out: Path) -> dict[str, Any]:
        results = stages.evaluate(ccfg, run_dir / "prepare", run_dir / "train", out)
        notes.update(_compare_with_base(ccfg, out, sweep_dir, base, stages))
        return {"eval": results, "vs_base_all": notes.pop("vs_base_all", None)}

    run_stage("eval", ccfg, evaluate)
    return notes


def _compare_with_base(
    ccfg: RunConfig, eval_dir: Path, sweep_dir: Path, base: dict[str, Any], stages: Stages
) -> dict[str, Any]:
    """Pair the cell's tuned predictions with the base's, by item id, into the cell's eval/compare.json."""
    base_preds = sweep_dir / base.get("predictions", "base/eval/base/predictions.jsonl")
    if base.get("status") != "ok" or not base_preds.is_file():
        return {"same_eval_set": None, "compare_skipped": "the base model was not scored (see base.error)"}
    from medtune.evaluate.versus_base import compare_with_base

    compared = compare_with_base(ccfg, base_preds.parent, eval_dir / "tuned", eval_dir, stages.compare)
    _compare_nll_with_base(ccfg, base_preds.parent / "nll.jsonl", eval_dir)
    # Cells see the same eval items when prepare wrote byte-identical eval.jsonl files; the compare
    # stage pairs by id anyway, and reports items only one side has.
    same = _sha256(ccfg.output.dir / "prepare" / "eval.jsonl") == base.get("eval_sha256")
    return {"same_eval_set": same, "vs_base_all": (compared.get("groups") or {}).get("all")}


def _compare_nll_with_base(ccfg: RunConfig, base_nll: Path, eval_dir: Path) -> None:
    """With `eval.nll`, pair the cell's held-out NLL with the base's per item: eval/nll_vs_base.json."""
    from medtune.evaluate.nll import compare_nll, read_nll
    from medtune.evaluate.run import group_keys

    tuned_nll = eval_dir / "tuned" / "nll.jsonl"
    if base_nll.is_file() and tuned_nll.is_file():
        pairs = compare_nll(
            read_nll(base_nll), read_nll(tuned_nll), group_keys(ccfg), ccfg.eval.bootstrap_samples, ccfg.seed
        )
        write_json_atomic(eval_dir / NLL_VS_BASE, pairs)


def _describe(exc: BaseException, run_dir: Path) -> str:
    """One line for sweep.json; the full traceback goes to the cell's error.log for debugging."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "error.log").write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:500]


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
