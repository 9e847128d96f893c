"""The FastAPI application: ``create_app(settings)``, and ``app`` for ``uvicorn service.app:app``.

    uvicorn service.app:app --host 0.0.0.0 --port 8000      # settings from METALEARN_* env vars
    metalearn serve --model-dir runs/ --port 8000           # the same, via service.server.serve

The app loads every model of ``settings.model_dir`` at start (lifespan; again,
what changed, on ``SIGHUP`` or when ``model_poll_s`` finds changes: ``reload_models``), runs
adaptation off the event loop in the engine's workers (one on a GPU, which owns the device; on the CPU as
``METALEARN_WORKERS`` says: ``service.engine``),
keeps sessions in the configured store, and answers every error as an RFC 9457
problem document.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

import metalearn
from metalearn.models import import_model_modules
from service import problems
from service.engine import Engine, EngineStopped, JobTimeout, ModelRefused, QueueFull
from service.problems import Problem, problem_response
from service.openapi import install_openapi
from service.registry import ModelRegistry
from service.request_ids import RequestIds
from service.routes import health, metrics, models, sessions
from service.routes.deps import DECODE_THREADS, STORE_THREADS, answer_head_as_get
from service.sessions import MemorySessionStore, SessionStore, SessionStoreFull, SessionStoreUnavailable
from service.settings import SHORT_KEY, Settings

log = logging.getLogger("service")

STATIC_DIR = Path(__file__).parent / "static"

DESCRIPTION = """
Adapt a meta-learned model to a few labelled examples (a *support set*) and predict.

* `POST /v1/models/{name}/adapt` adapts and keeps a **session**; `POST /v1/sessions/{id}/predict` then predicts cheaply.
* `POST /v1/models/{name}/predict` adapts and predicts in one call, keeping nothing.
* Tensors are nested lists, `{"dtype", "shape", "base64"}` (raw little-endian bytes) or, for image models, `{"images": [base64 PNG/JPEG]}`.
* Errors are `application/problem+json` (RFC 9457). With API keys configured, send `Authorization: Bearer KEY` or `X-API-Key: KEY`.
"""


def create_store(settings: Settings) -> SessionStore:
    """The session store the settings select (``memory`` or ``redis``)."""
    if settings.session_backend == "redis":
        from service.redis_store import RedisSessionStore  # provided by the Redis store module

        return RedisSessionStore.from_settings(settings)
    return MemorySessionStore(max_bytes=settings.cache_bytes)


async def reload_models(app: FastAPI) -> dict[str, list[str]]:
    """Load the model directory again and serve what it holds from the next request on (what the service
    does on ``SIGHUP``): only new and changed checkpoints are loaded, a model whose file is gone is no
    longer served, and a changed file that fails to load leaves the version already served in place
    (``ModelRegistry.load`` with the registry being served). Requests already running finish with the
    model they started with; sessions of a model's earlier version answer 404 from now on, and those this
    process holds are dropped (``SessionStore.forget_models``). Returns
    ``ModelRegistry.changes_from``'s changes, which are also logged."""
    state = app.state
    async with state.reload_lock:
        previous = state.registry

        def load() -> ModelRegistry:
            registry = ModelRegistry.load(state.settings.model_dir, state.device, previous)
            state.engine.load_compiler(registry.models.values())  # (may wait for a compilation under way)
            return registry

        registry = await anyio.to_thread.run_sync(load)
        state.registry = registry
        state.engine.serve_only(registry.models.values())
        state.metrics.models.set(len(registry.models))
        state.metrics.skipped.set(len(registry.errors))
        state.metrics.reloads.labels("done").inc()
        app.openapi_schema = None  # its examples name the models
        changes = registry.changes_from(previous)
        log.info("reloaded the models of %s: %s", state.settings.model_dir, "; ".join(f"{what} {', '.join(names) or '-'}" for what, names in changes.items()))
        if changes["updated"] or changes["removed"]:
            served = {name: model.version for name, model in registry.models.items()}
            dropped = await anyio.to_thread.run_sync(state.store.forget_models, served)
            if dropped:
                log.info("dropped %d sessions of models no longer served in their version", dropped)
            # The models replaced go now; what is loaded stays out of full collections, as after start.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        return changes


async def _reload_logged(app: FastAPI) -> None:
    try:
        await reload_models(app)
    except Exception:  # noqa: BLE001 - the service goes on with what it served
        app.state.metrics.reloads.labels("failed").inc()
        log.exception("reloading the models failed: still serving the models loaded before")


