"""Shared route helpers: API-key owners, the app's components, request limits."""

from __future__ import annotations

import asyncio
import hmac
import math
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.problems import Problem
from service.settings import usable_cores

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (when the service has keys configured).")
bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token (when the service has keys configured).")


def caller(request: Request) -> str | None:
    """The owner id (hash of the API key) of this call; ``None`` when the service has no keys.

    The key comes as ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. A missing
    or unknown key is a 401 problem."""
    owners: dict[str, str] = request.app.state.owners
    if not owners:
        return None
    if len(request.headers.getlist("x-api-key")) > 1 or len(request.headers.getlist("authorization")) > 1:
        # (Which one would count? The proxy's rate limit reads them joined, as a key of their own: sending
        # the real key with a different second one each time would escape it.)
        raise _unauthorized("several API keys: send one X-API-Key or Authorization header")
    given = request.headers.get("x-api-key")
    if not given:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if given:
        match = None
        for key, owner_id in owners.items():
            if hmac.compare_digest(key.encode(), given.encode()):
                match = owner_id
        if match is not None:
            return match
        raise _unauthorized("the API key is not valid")
    raise _unauthorized("an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "Unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


async def owner(request: Request, _key: str | None = Depends(api_key_header), _token: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str | None:
    """``caller`` as a dependency: ``caller: str | None = Depends(owner)``.

    The two sub-dependencies only declare the security schemes, so that ``/docs``
    has its Authorize button; :class:`service.routes.json_route.JSONRoute` calls
    ``caller`` directly and skips them."""
    return caller(request)


def get_model(request: Request, name: str):
    model = request.app.state.registry.get(name)
    if model is None:
        known = request.app.state.registry.names()
        raise Problem(404, "Unknown model", f"no model {name!r}; loaded models: {', '.join(known) or 'none'}")
    return model


def check_inner(settings, steps: int | None, lr: float | None, model) -> tuple[int, float | None]:
    """The request's inner steps and learning rate, else the model's (``LoadedModel.default_lr``); the lr is None
    when neither sets one and the model learned its own (Meta-SGD, per-step rates): the engine then adapts with
    those."""
    steps = model.inner_steps if steps is None else steps
    if lr is None:
        lr = model.default_lr
    if steps < 0 or steps > settings.max_inner_steps:
        raise Problem(422, "Invalid inner_steps", f"inner_steps must be in [0, {settings.max_inner_steps}], got {steps}")
    if lr is None:
        return int(steps), None
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or not (settings.min_inner_lr <= lr <= settings.max_inner_lr):
        raise Problem(422, "Invalid inner_lr", f"inner_lr must be in [{settings.min_inner_lr:g}, {settings.max_inner_lr:g}], got {lr}")
    return int(steps), float(lr)


def check_work(settings, examples: int, steps: int, model) -> None:
    """A request's support examples x inner steps within ``max_example_steps``: once a computation runs it
    cannot be stopped, so a request that timed out would hold its worker for nobody (a security review:
    two requests of 512 examples x 100 steps every 50 s kept a Conv4-64 service's workers busy). The work
    is counted by ``LoadedModel.example_steps``; the engine bounds a batch's work by the same limit."""
    from metalearn.adaptation import SHIFTED_VIEWS

    work = model.example_steps(examples, steps)
    if work > settings.max_example_steps:
        counted = (f"{examples * SHIFTED_VIEWS} support examples (with their shifted views)" if model.support_shift
                   else f"{examples} support examples")
        head_only = model.learner.head_only
        if not head_only:
            counted += f" x {steps} inner steps"
        raise Problem(422, "Too much computation", f"{counted} = {work} example-steps, over this service's limit of "
                      f"{settings.max_example_steps} (it bounds one request's computation): send fewer examples"
                      + ("" if head_only else " or ask for fewer inner_steps"))


def _uses_images(value: Any) -> bool:
    from service.tensors import ImageList

    return isinstance(value, ImageList)


async def decode_off_the_loop(request: Request, inputs: tuple, fn, *args):
    """``fn(*args)``, the decoding of a request's ``inputs``: in a worker thread when any is a list of pictures
    (Pillow decodes without the GIL), inline otherwise (numbers are read holding it: a thread would not free the
    event loop). At most ``DECODE_THREADS`` at once: uploads that are slow to decode (pictures that decompress to
    many pixels) then wait for one another instead of taking every thread and core from everything else."""
    if any(_uses_images(value) for value in inputs):
        return await anyio.to_thread.run_sync(fn, *args, limiter=request.app.state.decode_threads)
    return fn(*args)


DECODE_THREADS = usable_cores()  # (what decoding can use at once: the cores)


async def store_call(request: Request, fn, *args):
    """Session store calls: inline for the in-memory store, in a thread for network stores, at most
    ``STORE_THREADS`` at once: a hung Redis then holds those threads, not the pool that image decoding and
    the health probes share."""
    from service.sessions import MemorySessionStore

    if isinstance(request.app.state.store, MemorySessionStore):
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args, limiter=request.app.state.store_threads)


STORE_THREADS = 16  # (the app's lifespan makes the limiter: it needs the running event loop)


# Jobs done sooner are not watched: a watch costs a task (35 us here, several percent of a fast request).
WATCH_AFTER_S = 0.05


class ClientGone(Exception):
    """The client closed its connection before its answer was ready (``JSONRoute`` answers 499)."""


async def compute_unless_client_gone(request: Request, engine, job) -> Any:
    """``engine.submit(job)``, unless the client closes its connection while the job waits in the queue:
    then the job is dropped, not computed for nobody, and ``ClientGone`` raised. A job still waiting after
    ``WATCH_AFTER_S`` starts the watch."""
    watch: asyncio.Future | None = None

    def gone(done: asyncio.Future) -> None:
        if not done.cancelled() and done.exception() is None and done.result()["type"] == "http.disconnect":
            job.future.cancel()  # (a job already computing runs to its end)

    def start_watching() -> None:
        nonlocal watch
        watch = asyncio.ensure_future(request.receive())  # after the body, a server's receive() waits for the disconnect
        watch.add_done_callback(gone)

    later = asyncio.get_running_loop().call_later(WATCH_AFTER_S, start_watching)
    try:
        return await engine.submit(job)
    except asyncio.CancelledError:
        if job.future.cancelled() and watch is not None and watch.done() and not watch.cancelled():
            raise ClientGone from None
        raise
    finally:
        later.cancel()
        if watch is not None:
            watch.cancel()


def answer_head_as_get(router: APIRouter) -> None:
    """Every ``GET`` route of ``router`` answers ``HEAD`` too (RFC 9110; the load balancers and uptime checks that
    probe with it), by the same endpoint: the server sends the answer without its body. Called once per router,
    after its routes. The twins stay out of the OpenAPI document, where each would be a second operation of the
    same id."""
    for route in list(router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            router.add_api_route(
                route.path.removeprefix(router.prefix), route.endpoint, methods=["HEAD"], include_in_schema=False,
                name=route.name, response_model=route.response_model, response_class=route.response_class,
                response_model_exclude_none=route.response_model_exclude_none, route_class_override=type(route),
            )
