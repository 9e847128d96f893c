"""``/healthz`` (the process answers) and ``/readyz`` (models loaded, worker running)."""

from __future__ import annotations

import os

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from service.problems import PROBLEM_MEDIA_TYPE, Problem
from service.routes.deps import answer_head_as_get

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str = Field(..., examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(..., examples=["ready"])
    models: list[str] = Field(..., description="The models served.")
    queue_depth: int = Field(..., description="Requests waiting for a worker.")
    skipped: dict[str, str] = Field(..., description="Checkpoints that did not load (their path in the model directory), with the reason.")


@router.get("/healthz", summary="Liveness", response_model=Health)
async def healthz() -> dict:  # on the event loop: a probe never waits for a thread (a hung store holds some)
    """200 whenever the process is serving HTTP."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    response_model=Readiness,
    responses={503: {"description": "No model loaded, the worker is not running, or the service is draining before it stops", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
async def readyz(request: Request) -> dict:
    """200 when at least one model is loaded and the adaptation worker is running."""
    state = request.app.state
    if getattr(state, "draining", False):
        raise Problem(503, "Not ready", "draining: the service received SIGTERM and stops soon (METALEARN_DRAIN_S)", headers={"Retry-After": "5"})
    registry = getattr(state, "registry", None)
    engine = getattr(state, "engine", None)
    if registry is None or engine is None or not engine.running:
        raise Problem(503, "Not ready", "the adaptation worker is not running", headers={"Retry-After": "1"})
    if not registry.names():
        raise Problem(503, "Not ready", "no model loaded: no checkpoint in the model directory loads (the log says why for each)", headers={"Retry-After": "5"})
    # The skipped checkpoints by their place in the model directory: where that lies on the host is the operator's.
    relative = {path: os.path.relpath(path, state.settings.model_dir) for path in registry.errors}
    skipped = {relative[path]: reason.replace(path, relative[path]) for path, reason in registry.errors.items()}
    return {"status": "ready", "models": registry.names(), "queue_depth": engine.depth(), "skipped": skipped}


answer_head_as_get(router)