def _reload_in_background(app: FastAPI) -> None:
    task = asyncio.ensure_future(_reload_logged(app))
    app.state.reloads.add(task)
    task.add_done_callback(app.state.reloads.discard)


async def _watch_model_dir(app: FastAPI, every_s: float) -> None:
    """Every ``every_s`` seconds, reload when the model directory's checkpoints changed (Settings.model_poll_s)."""
    state = app.state
    while True:
        await asyncio.sleep(every_s)
        try:
            changed = await anyio.to_thread.run_sync(state.registry.changed_on_disk, state.settings.model_dir)
        except Exception:  # noqa: BLE001 - a look that failed is tried again next time
            log.exception("looking for new checkpoints in %s failed", state.settings.model_dir)
            continue
        if changed:
            await _reload_logged(app)


def _on_signal(signum: int, callback) -> bool:
    """Call ``callback`` on the event loop when the process gets ``signum``; False where the loop cannot
    handle signals (not the main thread, as under TestClient; no such signal, as SIGHUP on Windows)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signum, callback)
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True


def _lifespan(settings: Settings):
    """What the app does at start (load the models, start the engine) and at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        device = app.state.device = settings.usable_device()
        torch.set_num_threads(settings.resolved_threads())
        metalearn.keep_freed_memory(device)  # on the CPU, adaptations re-faulted their freed tensor memory on every request
        import_model_modules(settings.model_modules)
        app.state.registry = ModelRegistry.load(settings.model_dir, device)
        app.state.metrics.models.set(len(app.state.registry.models))
        app.state.metrics.skipped.set(len(app.state.registry.errors))
        app.openapi_schema = None
        app.state.engine.start()
        app.state.store_threads = anyio.CapacityLimiter(STORE_THREADS)  # (routes.deps.store_call)
        app.state.decode_threads = anyio.CapacityLimiter(DECODE_THREADS)  # (routes.deps.decode_off_the_loop)
        # Compilations' machinery, if any model will compile, loaded now so that the freeze below covers it.
        app.state.engine.load_compiler(app.state.registry.models.values())
        # What is loaded by now lives as long as the process. Out of the cyclic garbage collector's
        # full passes, which otherwise scanned it all every few seconds under load (115 ms each, the
        # event loop and the workers stalled: ANIL's p99 at concurrency 32 went from 150-164 to 57-68 ms).
        gc.collect()
        gc.freeze()
        log.info("serving %d model(s) on %s: %s", len(app.state.registry.models), device, ", ".join(app.state.registry.names()))
        if short := settings.short_keys():
            log.warning("%d of the API keys are shorter than %d characters, which can be guessed: use random ones, e.g. "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'", short, SHORT_KEY)
        if settings.session_backend == "memory" and "redis_url" in settings.model_fields_set:
            log.warning("METALEARN_REDIS_URL is set but METALEARN_SESSION_BACKEND is memory: sessions stay in this process, "
                        "not shared with other replicas (set METALEARN_SESSION_BACKEND=redis to share them)")
        if settings.session_backend == "redis" and not await anyio.to_thread.run_sync(app.state.store.ping):
            log.warning("the session store (%r) does not answer now: session calls answer 503 until it does", app.state.store)
        if settings.drain_s > 0 and not app.state.drains:
            log.warning("METALEARN_DRAIN_S=%g does nothing here: only `metalearn serve` drains on SIGTERM (under uvicorn or gunicorn, delay the signal instead, e.g. a Kubernetes preStop sleep)", settings.drain_s)
        hangup = hasattr(signal, "SIGHUP") and _on_signal(signal.SIGHUP, lambda: _reload_in_background(app))
        watcher = asyncio.create_task(_watch_model_dir(app, settings.model_poll_s)) if settings.model_poll_s > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            if hangup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            gc.unfreeze()  # (the process may go on: tests, an application embedding the service)
            app.state.engine.stop()
            try:
                app.state.store.close()
            except Exception:  # noqa: BLE001
                log.exception("closing the session store failed")

    return lifespan


def _install_service_errors(app: FastAPI) -> None:
    """The engine's and the session store's refusals as 503 problems, with Retry-After and metrics; a model that
    refused a request's inputs as a 422."""

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        request.app.state.metrics.rejected.inc()
        problem = Problem(503, "Overloaded", str(exc), headers={"Retry-After": str(exc.retry_after)})
        return problem_response(problem, request.url.path)

    @app.exception_handler(JobTimeout)
    async def _timeout(request: Request, exc: JobTimeout):
        request.app.state.metrics.timeouts.inc()
        problem = Problem(503, "Timed out", str(exc), headers={"Retry-After": "1"})
        return problem_response(problem, request.url.path)

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped):
        return problem_response(Problem(503, "Not ready", str(exc), headers={"Retry-After": "1"}), request.url.path)

    @app.exception_handler(ModelRefused)
    async def _refused(request: Request, exc: ModelRefused):
        detail = f"the model's own code failed on these inputs ({str(exc)[:300]}): are they what it was trained on (its value range, vocabulary, ...)?"
        return problem_response(Problem(422, "Inputs refused by the model", detail), request.url.path)

    store_warned = [-math.inf]  # when the log last said the store is down

    @app.exception_handler(SessionStoreUnavailable)
    async def _store_down(request: Request, exc: SessionStoreUnavailable):
        # Said in the log too (an operator's first look), at most once a minute while it lasts.
        # The client is told what it can do; where the store is and why it failed stay in the log.
        if isinstance(exc, SessionStoreFull):
            said = "the session store is full, adaptations answer 503 (raise Redis's maxmemory, or let it evict: volatile-lru)"
            detail = "the session store is full: no new session until sessions expire or are deleted; existing sessions still predict, and stateless /v1/models/{name}/predict works"
        else:
            said = "the session store is unavailable, session calls answer 503"
            detail = "the session store cannot be reached; session calls fail until it is back, stateless /v1/models/{name}/predict still works"
        now = time.monotonic()
        if now - store_warned[0] >= 60:
            store_warned[0] = now
            log.warning("%s: %s", said, exc)
        return problem_response(Problem(503, "Session store unavailable", detail, headers={"Retry-After": "5"}), request.url.path)


