"""Running a stage into `output.dir/<stage>`: when to skip it, when to refuse, and how not to leave a mix.

One rule for every caller (`medtune prepare/train/eval/run`, sweeps, the efficiency bench): a stage
folder whose `run.json` carries this config's hash is finished and is skipped; one that carries
another config's hash is refused, because a later stage would otherwise read outputs of a config
nobody asked for. `run.json` is the last file a stage writes, so its presence means "complete".

Prepare and eval are redone whole: the previous folder is set aside, the stage runs in place (so
paths recorded inside the outputs are the real ones), and the old folder comes back if the stage
fails. A failed run therefore leaves the last complete output, never old files next to new ones.
Train keeps its folder, because its checkpoints are what `--resume` continues from; its run.json is
removed before training starts and written after the adapter.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from medtune.config import DistributedConfig, RunConfig
from medtune.errors import MedtuneError, RunDirError
from medtune.manifest import finish_record, read_manifest, start_record

StageWork = Callable[[Path], dict[str, Any]]
TrainFn = Callable[..., dict[str, Any]]
REDO_HINT = {
    "prepare": "pass --force to `medtune prepare` (or delete {dir})",
    "eval": "pass --force to `medtune eval` (or delete {dir})",
    "train": "delete {dir} to train again",
}


def finished(cfg: RunConfig, stage: str, stage_dir: Path, force: bool = False) -> bool:
    """True when `stage_dir` holds this config's finished stage; an error when it holds another's.

    `force` treats another config's finished stage as unfinished (the caller will redo it).
    """
    manifest = read_manifest(stage_dir)
    if manifest is None:
        return False
    if manifest.get("config_hash") == cfg.config_hash():
        return True
    if force:
        return False
    hint = REDO_HINT.get(stage, "delete {dir}").format(dir=stage_dir)
    raise RunDirError(
        f"{stage_dir} holds a finished `{stage}` stage of another config (config hash "
        f"{manifest.get('config_hash')}, this config {cfg.config_hash()}). To keep both, set a new "
        f"output.dir; to redo `{stage}`, {hint}"
    )


def check_run(cfg: RunConfig, resume: bool, force: bool) -> None:
    """Everything that would make `medtune run` refuse midway, checked before any stage writes:
    the model directory, other configs' finished stages (`force` redoes prepare and eval, never a
    finished training), and checkpoints that training would refuse to start over."""
    from medtune.model.load import read_model_config
    from medtune.train import check_fresh_start

    read_model_config(cfg.model.path)
    for stage in ("prepare", "eval"):
        finished(cfg, stage, cfg.output.dir / stage, force)
    train_dir = cfg.output.dir / "train"
    if not finished(cfg, "train", train_dir) and not resume:
        check_fresh_start(train_dir)


def require_finished(cfg: RunConfig, stage: str, verb: str) -> Path:
    """The folder of a stage a later one reads; an error naming the command that makes it."""
    path = cfg.output.dir / stage
    if read_manifest(path) is None:
        raise RunDirError(f"{path} has no finished `{stage}` stage (no run.json): run `medtune {verb}` first")
    return path


def run_stage(
    stage: str, cfg: RunConfig, work: StageWork, force: bool = False, redo: bool = False
) -> dict[str, Any]:
    """Run `work(output.dir/stage)` unless this config finished it already (or `redo`); return its results.

    The previous folder is set aside first and restored if `work` raises (or the process dies, see
    `_recover`), so the folder is always one complete run or nothing.
    """
    out = cfg.output.dir / stage
    _recover(out)
    if finished(cfg, stage, out, force) and not redo:
        print(f"{stage}: already finished in {out} (config {cfg.config_hash()}); skipping", flush=True)
        return (read_manifest(out) or {}).get("results") or {}
    aside = _aside(out)
    if read_manifest(out) is not None:
        os.replace(out, aside)
    elif out.exists():
        shutil.rmtree(out)  # an unfinished attempt: nothing in it is worth keeping
    record = start_record(stage, cfg)
    try:
        out.mkdir(parents=True)
        record["results"] = work(out)
        finish_record(record, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if aside.exists():
            os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return record["results"]


def _aside(out: Path) -> Path:
    return out.with_name(f".{out.name}.previous")


def _recover(out: Path) -> None:
    """After a kill between setting aside and finishing: keep whichever folder is complete."""
    aside = _aside(out)
    if not aside.exists():
        return
    if read_manifest(out) is None:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(aside, out)
    else:
        shutil.rmtree(aside)


def prepare_stage(cfg: RunConfig, force: bool = False) -> dict[str, Any]:
    """Read, filter and mix the data into output.dir/prepare; print the per-source table."""
    from rich.console import Console

    from medtune.data.prepare import run_prepare, source_table

    results = run_stage("prepare", cfg, lambda out: run_prepare(cfg, out), force)
    if results.get("sources"):
        Console().print(source_table(results))
    return results


def eval_stage(cfg: RunConfig, base_only: bool = False, force: bool = False) -> dict[str, Any]:
    """Score the base and/or tuned model into output.dir/eval."""
    from medtune.evaluate.run import run_eval

    prepared = require_finished(cfg, "prepare", "prepare")
    trained = None if base_only else require_finished(cfg, "train", "train")
    # A finished `--base-only` eval has this config's hash but no tuned scores: not finished for
    # a full eval (its results are keyed by the models it scored).
    previous = (read_manifest(cfg.output.dir / "eval") or {}).get("results") or {}
    redo = not base_only and "base" in previous and "tuned" not in previous
    return run_stage("eval", cfg, lambda out: run_eval(cfg, prepared, trained, out), force, redo=redo)


def train_stage(
    cfg: RunConfig, resume: bool = False, force: bool = False, train: TrainFn | None = None
) -> dict[str, Any]:
    """Train in this process (one rank of a torchrun job, or the only one) into output.dir/train.

    Returns the results; `stopped_at_step` in them means a signal stopped training at a checkpoint,
    and no run.json is written. `force` also trains over a finished stage of another config, and
    resumes a checkpoint of another config (see `run_train`).
    """
    out = cfg.output.dir / "train"
    prepared = require_finished(cfg, "prepare", "prepare")
    if finished(cfg, "train", out, force):
        print(f"train: already finished in {out} (config {cfg.config_hash()}); skipping", flush=True)
        return (read_manifest(out) or {}).get("results") or {}
    if train is None:
        from medtune.train import run_train as train
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        (out / "run.json").unlink(missing_ok=True)  # a --force redo must not look finished until it is
    record = start_record("train", cfg)
    results = train(cfg, prepared, out, resume=resume, force=force)
    if "stopped_at_step" not in results and rank0:
        record["results"] = results
        finish_record(record, out)
    return results


def torchrun_train(
    nproc: int,
    config: Path,
    sets: list[str],
    resume: bool = False,
    force: bool = False,
    log: IO[str] | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    nodes: DistributedConfig | None = None,
) -> None:
    """Run `medtune train CONFIG` under torchrun with `nproc` ranks here; each rank runs `train_stage`.

    torchrun starts every rank as a fresh process with its own rendezvous environment, so the only
    way in is a command line. It is started as `<this python> -m torch.distributed.run`, not found on
    PATH, so the ranks run in the same environment as the caller. With `nodes.nnodes > 1` this is
    one node's share of a job that meets at `nodes.rdzv_endpoint` (c10d rendezvous).
    """
    argv = ["train", str(config), *[a for s in sets for a in ("--set", s)]]
    argv += ["--resume"] * resume + ["--force"] * force
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *_rendezvous_args(nodes),
        f"--nproc_per_node={nproc}",
    ]
    proc = subprocess.run(
        [*cmd, "-m", "medtune", *argv],
        stdout=log,
        stderr=subprocess.STDOUT if log else None,
        env=env,
        timeout=timeout_s,
        check=False,
        preexec_fn=terminate_with_parent,
    )
    if proc.returncode != 0:
        raise MedtuneError(
            f"distributed training failed (torchrun exit code {proc.returncode}); see the log above"
            + (" (on every node: a rank that lost its peers stops with an error)" if _multi(nodes) else "")
        )


def terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM it when the process that started it dies (Linux).

    A launcher killed with SIGKILL (an OOM killer, `kill -9`, a scheduler's hard stop) cannot pass
    anything on, and torchrun with its ranks used to run on as orphans holding the GPUs. With this,
    the kernel sends torchrun SIGTERM, which it forwards to the ranks: they checkpoint and stop, as
    on a Ctrl-C. Elsewhere (no prctl) this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _multi(nodes: DistributedConfig | None) -> bool:
    return nodes is not None and nodes.nnodes > 1


def _rendezvous_args(nodes: DistributedConfig | None) -> list[str]:
    """torchrun's flags: a private single-node rendezvous, or this node's place in a multi-node job."""
    if not _multi(nodes):
        return ["--standalone"]
    assert nodes is not None and nodes.rdzv_endpoint  # checked by DistributedConfig
    return [
        f"--nnodes={nodes.nnodes}",
        f"--node_rank={nodes.node_rank}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={nodes.rdzv_endpoint}",
        f"--rdzv_id={nodes.rdzv_id}",
        # A node that never arrives, or dies before the job starts, fails the rendezvous, not a hang.
        f"--rdzv_conf=join_timeout={nodes.timeout_s}",
        "--max_restarts=0",
    ]
