"""Request ids: every answer carries an ``X-Request-ID`` header, so that a caller and an operator can name the same request.

A caller may send its own id (a tracing system's, a load balancer's): one of 1-128
characters from ``A-Z a-z 0-9 . _ : -`` is kept and echoed; anything else is replaced
by a fresh random one, so the logs never carry what a caller typed. The id is in
``request.state.request_id`` for the handlers: the answer to an unexpected error
puts it in its problem body and in its log line.

The same middleware writes each request's access line (logger ``service.access``,
INFO; see :mod:`service.logs`): method, the route's template rather than the path
(a session id in a path is as good as a key where there are no API keys: it stays
out of the logs), status, duration and id.
"""

from __future__ import annotations

import logging
import os
import re
import time

from starlette.requests import Request

HEADER = b"x-request-id"
_ACCEPTED = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# The segment after "sessions", however many slashes surround it: a client whose base URL ends in "/" sends
# //v1/sessions/ID, which no route takes (a review found such ids in the access lines).
_SESSION_IN_PATH = re.compile(r"(/sessions/+)[^/]+")
access_log = logging.getLogger("service.access")


def logged_path(scope) -> str:
    """The route's template, or for a request no route took (a wrong method, say) its path with any session id
    replaced."""
    template = getattr(scope.get("route"), "path", None)
    return template or _SESSION_IN_PATH.sub(r"\1{session_id}", scope["path"])


def request_id(request: Request) -> str | None:
    """The id of ``request`` (None outside :class:`RequestIds`)."""
    return request.scope.get("state", {}).get("request_id")


class RequestIds:
    """ASGI middleware giving each HTTP request an id (``X-Request-ID``, echoed or made) in its answer and its
    state, and writing its access line."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        rid = given if given is not None and _ACCEPTED.fullmatch(given) else os.urandom(12).hex().encode()
        # The server's per-request copy of the lifespan state, or a new one: starlette's request.state reads it.
        scope.setdefault("state", {})["request_id"] = rid.decode()
        status = 500  # unless an answer starts: an exception goes on to problems.UnexpectedErrors, which says 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if access_log.isEnabledFor(logging.INFO):
                path = logged_path(scope)
                milliseconds = 1000 * (time.perf_counter() - start)
                client = (scope.get("client") or (None,))[0]
                access_log.info("%s %s %d %.1f ms id=%s", scope["method"], path, status, milliseconds, rid.decode(), extra={
                    "method": scope["method"], "path": path, "status": status, "duration_ms": round(milliseconds, 3),
                    "request_id": rid.decode(), "client": client})
