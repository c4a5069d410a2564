"""The dashboard's safety rules, in one place: who may ask, what may change state, which files leave.

- On 127.0.0.1 only this machine can connect; the Host header must still name a loopback address,
  so a web page on another site cannot reach the dashboard by rebinding its DNS name to 127.0.0.1.
- On any other address every request must carry the access token printed at start-up (`?token=`
  once, then a cookie, or an `Authorization: Bearer` header).
- Every POST carries the page's CSRF token: another site can make the browser send a form, but it
  cannot read the token from our pages (same-origin policy).
- Files are served only from under `--runs`, and configs are read only from under the allowed folder:
  a path that resolves outside (`..`, an absolute path, a symlink) is refused.
"""

from __future__ import annotations

import ipaddress
import secrets
from pathlib import Path

from starlette.datastructures import URL
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from medtune.errors import MedtuneError

TOKEN_COOKIE = "medtune_token"
CSRF_FIELD = "csrf"


class PathRefused(MedtuneError):
    """A requested path resolves outside the folder it must stay in."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def contained(root: Path, relative: str) -> Path:
    """`root/relative`, resolved; refused when it lands outside `root` (`..`, absolute, symlink out)."""
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        raise PathRefused(f"{relative!r} is outside {base}")
    return target


class Guard:
    """ASGI middleware: the token on non-local binds, loopback Host names on local ones, CSRF on POST."""

    def __init__(self, app: ASGIApp, token: str | None, csrf: str) -> None:
        self.app, self.token, self.csrf = app, token, csrf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        refusal = self._refuse(request)
        if refusal is None and request.method == "POST":
            body = await _read_body(receive)  # read here for the check, then again by the route
            refusal = await self._check_csrf(Request(scope, _replay(body, receive)))
            receive = _replay(body, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if self.token and request.query_params.get("token") == self.token and request.method == "GET":
            # Swap the token in the address for a cookie, so it does not linger in history or logs.
            clean = URL(scope=scope).remove_query_params("token")
            response = RedirectResponse(str(clean), status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, request: Request) -> Response | None:
        if self.token is None:
            if not is_loopback(request.url.hostname or ""):
                return PlainTextResponse("refused: the dashboard answers to localhost only", 403)
            return None
        offered = (
            request.query_params.get("token")
            or request.cookies.get(TOKEN_COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ")
        )
        if not secrets.compare_digest(offered.encode(), self.token.encode()):
            return PlainTextResponse("refused: this dashboard needs the access token printed at start", 401)
        return None

    async def _check_csrf(self, request: Request) -> Response | None:
        offered = request.headers.get("x-csrf-token") or str((await request.form()).get(CSRF_FIELD, ""))
        if not secrets.compare_digest(offered.encode(), self.csrf.encode()):
            return PlainTextResponse("refused: missing or wrong CSRF token (reload the page)", 403)
        return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands out `body` once, then listens to the connection as before."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
