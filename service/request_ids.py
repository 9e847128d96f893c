"""Request ids: every answer carries an ``X-Request-ID`` header, so that a caller and an operator can name the same request.

A caller may send its own id (a tracing system's, a load balancer's): one of 1-128
characters from ``A-Z a-z 0-9 . _ : -`` is kept and echoed; anything else is replaced
by a fresh random one, so the logs never carry what a caller typed. The id is in
``request.state.request_id`` for the handlers: the answer to an unexpected error
puts it in its problem body and in its log line.
"""

from __future__ import annotations

import os
import re

from starlette.requests import Request

HEADER = b"x-request-id"
_ACCEPTED = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(request: Request) -> str | None:
    """The id of ``request`` (None outside :class:`RequestIds`)."""
    return request.scope.get("state", {}).get("request_id")


class RequestIds:
    """ASGI middleware giving each HTTP request an id (``X-Request-ID``, echoed or made) in its answer and its state."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = next((value for name, value in scope["headers"] if name == HEADER), None)
        rid = given if given is not None and _ACCEPTED.fullmatch(given) else os.urandom(12).hex().encode()
        # The server's per-request copy of the lifespan state, or a new one: starlette's request.state reads it.
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)
