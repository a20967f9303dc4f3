"""The guard in front of every route of the server (API and web UI): HTTP Basic auth and Origin checks.

`GuardMiddleware` is pure ASGI, so it runs before routing and covers every route, `/docs` and the
mounted web UI included. `parse_credentials` reads A1111's `--api-auth user:pass[,user2:pass2]`.
`error_response` is the server's one JSON error shape: `{"error": name, "detail": "<one line>"}`.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from leansd.errors import InvalidRequestError, one_line


def error_response(status: int, name: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": name, "detail": "<one line>"}` with `status`."""
    return JSONResponse({"error": name, "detail": one_line(detail)}, status_code=status, headers=headers)


class GuardMiddleware:
    """Pure ASGI middleware (runs before routing, so it covers every route incl. /docs).

    - `credentials`: {user: password}; when given, every request needs matching HTTP Basic
      credentials (compared in constant time) or gets 401.
    - State-changing requests (POST, PUT, PATCH, DELETE) that carry an `Origin` header other than
      the server's own (or one in `allowed_origins`) get 403: a web page on another site cannot
      make the browser start or stop generations.
    """

    def __init__(self, app: ASGIApp, *, credentials: dict[str, str] | None,
                 allowed_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.credentials = {u.encode(): p.encode() for u, p in (credentials or {}).items()}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.credentials and not self._authorised(headers.get("authorization", "")):
            response = error_response(401, "Unauthorized", "authentication required: send HTTP Basic credentials",
                              headers={"WWW-Authenticate": 'Basic realm="leansd"'})
            await response(scope, receive, send)
            return
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE") and "origin" in headers:
            origin = headers["origin"].rstrip("/").lower()
            own = f"{scope.get('scheme', 'http')}://{headers.get('host', '')}".lower()
            if origin != own and origin not in self.allowed_origins:
                response = error_response(403, "Forbidden", f"cross-origin request from {headers['origin']!r} refused")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not token:
            return False
        try:
            user, sep, password = base64.b64decode(token.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        if not sep:
            return False
        ok = False
        for known_user, known_password in self.credentials.items():
            # Both comparisons always run, so timing does not tell which part was wrong.
            user_ok = secrets.compare_digest(user, known_user)
            password_ok = secrets.compare_digest(password, known_password)
            ok |= user_ok & password_ok
        return ok


def parse_credentials(text: str) -> dict[str, str]:
    """`user:pass` (or several, comma-separated, as A1111's --api-auth) -> {user: pass}."""
    credentials = {}
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise InvalidRequestError("--api-auth expects user:password (several separated by commas)")
        credentials[user] = password
    return credentials
