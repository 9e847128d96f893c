"""``/healthz`` (the process answers) and ``/readyz`` (models loaded, worker running)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.problems import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness", responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
def healthz() -> dict:
    """200 whenever the process is serving HTTP."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness",
    responses={
        200: {"content": {"application/json": {"example": {"status": "ready", "models": ["omniglot"], "queue_depth": 0}}}},
        503: {"description": "No model loaded, the worker is not running, or the service is draining before it stops"},
    },
)
def readyz(request: Request) -> dict:
    """200 when at least one model is loaded and the adaptation worker is running."""
    state = request.app.state
    if getattr(state, "draining", False):
        raise Problem(503, "Not ready", "draining: the service received SIGTERM and stops soon (METALEARN_DRAIN_S)", headers={"Retry-After": "5"})
    registry = getattr(state, "registry", None)
    engine = getattr(state, "engine", None)
    if registry is None or engine is None or not engine.running:
        raise Problem(503, "Not ready", "the adaptation worker is not running", headers={"Retry-After": "1"})
    if not registry.names():
        raise Problem(503, "Not ready", f"no model loaded from {state.settings.model_dir!r}", headers={"Retry-After": "5"})
    return {"status": "ready", "models": registry.names(), "queue_depth": engine.depth(), "skipped": registry.errors}
