"""`medtune ui`: the dashboard's routes. Pages are rendered on the server from the run folders.

Starlette (the ASGI toolkit FastAPI is built on) with Jinja templates keeps the dashboard a few
hundred lines with no build step; the only script is `static/curves.js`, which polls a JSON
endpoint to extend the loss and learning-rate curves while training runs. Every asset is served
from this package, so the dashboard works on a machine with no internet access.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from medtune.errors import MedtuneError
from medtune.report.inputs import run_config
from medtune.ui import launch, runs
from medtune.ui.configs import ConfigProblem, allowed_config, config_files, errors_by_line, validate_text
from medtune.ui.security import CSRF_FIELD, Guard, PathRefused, contained

HERE = Path(__file__).resolve().parent


@dataclass
class Settings:
    """What `medtune ui` was started with."""

    runs_dir: Path
    configs_dir: Path
    token: str | None  # required on every request when the dashboard listens beyond this machine


def create_app(settings: Settings) -> Starlette:
    csrf = secrets.token_urlsafe(24)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals.update(csrf_field=CSRF_FIELD, csrf=csrf)
    templates.env.filters.update(duration=_duration, num=_num)
    pages = _Pages(settings, templates)
    routes = [
        Route("/", pages.runs_page),
        Route("/runs/{name}", pages.run_page),
        Route("/runs/{name}/quarantine", pages.quarantine_page),
        Route("/runs/{name}/stop", pages.stop, methods=["POST"]),
        Route("/runs/{name}/resume", pages.resume, methods=["POST"]),
        Route("/api/runs/{name}/metrics", pages.metrics_json),
        Route("/files/{name}/{path:path}", pages.run_file),
        Route("/compare", pages.compare_page),
        Route("/launch", pages.launch_page, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(Guard, token=settings.token, csrf=csrf)]
    return Starlette(routes=routes, middleware=middleware)


class _Pages:
    """The route handlers; they share the settings and the template environment."""

    def __init__(self, settings: Settings, templates: Jinja2Templates) -> None:
        self.settings, self.templates = settings, templates

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        return self.templates.TemplateResponse(request, template, context, status_code=status_code)

    def run_dir(self, name: str) -> Path:
        """A run folder directly under --runs, by name; 404 for anything else."""
        if not runs.RUN_NAME.match(name):
            raise HTTPException(404, f"no run named {name!r}")
        path = self.settings.runs_dir / name
        if not runs.is_run_dir(path) or path.is_symlink():
            raise HTTPException(404, f"no run named {name!r}")
        return path

    async def runs_page(self, request: Request) -> Response:
        return self.render(request, "runs.html", runs=runs.list_runs(self.settings.runs_dir))

    async def run_page(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        manifest = launch.read_json(run_dir / "prepare" / "manifest.json")
        metrics = launch.read_json(run_dir / "eval" / "metrics.json")
        config = run_config(run_dir)
        return self.render(
            request,
            "run.html",
            run=runs.summarize_run(run_dir),
            launched=launch.read_launch(run_dir),
            config_yaml=yaml.safe_dump(config, sort_keys=False, allow_unicode=True) if config else None,
            manifest=manifest,
            metrics=metrics,
            nll=_nll_table(metrics),
            report=(run_dir / "report" / "report.html").is_file(),
            exports=runs.exports(run_dir),
            log=launch.log_tail(run_dir),
        )

    async def quarantine_page(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        offset = _int(request.query_params.get("offset"), 0)
        rows, total = runs.read_quarantine(run_dir, offset, limit=100)
        return self.render(
            request, "quarantine.html", name=run_dir.name, rows=rows, total=total, offset=offset, limit=100
        )

    async def metrics_json(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        summary = runs.summarize_run(run_dir)
        rows = runs.read_metrics(run_dir, after=_int(request.query_params.get("after"), 0))
        return JSONResponse({"rows": rows, "status": summary.status, "stage": summary.stage})

    async def run_file(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        try:
            path = contained(run_dir, request.path_params["path"])
            contained(self.settings.runs_dir, str(path))  # a symlink inside may not point out of --runs
        except PathRefused as exc:
            raise HTTPException(403, str(exc)) from None
        if not path.is_file():
            raise HTTPException(404, "no such file")
        return FileResponse(path)

    async def stop(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        return self._act(run_dir, lambda: launch.stop_run(run_dir))

    async def resume(self, request: Request) -> Response:
        run_dir = self.run_dir(request.path_params["name"])
        return self._act(run_dir, lambda: launch.resume_run(run_dir))

    def _act(self, run_dir: Path, action: Any) -> Response:
        try:
            action()
        except MedtuneError as exc:
            raise HTTPException(409, str(exc)) from None
        return RedirectResponse(f"/runs/{run_dir.name}", status_code=303)

    async def compare_page(self, request: Request) -> Response:
        names = [r.name for r in runs.list_runs(self.settings.runs_dir)]
        sweeps = runs.list_sweeps(self.settings.runs_dir)
        a, b = request.query_params.get("a"), request.query_params.get("b")
        sweep = request.query_params.get("sweep")
        result, error = None, None
        if a and b:
            try:
                result = compare_runs(self.run_dir(a), self.run_dir(b))
            except MedtuneError as exc:
                error = str(exc)
        view = runs.sweep_view(self.settings.runs_dir / sweep) if sweep in sweeps else None
        return self.render(
            request,
            "compare.html",
            names=names,
            a=a,
            b=b,
            result=result,
            error=error,
            sweeps=sweeps,
            sweep=sweep,
            view=view,
        )

    async def launch_page(self, request: Request) -> Response:
        configs = config_files(self.settings.configs_dir)
        if request.method == "POST":
            return await self._launch(request, configs)
        chosen = request.query_params.get("config") or (configs[0] if configs else "")
        text = self._config_text(chosen) if chosen else ""
        return self.render(request, "launch.html", configs=configs, chosen=chosen, text=text, name="")

    async def _launch(self, request: Request, configs: list[str]) -> Response:
        """Validate (and with action=start, start) the submitted config; problems shown at their keys."""
        form = await request.form()
        chosen, text = str(form.get("config", "")), str(form.get("text", ""))
        name, start = str(form.get("name", "")).strip(), form.get("action") == "start"
        status, problems, message = 200, [], "valid: ready to start"
        try:
            run_dir = self._new_run_dir(name) if start else None
            config = validate_text(self.settings.configs_dir, chosen, text, name, save=start)
            if run_dir is not None:
                launch.start_run(config, run_dir)
                return RedirectResponse(f"/runs/{name}", status_code=303)
        except ConfigProblem as exc:
            status, problems, message = 422, exc.problems or [(None, str(exc))], str(exc)
        except MedtuneError as exc:  # a path outside the allowed folder, a run already running
            status = 403 if isinstance(exc, PathRefused) else 409
            problems, message = [(None, str(exc))], str(exc)
        context = {"configs": configs, "chosen": chosen, "text": text, "name": name, "message": message}
        lines = errors_by_line(text, problems)
        return self.render(request, "launch.html", status, problems=problems, lines=lines, **context)

    def _config_text(self, chosen: str) -> str:
        try:
            return allowed_config(self.settings.configs_dir, chosen).read_text(encoding="utf-8")
        except (PathRefused, OSError) as exc:
            raise HTTPException(403 if isinstance(exc, PathRefused) else 404, str(exc)) from None

    def _new_run_dir(self, name: str) -> Path:
        """Where a run started here writes: `--runs/NAME` (output.dir is set to it on the command)."""
        if not runs.RUN_NAME.match(name):
            raise ConfigProblem("run name: use letters, digits, '.', '_' or '-' (it names a folder)", [])
        path = self.settings.runs_dir / name
        if path.exists() and not runs.is_run_dir(path):
            raise ConfigProblem(f"run name: {path} exists and is not a run folder", [])
        return path


def compare_runs(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """B's tuned model against A's, per group, paired by item; and each against A's base model.

    The forgetting rows are the groups where a tuned model scores below the base (A's base: runs
    compared side by side share their base model and eval set, or the pairing refuses).
    """
    from medtune.evaluate.compare import compare_predictions, forgetting_table, load_predictions

    tuned = {}
    for label, run_dir in (("A", a_dir), ("B", b_dir)):
        path = run_dir / "eval" / "tuned" / "predictions.jsonl"
        if not path.is_file():
            raise MedtuneError(f"{run_dir.name} has no tuned predictions yet (eval not finished)")
        tuned[label] = load_predictions(path)
    if not tuned["A"].keys() & tuned["B"].keys():
        raise MedtuneError(f"{a_dir.name} and {b_dir.name} share no eval items: they cannot be paired")
    result = compare_predictions(tuned["A"], tuned["B"])
    base = a_dir / "eval" / "base" / "predictions.jsonl"
    result["forgetting"] = (
        forgetting_table(load_predictions(base), tuned, 2000, 0) if base.is_file() else None
    )
    return result


def _nll_table(metrics: dict[str, Any] | None) -> tuple[list[str], list[list[str]]] | None:
    if not metrics or not metrics.get("nll"):
        return None
    from medtune.report.tables import nll_rows

    return nll_rows(metrics["nll"])


def _int(text: str | None, default: int) -> int:
    return int(text) if text and re.fullmatch(r"\d{1,9}", text) else default


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def serve(runs_dir: Path, configs_dir: Path, host: str, port: int) -> None:
    """Serve the dashboard until Ctrl-C; on a non-local address, print the token it requires."""
    import uvicorn

    from medtune.ui.security import is_loopback

    token = None if is_loopback(host) else secrets.token_urlsafe(24)
    runs_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(Settings(runs_dir.resolve(), configs_dir.resolve(), token))
    address = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    print(f"medtune ui: {address}{'?token=' + token if token else ''}", flush=True)
    if token:
        print(f"access token (required on every request from another machine): {token}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
