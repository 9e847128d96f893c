"""RFC 9457 problem details: every error the service answers is ``application/problem+json``.

``raise Problem(422, "Wrong tensor shape", "support.x: expected rank 4 ...")`` anywhere in
a route gives::

    {"type": "https://metalearn.dev/problems/wrong-tensor-shape", "title": "Wrong tensor shape",
     "status": 422, "detail": "support.x: expected rank 4 ...", "instance": "/v1/models/m/adapt"}

:func:`install` adds handlers for request validation errors and HTTP errors (404,
405, ...); the middleware :class:`UnexpectedErrors` makes even an unexpected exception a JSON
problem (with the request's id, ``service.request_ids``); :class:`BodySizeLimit` answers ``413`` for bodies over the limit,
counting the bytes as they arrive (a lying or missing Content-Length does not help).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from service.request_ids import logged_path, request_id

log = logging.getLogger("service")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://metalearn.dev/problems/"


class Problem(Exception):
    """An error answered as a problem document."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type or problem_type(title)
        self.headers = headers or {}
        self.extra = extra

    def body(self, instance: str | None = None) -> dict:
        body = {"type": self.type, "title": self.title, "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


def problem_response(problem: Problem, instance: str | None = None) -> JSONResponse:
    return JSONResponse(problem.body(instance), status_code=problem.status, headers=problem.headers, media_type=PROBLEM_MEDIA_TYPE)


# Every problem the service answers with: title -> (status, when). A problem's ``type`` is
# TYPE_BASE + the title's slug. Listed in /openapi.json's Problem schema and in the README, so that a
# client can branch on ``type`` without finding the values by trial; tests/test_api_contract.py checks
# that every title the code raises is here and in the README.
PROBLEM_TYPES: dict[str, tuple[int, str]] = {
    "Malformed JSON": (400, "the body is not valid JSON (the detail says where)"),
    "Bad request": (400, "a request HTTP itself refuses (a CORS preflight from an origin not allowed)"),
    "Unauthorized": (401, "API keys are configured and the call has none, an unknown one, or several"),
    "Not found": (404, "no such route"),
    "Unknown model": (404, "no model of that name is loaded (the detail lists those that are)"),
    "Unknown session": (404, "the session never existed, expired, was evicted or deleted, belongs to another key, or its model has since been reloaded in another version"),
    "Method not allowed": (405, "the route exists but not with this method (the Allow header lists those it takes)"),
    "Request timeout": (408, "the body stopped arriving for METALEARN_BODY_TIMEOUT_S seconds"),
    "Request body too large": (413, "the body is over METALEARN_MAX_BODY_BYTES, or holds more comma-separated values than METALEARN_MAX_LIST_VALUES"),
    "Unsupported media type": (415, "a body that is not plain application/json (another Content-Type, or a Content-Encoding such as gzip)"),
    "Invalid request": (422, "the body does not match the schema: `errors` lists each field (`loc`, `msg`, `type`)"),
    "Invalid tensor": (422, "a tensor that cannot be read: not a rectangular array of numbers, bad base64, a byte count unlike the shape, an image that does not decode or is too large"),
    "Wrong tensor shape": (422, "the tensor's shape is not [N, *input_shape] for this model, or labels/targets do not match the inputs"),
    "Empty input": (422, "no examples, or an empty image list"),
    "Too many examples": (422, "more support or query examples than METALEARN_MAX_SUPPORT / METALEARN_MAX_QUERY"),
    "Non-finite values": (422, "NaN or infinite values (a number beyond float32's range becomes infinite)"),
    "Invalid labels": (422, "labels that are not integer class indices in [0, n_way), or a class with no support example"),
    "Invalid inner_steps": (422, "inner_steps outside [0, METALEARN_MAX_INNER_STEPS]"),
    "Too much computation": (422, "support examples x inner_steps over METALEARN_MAX_EXAMPLE_STEPS (a bound on one request's computation)"),
    "Invalid inner_lr": (422, "inner_lr outside [METALEARN_MIN_INNER_LR, METALEARN_MAX_INNER_LR]"),
    "Invalid ttl_s": (422, "ttl_s outside [1, METALEARN_MAX_SESSION_TTL_S]"),
    "Adaptation diverged": (422, "adaptation produced non-finite parameters or a non-finite support loss: a smaller inner_lr, fewer steps, or inputs in the range the model was trained on"),
    "Inputs refused by the model": (422, "the model's own code (a registered architecture's forward) raised on these inputs: an index past an nn.Embedding's vocabulary, say"),
    "Prediction not finite": (422, "the adapted model's outputs for the query are NaN or infinite: query inputs far outside the range the model was trained on"),
    "Internal error": (500, "a bug: `request_id` finds the operator's log line"),
    "Overloaded": (503, "the queue is full: retry after Retry-After seconds"),
    "Timed out": (503, "the request waited past METALEARN_REQUEST_TIMEOUT_S: retry after Retry-After seconds"),
    "Not ready": (503, "no model loaded, the workers stopped, the service is draining before it stops, or a reload replaced the model while it adapted"),
    "Session store unavailable": (503, "the session store (Redis) cannot be reached: retry after Retry-After seconds"),
}


def problem_type(title: str) -> str:
    return TYPE_BASE + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# The titles of problems raised as plain HTTP errors (Starlette's 404 and 405, a refused preflight).
_STATUS_TITLES = {400: "Bad request", 401: "Unauthorized", 404: "Not found", 405: "Method not allowed", 408: "Request timeout", 413: "Request body too large", 415: "Unsupported media type", 422: "Invalid request", 503: "Not ready"}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _loc(loc) -> str:
    return ".".join(str(part) for part in loc if part != "body") or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(exc, request.scope["path"])

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
        if broken is not None:
            # The parser's own words say where ("... at line 1 column 5") and why (nesting too deep, say).
            reason = str(broken.get("ctx", {}).get("error") or "").strip()
            problem = Problem(400, "Malformed JSON", "the request body is not valid JSON" + (f": {reason}" if reason else ""))
            return problem_response(problem, request.scope["path"])
        parts, simple = [], []
        for e in errors[:20]:
            where = _loc(e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg')}")
            simple.append({"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))})
        problem = Problem(422, "Invalid request", "; ".join(parts) or "invalid request", errors=simple)
        return problem_response(problem, request.scope["path"])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        title = _STATUS_TITLES.get(exc.status_code, "Bad request" if exc.status_code < 500 else "Internal error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.scope['path']!r}"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path alone (GET of
            # /v1/sessions/{id}, not its DELETE, declared as a route of its own): ask every route.
            probe = {**request.scope, "root_path": request.scope.get("app_root_path", "")}  # (a Mount routed it: its own root)
            routes = [r for r in request.app.routes if not isinstance(r, Mount)]  # (a mount matches any method)
            allowed = [m for m in _METHODS if any(r.matches({**probe, "method": m})[0] == Match.FULL for r in routes)]
            if allowed:
                headers["Allow"] = ", ".join(allowed)
                detail = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
        if exc.status_code in (408, 413):  # the body was not read to its end: the connection cannot serve another request
            headers["Connection"] = "close"
        problem = Problem(exc.status_code, title, detail, headers=headers)
        return problem_response(problem, request.scope["path"])


class UnexpectedErrors:
    """ASGI middleware, the outermost: an exception no handler took (a bug) is logged once, with its request id,
    and answered with a 500 problem; the connection stays open for the client's next request.

    Not ``app.exception_handler(Exception)``: Starlette answers with that handler from its outermost layer and
    then raises the exception again for the server, which logs it a second time and closes the connection, so
    a client's next request on it (a keep-alive reuse, or one already sent) failed with a reset."""

    def __init__(self, app, cors: dict | None = None):
        self.app = app
        self.cors = cors  # ProblemCORS's settings, if any: the CORS middleware is inside, and a page reads a 500 only with its headers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:  # an answer half sent: only closing the connection can end it
                raise
            # Outside the middleware that sets the id header: it goes in by hand.
            rid = request_id(Request(scope))
            log.exception("unexpected error on %s %s (request id %s)", scope["method"], logged_path(scope), rid)
            extra = {"request_id": rid, "headers": {"X-Request-ID": rid}} if rid else {}
            problem = Problem(500, "Internal error", f"unexpected {type(exc).__name__}; the service keeps running", **extra)
            answer = problem_response(problem, scope["path"])
            await (answer if self.cors is None else ProblemCORS(answer, **self.cors))(scope, receive, send)


class ProblemCORS(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered as a ``bad-request`` problem (its own
    answer is the plain text "Disallowed CORS origin", say)."""

    def preflight_response(self, request_headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = response.body.decode().removeprefix("Disallowed CORS ")  # what Starlette lists: origin, method, headers
        asked = [h.strip().lower() for h in request_headers.get("access-control-request-headers", "").split(",") if h.strip()]
        unknown = [h for h in asked if h not in self.allow_headers]
        named = f" (headers it may not send: {', '.join(unknown)}; it may send {', '.join(self.allow_headers)})" if unknown else ""
        verb = "are" if refused == "headers" or "," in refused else "is"
        problem = Problem(400, "Bad request", f"this cross-origin request's {refused} {verb} not allowed here{named} "
                                              "(METALEARN_CORS_ORIGINS, and the methods and headers the API takes)")
        answer = problem_response(problem)
        for name, value in response.headers.items():  # (its Vary and Access-Control-* headers)
            if name not in ("content-type", "content-length"):
                answer.headers[name] = value
        return answer


class _BodyRefused(StarletteHTTPException):
    """Raised from ``receive`` when the body grows past the limit, or stalls (an HTTPException, so FastAPI re-raises it)."""

    def __init__(self, problem: Problem):
        super().__init__(problem.status, problem.detail)
        self.problem = problem


class BodySizeLimit:
    """ASGI middleware: ``413`` when a request body exceeds ``max_bytes``; ``408`` when it stops arriving for
    ``idle_s`` seconds (a stalled upload would otherwise hold its connection and buffer for good).

    The stalls are found by one watchdog task that looks every second at the bodies being read, rather
    than by a timer around each ``receive`` (8 us a request, where a body is mostly in at once)."""

    def __init__(self, app, max_bytes: int, idle_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self._reading: dict[asyncio.Task, float] = {}  # tasks waiting for body bytes -> since when
        self._stalled: set[asyncio.Task] = set()
        self._watchdog: asyncio.Task | None = None

    async def _watch(self) -> None:
        """Cancel the body reads that have waited ``idle_s``; ends when none is waiting (started again by the next)."""
        while self._reading:
            await asyncio.sleep(min(1.0, self.idle_s / 2))
            deadline = time.monotonic() - self.idle_s
            for task, since in list(self._reading.items()):
                if since < deadline and task not in self._stalled:
                    self._stalled.add(task)
                    task.cancel()

    async def _read(self, receive) -> dict:
        """One ``receive`` of body bytes, under the watchdog's eye."""
        task = asyncio.current_task()
        self._reading[task] = time.monotonic()
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.ensure_future(self._watch())
        try:
            return await receive()
        except asyncio.CancelledError:
            if task not in self._stalled:
                raise
            self._stalled.discard(task)
            task.uncancel()
            raise _BodyRefused(Problem(408, "Request timeout", f"the request body stopped arriving for {self.idle_s:g} s")) from None
        finally:
            self._reading.pop(task, None)

    @staticmethod
    async def _reject(scope, send, problem: Problem) -> None:
        body = json.dumps(problem.body(scope.get("path"))).encode()
        await send(
            {
                "type": "http.response.start",
                "status": problem.status,
                "headers": [(b"content-type", PROBLEM_MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _too_large(self) -> Problem:
        return Problem(413, "Request body too large", f"the request body exceeds the limit of {self.max_bytes} bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    return await self._reject(scope, send, self._too_large())
        received = 0
        started = False
        complete = False

        async def counting_receive():
            nonlocal received, complete
            if complete:  # the body is in: later calls wait for a disconnect, as long as it takes
                return await receive()
            message = await self._read(receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyRefused(self._too_large())
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyRefused as refused:
            if not started:
                await self._reject(scope, send, refused.problem)
