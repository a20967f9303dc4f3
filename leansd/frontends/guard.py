"""The guard in front of every route of the server (API and web UI): Host, body size, HTTP Basic auth
with a back-off after failed logins, and Origin checks.

`GuardMiddleware` is pure ASGI, so it runs before routing and covers every route, `/docs` and the
mounted web UI included. `parse_credentials` reads A1111's `--api-auth user:pass[,user2:pass2]`.
`error_response` is the server's one JSON error shape: `{"error": name, "detail": "<one line>"}`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
import time
from typing import Any, Sequence

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from leansd.errors import InvalidRequestError, one_line
from leansd.frontends.limits import DEFAULT_MAX_BODY

MAX_DETAIL = 1000
"""Characters of an error's detail sent back (a message never echoes a huge value whole)."""
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
FREE_LOGIN_FAILURES = 5
"""Failed logins from one client before the back-off starts."""
MAX_LOGIN_BACKOFF = 30.0
"""The longest wait (seconds) imposed on a client after repeated failed logins."""


def error_response(status: int, name: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"error": name, "detail": "<one line>"}` with `status` (the detail is cut at `MAX_DETAIL`)."""
    return JSONResponse({"error": name, "detail": one_line(detail, limit=MAX_DETAIL)}, status_code=status,
                        headers=headers)


def split_host(value: str) -> tuple[str, str]:
    """A Host header (or an Origin's netloc) -> (lower-case name without brackets, port or "")."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:7860
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return value, ""


def host_allowed(name: str, allowed: "set[str]") -> bool:
    """Whether a Host name may reach the server (the DNS-rebinding defence, as Jupyter and Vite do).

    IP addresses are always allowed (a rebinding page can only send its own domain name);
    names must be localhost (or *.localhost), a name the server was bound to, or listed in
    `allowed` (a leading "." allows every subdomain: ".example.org"; "*" allows any name).
    """
    if not name:
        return False
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in allowed or "*" in allowed:
        return True
    return any(entry.startswith(".") and (name.endswith(entry) or name == entry[1:]) for entry in allowed)


class GuardMiddleware:
    """Pure ASGI middleware (runs before routing, so it covers every route incl. /docs and websockets).

    In order:
    - Host (`allowed_hosts`, None: unchecked): a Host that is not an IP address, localhost or an
      allowed name gets 403, so a DNS-rebinding page (Host: evil.example) reaches nothing.
    - `credentials`: {user: password}; when given, every request needs matching HTTP Basic
      credentials (compared in constant time) or gets 401. After `FREE_LOGIN_FAILURES` wrong
      passwords from one client address, it must wait 1, 2, 4 ... `MAX_LOGIN_BACKOFF` s between
      attempts: meanwhile every request from it gets 429 with Retry-After, unchecked.
    - State-changing requests (POST, PUT, PATCH, DELETE, websockets) that carry an `Origin` header
      other than the server's own (or one in `allowed_origins`) get 403: a web page on another site
      cannot make the browser start or stop generations.
    - `max_body` (bytes, None: unlimited): a larger request body gets 413 before it is read.
    """

    def __init__(self, app: ASGIApp, *, credentials: dict[str, str] | None,
                 allowed_origins: Sequence[str] = (), allowed_hosts: Sequence[str] | None = None,
                 max_body: int | None = DEFAULT_MAX_BODY) -> None:
        self.app = app
        self.credentials = {u.encode(): p.encode() for u, p in (credentials or {}).items()}
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins}
        # None: no Host check (an app built for tests or behind a proxy that checks it).
        self.allowed_hosts = None if allowed_hosts is None else {h.strip().lower().strip("[]") for h in allowed_hosts}
        self.max_body = max_body
        self._failures: dict[str, tuple[int, float]] = {}  # client address -> (failed logins, locked until)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await refusal(scope, receive, send)
            return
        if scope["type"] == "http" and self.max_body is not None:
            await self._limited(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> JSONResponse | None:
        """The response that refuses this request, or None to let it through."""
        if self.allowed_hosts is not None:
            name, _ = split_host(headers.get("host", ""))
            if not host_allowed(name, self.allowed_hosts):
                shown = one_line(repr(headers.get("host", "")), limit=80)
                return error_response(403, "Forbidden", f"Host {shown} is not a name this server answers to; "
                                      "start it with --allowed-hosts NAME to allow it")
        if self.credentials:
            refusal = self._login(scope, headers.get("authorization", ""))
            if refusal is not None:
                return refusal
        method = scope.get("method", "GET")
        if (method in ("POST", "PUT", "PATCH", "DELETE") or scope["type"] == "websocket") and "origin" in headers:
            origin = headers["origin"].rstrip("/").lower()
            scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
            own = f"{scheme}://{headers.get('host', '')}".lower()
            if origin != own and origin not in self.allowed_origins:
                shown = one_line(repr(headers["origin"]), limit=80)
                return error_response(403, "Forbidden", f"cross-origin request from {shown} refused")
        return None

    def _login(self, scope: Scope, header: str) -> JSONResponse | None:
        """401 without valid credentials; 429 while the client is backing off after failed logins."""
        client = (scope.get("client") or ("?", 0))[0]
        now = time.monotonic()
        failures, locked_until = self._failures.get(client, (0, 0.0))
        if now < locked_until and header:  # no guess is checked while the client backs off
            wait = max(1, round(locked_until - now))
            return error_response(429, "TooManyRequests",
                                  f"too many failed logins from {client}; retry in {wait} s",
                                  headers={"Retry-After": str(wait)})
        if self._authorised(header):
            self._failures.pop(client, None)
            return None
        if header:  # a wrong password, not a browser's first request without credentials
            failures += 1
            backoff = 0.0 if failures <= FREE_LOGIN_FAILURES else min(
                MAX_LOGIN_BACKOFF, 2.0 ** (failures - FREE_LOGIN_FAILURES - 1))
            if len(self._failures) > 10_000:  # forget clients that stopped trying
                self._failures = {k: v for k, v in self._failures.items() if v[1] > now - 600}
            self._failures[client] = (failures, now + backoff)
        return error_response(401, "Unauthorized", "authentication required: send HTTP Basic credentials",
                              headers={"WWW-Authenticate": 'Basic realm="leansd"'})

    async def _limited(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Pass the request on with its body capped at `max_body`: 413 before reading a larger one."""
        limit = self.max_body
        assert limit is not None  # only called with a limit
        too_large = error_response(
            413, "PayloadTooLarge",
            f"the request body is larger than this server's limit of {limit // 2**20} MiB (--max-body)")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        if length.isdigit() or scope.get("method") in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # the server holds a client to its Content-Length
            return
        # A chunked body (no Content-Length): read it up to the limit first, then hand it on.
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > limit:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

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