def _install_docs(app: FastAPI) -> None:
    """/docs and /redoc from the assets under /static: they work with no internet."""

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        # Relative addresses: behind a proxy that serves the app under a path prefix (/api/docs), the page
        # finds its assets and the document under that prefix too.
        return get_swagger_ui_html(
            openapi_url=app.openapi_url.lstrip("/"),
            title=f"{app.title} - Swagger UI",
            swagger_js_url="static/swagger-ui-bundle.js",
            swagger_css_url="static/swagger-ui.css",
            swagger_favicon_url="static/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url.lstrip("/"),
            title=f"{app.title} - ReDoc",
            redoc_js_url="static/redoc.standalone.js",
            redoc_favicon_url="static/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service, configured by ``settings`` (default: the METALEARN_* environment). Its models load when
    it starts (the lifespan), not here: creating it reads nothing from the model directory."""
    settings = settings or Settings.from_environment()

    app = FastAPI(
        title="metalearn adaptation service",
        version=metalearn.__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        lifespan=_lifespan(settings),
        generate_unique_id_function=lambda route: route.name,  # operationIds a generated client reads well: adapt_model, predict_session, ...
    )
    app.state.settings = settings
    app.state.owners = settings.owner_hashes()
    app.state.registry = ModelRegistry()
    app.state.device = "cpu"
    app.state.drains = False  # metalearn serve's server sets it: it answers SIGTERM with METALEARN_DRAIN_S's drain
    app.state.reload_lock = asyncio.Lock()
    app.state.reloads = set()  # reloads running in the background (the loop keeps only weak references to tasks)
    app.state.metrics = metrics.ServiceMetrics(app.state)
    app.state.store = create_store(settings)
    app.state.engine = Engine(settings.engine_config(), metrics=app.state.metrics)

    problems.install(app)
    _install_service_errors(app)

    # Routes match in this order: the /v1 ones, the busiest, first.
    app.include_router(sessions.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    _install_docs(app)
    answer_head_as_get(app.router)  # (the docs pages; each module's router does the same for its own)
    install_openapi(app)
    # Each added one wraps the ones before: metrics see every answer, including 413s from the size
    # limit, and every answer carries its request id.
    app.add_middleware(problems.BodySizeLimit, max_bytes=settings.max_body_bytes, idle_s=settings.body_timeout_s)
    cors = None
    if settings.cors_origin_list():  # (outside the size limit: a browser reads a 413's body only with CORS headers)
        cors = dict(
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST", "DELETE"],
            # (traceparent and tracestate: W3C trace context, which a page's OpenTelemetry or Sentry adds to its calls)
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", "traceparent", "tracestate"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "WWW-Authenticate", "Allow"],
            max_age=600,
        )
        app.add_middleware(problems.ProblemCORS, **cors)
    app.add_middleware(metrics.RequestMetrics, metrics=app.state.metrics)
    app.add_middleware(RequestIds)
    app.add_middleware(problems.UnexpectedErrors, cors=cors)  # (outside them all: their own failures are answered too)
    return app


app = create_app()
