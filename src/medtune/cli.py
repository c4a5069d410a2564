"""The `medtune` command: one thin function per verb; the work lives in the stage modules.

Every verb that runs a stage takes the same YAML config and reads the previous stage's output
under `output.dir/<stage>/`. Errors the user can fix (`MedtuneError`) print one paragraph and exit
with code 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

from medtune.offline import enforce_offline

enforce_offline()  # before anything imports the Hugging Face stack

import typer  # noqa: E402
import yaml  # noqa: E402
from rich.console import Console  # noqa: E402

from medtune.config import RunConfig, dump_config, load_config  # noqa: E402
from medtune.errors import MedtuneError  # noqa: E402

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


def _load(config: Path, overrides: list[str] | None) -> RunConfig:
    parsed: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MedtuneError(f"--set expects KEY=VALUE (e.g. train.lr=1e-4), got {item!r}")
        parsed[key.strip()] = yaml.safe_load(value)
    return load_config(config, parsed)


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    return cfg.output.dir / stage


# ---------------------------------------------------------------- config


@config_app.command("validate")
def config_validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate CONFIG; exit 2 with the offending key if it is wrong."""
    cfg = _load(config, set_)
    console.print(f"[green]ok[/green] {config} (config hash {cfg.config_hash()})")


@config_app.command("show")
def config_show(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print CONFIG resolved, with every default spelled out."""
    console.print(dump_config(_load(config, set_)), markup=False, highlight=False)


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
        console.print(f"{out} already holds a model; keeping it")
        return
    path = build_tiny_model(out, arch, seed=seed)  # type: ignore[arg-type]
    console.print(f"wrote tiny {arch} model to {path}")


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one paragraph and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
    try:
        # standalone_mode: click reports its own usage errors (exit 2); ours propagate to here.
        app(args, standalone_mode=True)
    except MedtuneError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
