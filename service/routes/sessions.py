"""``/v1/sessions``: predictions with stored adapted parameters, inspection, deletion."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Body, Depends, Request, Response

from service.engine import Job
from service.problems import Problem
from service.routes.deps import answer_head_as_get, decode_off_the_loop, owner, store_call
from service.routes.json_route import JSONRoute
from service.routes.models import BODY_ERRORS, SESSION_ERRORS, check_finite, iso, timing
from service.routes.schemas import SessionInfo, SessionPredictRequest, SessionPredictResponse
from service.sessions import SessionMeta
from service.tensors import decode_inputs

log = logging.getLogger("service.routes.sessions")
router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=JSONRoute)


UNKNOWN_SESSION = ("no such session: it never existed, expired, was evicted or deleted, or a reload replaced or removed "
                   "its model; adapt again")


async def _session(request: Request, session_id: str, caller: str | None):
    """The caller's live session and the model serving it; 404 when there is none, or when its model is no
    longer served in the version it was adapted with (after a reload: the session cannot predict again)."""
    session = await store_call(request, request.app.state.store.get, session_id, caller)
    if session is None:
        raise Problem(404, "Unknown session", UNKNOWN_SESSION)
    model = request.app.state.registry.get(session.model)
    if not session.adapted_from(None if model is None else model.version):
        raise Problem(404, "Unknown session", f"the session's model {session.model!r} is no longer served in that version; adapt again")
    if session.fits_version != model.version:
        problem = model.session_problem(session.tensors)
        if problem:  # (a record in a shared store that this service did not write: the operators need to know)
            log.error("session %s... does not fit model %r version %s: %s; dropping it", session_id[:8], model.name, model.version, problem)
            # Dropped as a record that does not decode is: kept, it would be read, logged and refused again on every call.
            await store_call(request, request.app.state.store.delete, session_id, caller)
            raise Problem(404, "Unknown session", f"the stored session does not fit model {model.name!r} ({problem}); adapt again")
        session.fits_version = model.version
    return session, model


@router.post("/{session_id}/predict", summary="Predict with an adapted session", response_model=SessionPredictResponse, response_model_exclude_none=True, responses=BODY_ERRORS)
async def predict_session(request: Request, session_id: str, body: SessionPredictRequest = Body(...), caller: str | None = Depends(owner)) -> SessionPredictResponse:
    """Predicts with the parameters a previous ``adapt`` stored (cheap: no adaptation)."""
    state = request.app.state
    session, model = await _session(request, session_id, caller)
    x = await decode_off_the_loop(request, (body.x,), decode_inputs, body.x, "x", model.input_shape, model.preprocessing, state.settings.max_query)
    started = time.perf_counter()
    job = Job("predict", model, query_x=x, session=session.tensors, session_prepared=session.prepared, transductive=body.transductive, owner=caller)
    result = check_finite(await state.engine.submit(job, alone=state.metrics.alone), adapted=False)
    return SessionPredictResponse(
        model=model.name,
        predictions=result["predictions"],
        probabilities=result.get("probabilities"),
        session_id=session.id,
        timing=timing(result, started),
    )


@router.get("/{session_id}", summary="Describe a session", response_model=SessionInfo, responses=SESSION_ERRORS)
async def describe_session(request: Request, session_id: str, caller: str | None = Depends(owner)) -> SessionInfo:
    session, _ = await _session(request, session_id, caller)
    return SessionInfo(
        session_id=session.id,
        model=session.model,
        created=session.created,
        expires=session.expires,
        expires_at=iso(session.expires),
        size_bytes=session.nbytes,
        meta=SessionMeta.model_validate(session.meta),  # (a Redis record's types are checked as it is read)
    )


@router.delete("/{session_id}", summary="Delete a session", status_code=204, response_class=Response, responses=SESSION_ERRORS)
async def delete_session(request: Request, session_id: str, caller: str | None = Depends(owner)) -> Response:
    deleted = await store_call(request, request.app.state.store.delete, session_id, caller)
    if not deleted:
        raise Problem(404, "Unknown session", UNKNOWN_SESSION)
    return Response(status_code=204)


answer_head_as_get(router)
