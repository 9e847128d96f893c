"""``/v1/models``: what is served, adaptation (creating a session) and stateless adapt-and-predict."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Body, Depends, Request, Response

from service.engine import Job
from service.problems import Problem
from service.routes.deps import answer_head_as_get, check_inner, check_work, compute_unless_client_gone, decode_off_the_loop, get_model, owner, store_call
from service.routes.json_route import JSONRoute
from service.routes.schemas import AdaptRequest, AdaptResponse, Limits, ModelInfo, ModelList, PredictRequest, PredictResponse, Timing
from service.sessions import Session, new_session_id
from service.tensors import MAX_IMAGE_SIDE, MAX_LIST_PIXELS, ImageList, decode_inputs, decode_labels, decode_targets

router = APIRouter(prefix="/v1/models", tags=["models"], route_class=JSONRoute)

PROBLEM = {"content": {"application/problem+json": {}}, "description": "Problem details (RFC 9457)"}
# The error statuses each kind of operation answers (the OpenAPI document's responses). 408 and 413 come from
# the body limits (service.problems.BodySizeLimit), 500 from a bug (UnexpectedErrors), 503 from the queue, the
# workers or the session store.
BODY_ERRORS = dict.fromkeys((400, 401, 404, 408, 413, 415, 422, 500, 503), PROBLEM)
SESSION_ERRORS = dict.fromkeys((401, 404, 500, 503), PROBLEM)
MODEL_ERRORS = dict.fromkeys((401, 404, 500), PROBLEM)


def limits(settings) -> Limits:
    return Limits(
        max_support=settings.max_support,
        max_query=settings.max_query,
        max_inner_steps=settings.max_inner_steps,
        max_example_steps=settings.max_example_steps,
        min_inner_lr=settings.min_inner_lr,
        max_inner_lr=settings.max_inner_lr,
        default_ttl_s=settings.session_ttl_s,
        max_ttl_s=settings.max_session_ttl_s,
        max_body_bytes=settings.max_body_bytes,
        max_image_side=MAX_IMAGE_SIDE,
        max_list_pixels=MAX_LIST_PIXELS,
        max_list_values=settings.max_list_values,
    )


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def decode_support(model, support, settings, steps: int):
    """The support set's inputs and labels (or targets), its size within the limits for ``steps`` inner steps.
    Sent as pictures, which take up to seconds to decode, the labels and the limits are checked first."""

    def labels(count: int):
        check_work(settings, count, steps, model)
        if model.task_type == "classification":
            return decode_labels(support.y, "support.y", count, model.n_way)
        return decode_targets(support.y, "support.y", count, model.out_features)

    pictures = support.x.images if isinstance(support.x, ImageList) else None
    if pictures and len(pictures) <= settings.max_support:  # (none, or too many: decode_inputs says so)
        y = labels(len(pictures))
        return decode_inputs(support.x, "support.x", model.input_shape, model.preprocessing, settings.max_support), y
    x = decode_inputs(support.x, "support.x", model.input_shape, model.preprocessing, settings.max_support)
    return x, labels(x.shape[0])


def check_finite(result: dict, adapted: bool = True, predicted: bool = False) -> dict:
    """A diverged adaptation (non-finite parameters or outputs) is the request's fault (its settings, or
    its inputs): 422, not a 500. ``adapted``: whether this request adapted (a session predict did not);
    ``predicted``: whether it predicted a query too (a stateless predict)."""
    if result.get("diverged"):
        if not adapted:
            raise Problem(422, "Prediction not finite", "the session's predictions are non-finite: are the inputs in the range the model was trained on?")
        losses = (result.get("support_loss_before"), result.get("support_loss_after"))
        if predicted and all(isinstance(v, float) and math.isfinite(v) for v in losses):
            # The loss after is taken at the adapted parameters: finite, they held; the query's outputs did not.
            raise Problem(422, "Prediction not finite", f"the adaptation held (support loss {losses[0]} -> {losses[1]}), but the "
                          "query's predictions are non-finite: are the query inputs in the range the model was trained on?")
        raise Problem(
            422,
            "Adaptation diverged",
            "adaptation produced non-finite parameters or outputs "
            f"(support loss {result.get('support_loss_before')} -> {result.get('support_loss_after')}); "
            "use a smaller inner_lr or fewer inner_steps, with inputs in the range the model was trained on",
        )
    return result


def timing(result: dict, started: float) -> Timing:
    return Timing(
        total_ms=(time.perf_counter() - started) * 1000.0,
        compute_ms=result["compute_seconds"] * 1000.0,
        batch_size=result["batch_size"],
    )


@router.get("", summary="List the models", response_model=ModelList, responses=dict.fromkeys((401, 500), PROBLEM))
async def list_models(request: Request, _owner: str | None = Depends(owner)) -> dict:
    registry = request.app.state.registry
    return {"models": [registry.get(n).info() for n in registry.names()], "limits": limits(request.app.state.settings)}


@router.get("/{name}", summary="Describe a model", response_model=ModelInfo, responses=MODEL_ERRORS)
async def describe_model(request: Request, name: str, _owner: str | None = Depends(owner)) -> dict:
    return get_model(request, name).info()


@router.post("/{name}/adapt", summary="Adapt to a support set (creates a session)", status_code=201, response_model=AdaptResponse, responses=BODY_ERRORS)
async def adapt_model(request: Request, response: Response, name: str, body: AdaptRequest = Body(...), caller: str | None = Depends(owner)) -> AdaptResponse:
    """Adapts the model to the support set and keeps the adapted parameters in a session for later predictions."""
    state = request.app.state
    settings = state.settings
    model = get_model(request, name)
    steps, lr = check_inner(settings, body.inner_steps, body.inner_lr, model)
    ttl = settings.session_ttl_s if body.ttl_s is None else body.ttl_s
    if not 1 <= ttl <= settings.max_session_ttl_s:
        raise Problem(422, "Invalid ttl_s", f"ttl_s must be in [1, {settings.max_session_ttl_s}], got {ttl}")
    x, y = await decode_off_the_loop(request, (body.support.x,), decode_support, model, body.support, settings, steps)
    if state.store.failed_recently():  # (Redis down a moment ago: not an adaptation computed for a store that is still down)
        await store_call(request, state.store.check)
    started = time.perf_counter()
    job = Job("adapt", model, support_x=x, support_y=y, steps=steps, lr=lr, keep_session=True, owner=caller)
    result = check_finite(await compute_unless_client_gone(request, state.engine, job))
    state.metrics.adaptation.labels(model.name).observe(time.perf_counter() - started)
    created = time.time()
    session = Session(
        id=new_session_id(),
        model=model.name,
        owner=caller,
        created=created,
        expires=created + ttl,
        tensors=result["tensors"],
        meta={
            "model_version": model.version,
            "inner_steps": steps,
            "inner_lr": lr,
            "support_size": int(x.shape[0]),
            "support_loss_before": result["support_loss_before"],
            "support_loss_after": result["support_loss_after"],
        },
    )
    session.fits_version = model.version  # (made here: a store that hands this object back needs no layout check)
    await store_call(request, state.store.put, session)
    served = state.registry.get(model.name)
    if served is None or served.version != model.version:
        # A reload replaced or removed the model while this adaptation ran. Its session could never predict,
        # and stored after the reload dropped the old version's sessions, it would hold a share of the budget
        # until its TTL, under an id nobody has. (The reload sets the registry before it drops sessions:
        # looked at after the write, a session the reload missed is always seen here.)
        await store_call(request, state.store.delete, session.id, caller)
        now = "is no longer served" if served is None else f"is now served in version {served.version}"
        raise Problem(503, "Not ready", f"a reload replaced model {model.name!r} (version {model.version}) while this "
                      f"adaptation ran, and the model {now}: adapt again", headers={"Retry-After": "1"})
    response.headers["Location"] = f"/v1/sessions/{session.id}"
    return AdaptResponse(
        session_id=session.id,
        model=model.name,
        model_version=model.version,
        created=created,
        expires=session.expires,
        expires_at=iso(session.expires),
        ttl_s=ttl,
        inner_steps=steps,
        inner_lr=lr,
        support_loss_before=result["support_loss_before"],
        support_loss_after=result["support_loss_after"],
        adaptation_ms=result["compute_seconds"] * 1000.0,
        session_bytes=session.nbytes,
        timing=timing(result, started),
    )


@router.post("/{name}/predict", summary="Adapt and predict in one call (no session)", response_model=PredictResponse, response_model_exclude_none=True, responses=BODY_ERRORS)
async def predict_stateless(request: Request, name: str, body: PredictRequest = Body(...), caller: str | None = Depends(owner)) -> PredictResponse:
    """Adapts to the support set, predicts the queries, and keeps nothing."""
    state = request.app.state
    settings = state.settings
    model = get_model(request, name)
    steps, lr = check_inner(settings, body.inner_steps, body.inner_lr, model)

    def decode():
        sx, sy = decode_support(model, body.support, settings, steps)
        qx = decode_inputs(body.query.x, "query.x", model.input_shape, model.preprocessing, settings.max_query)
        return sx, sy, qx

    sx, sy, qx = await decode_off_the_loop(request, (body.support.x, body.query.x), decode)
    started = time.perf_counter()
    job = Job("adapt", model, support_x=sx, support_y=sy, steps=steps, lr=lr, query_x=qx, transductive=body.transductive, keep_session=False, owner=caller)
    result = check_finite(await compute_unless_client_gone(request, state.engine, job), predicted=True)
    state.metrics.adaptation.labels(model.name).observe(time.perf_counter() - started)
    return PredictResponse(
        model=model.name,
        predictions=result["predictions"],
        probabilities=result.get("probabilities"),
        support_loss_before=result["support_loss_before"],
        support_loss_after=result["support_loss_after"],
        inner_steps=steps,
        inner_lr=lr,
        timing=timing(result, started),
    )


answer_head_as_get(router)
