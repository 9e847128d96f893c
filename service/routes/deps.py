"""Shared route helpers: API-key owners, the app's components, request limits."""

from __future__ import annotations

import hmac
import math
from typing import Any

import anyio
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.problems import Problem

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (when the service has keys configured).")
bearer = HTTPBearer(auto_error=False, description="An API key as a bearer token (when the service has keys configured).")


async def owner(
    request: Request,
    header_key: str | None = Depends(api_key_header),
    credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
) -> str | None:
    """The owner id (hash of the API key) of this call; ``None`` when the service has no keys.

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency
    in its thread pool, a thread round trip on every request (a quarter of the
    event loop's time per session predict, measured with py-spy)."""
    owners: dict[str, str] = request.app.state.owners
    if not owners:
        return None
    given = header_key or (credentials.credentials if credentials else None)
    if given:
        match = None
        for key, owner_id in owners.items():
            if hmac.compare_digest(key.encode(), given.encode()):
                match = owner_id
        if match is not None:
            return match
        raise Problem(401, "Unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    raise Problem(401, "Unauthorized", "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})


def get_model(request: Request, name: str):
    model = request.app.state.registry.get(name)
    if model is None:
        known = request.app.state.registry.names()
        raise Problem(404, "Unknown model", f"no model {name!r}; loaded models: {', '.join(known) or 'none'}")
    return model


def check_inner(settings, steps: int | None, lr: float | None, model) -> tuple[int, float]:
    steps = model.inner_steps if steps is None else steps
    lr = model.inner_lr if lr is None else lr
    if steps < 0 or steps > settings.max_inner_steps:
        raise Problem(422, "Invalid inner_steps", f"inner_steps must be in [0, {settings.max_inner_steps}], got {steps}")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or not (settings.min_inner_lr <= lr <= settings.max_inner_lr):
        raise Problem(422, "Invalid inner_lr", f"inner_lr must be in [{settings.min_inner_lr:g}, {settings.max_inner_lr:g}], got {lr}")
    return int(steps), float(lr)


def uses_images(value: Any) -> bool:
    from service.tensors import ImageList

    return isinstance(value, ImageList)


async def maybe_offload(needs_thread: bool, fn, *args):
    """Run ``fn`` in a worker thread when it may be slow (image decoding), inline otherwise."""
    if needs_thread:
        return await anyio.to_thread.run_sync(fn, *args)
    return fn(*args)


async def store_call(request: Request, fn, *args):
    """Session store calls: inline for the in-memory store, in a thread for network stores."""
    from service.sessions import MemorySessionStore

    if isinstance(request.app.state.store, MemorySessionStore):
        return fn(*args)
    return await anyio.to_thread.run_sync(fn, *args)
