"""``GET /metrics``: Prometheus text format, from a registry private to each app.

Request counts and latencies per route template and status, adaptation and
prediction batch latency and sizes, queue depth, and the session store's live
sessions, bytes, evictions and expirations (read from the store at scrape time).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from service.routes.deps import answer_head_as_get

router = APIRouter(tags=["metrics"])

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _unlabelled(rows):
    """Metric families of one unlabelled value each, from ``(family, name, help, value)`` rows."""
    for family, name, help_text, value in rows:
        metric = family(name, help_text)
        metric.add_metric([], value)
        yield metric


class _StateCollector:
    """Values read at scrape time: the session store's, and the engine's CUDA graphs and CPU traces."""

    def __init__(self, app_state):
        self.app_state = app_state

    def describe(self):
        return []

    def collect(self):
        engine = getattr(self.app_state, "engine", None)
        if engine is not None:
            # The engine's recorded computations: CUDA graphs on a GPU, TorchScript traces and scripts on the CPU.
            scripts = engine.script_stats()
            caches = ((engine.graph_stats(), "cuda_graph", "CUDA graphs"), (engine.trace_stats(), "cpu_trace", "CPU traces"),
                      (scripts, "cpu_script", "Compiled CPU adaptations"))
            for stats, kind, what in caches:
                yield from _unlabelled((
                    (GaugeMetricFamily, f"metalearn_{kind}s", f"{what} held by the engine", stats["held"]),
                    (CounterMetricFamily, f"metalearn_{kind}_captures", f"{what} recorded", stats["captures"]),
                    (CounterMetricFamily, f"metalearn_{kind}_replays", f"Batches replayed from {what}", stats["replays"]),
                    (CounterMetricFamily, f"metalearn_{kind}_capture_failures", "Shapes that could not be recorded (run eagerly)", stats["failures"]),
                    (CounterMetricFamily, f"metalearn_{kind}_evictions", f"{what} dropped for room: more request shapes in use than held", stats["evictions"]),
                ))
            yield from _unlabelled([(GaugeMetricFamily, "metalearn_cpu_scripts_compiling", "Request shapes queued or being compiled", scripts["pending"])])
        store = getattr(self.app_state, "store", None)
        if store is None:
            return
        up = (GaugeMetricFamily, "metalearn_session_store_up", "1 when the session store answers")
        try:
            stats = store.stats()
        except Exception:  # noqa: BLE001 - an unreachable store must not break /metrics
            yield from _unlabelled([(*up, 0)])
            return
        yield from _unlabelled((
            (*up, 1),
            (GaugeMetricFamily, "metalearn_sessions_live", "Sessions currently stored", stats.live_sessions),
            (GaugeMetricFamily, "metalearn_sessions_bytes", "Bytes the session store counts against its budget: adapted tensors and what was prepared from them", stats.live_bytes),
            (CounterMetricFamily, "metalearn_session_evictions", "Sessions evicted to honour the byte budget", stats.evictions),
            (CounterMetricFamily, "metalearn_session_expirations", "Sessions dropped because their TTL passed", stats.expirations),
            (CounterMetricFamily, "metalearn_session_prepared_dropped", "Times what workers prepared from a session (packed weights, constants) was dropped to make room, before any session is evicted", store.prepared_dropped),
        ))
        if hasattr(store, "held_stats"):  # a shared store whose replicas hold sessions decoded (service.redis_store)
            held = store.held_stats()
            yield from _unlabelled((
                (GaugeMetricFamily, "metalearn_sessions_held", "Sessions this replica holds decoded", held["sessions"]),
                (GaugeMetricFamily, "metalearn_sessions_held_bytes", "Bytes of the sessions this replica holds decoded (their tensors and what workers prepared from them)", held["bytes"]),
                (CounterMetricFamily, "metalearn_session_held_gets", "Session reads answered with a held session (metadata alone from the store)", held["held_gets"]),
                (CounterMetricFamily, "metalearn_session_fetched_gets", "Session reads that fetched and decoded the tensors", held["fetched_gets"]),
            ))


class ServiceMetrics:
    def __init__(self, app_state=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("metalearn_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "metalearn_http_request_duration_seconds", "HTTP request latency by route, method and status", ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute = Histogram(
            "metalearn_engine_batch_seconds", "Time of one batched computation on the device (kind = adapt | predict)", ["kind", "model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.adaptation = Histogram(
            "metalearn_adaptation_seconds", "Adaptation latency as a request sees it: queue wait plus batched compute", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("metalearn_engine_batch_size", "Requests per batched computation", ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("metalearn_engine_queue_depth", "Jobs waiting for the worker", registry=r)
        self.rejected = Counter("metalearn_engine_rejected", "Jobs refused because the queue was full", registry=r)
        self.timeouts = Counter("metalearn_engine_timeouts", "Jobs that exceeded the request timeout", registry=r)
        self.models = Gauge("metalearn_models_loaded", "Models being served", registry=r)
        self.skipped = Gauge("metalearn_models_skipped", "Checkpoints of the model directory that failed to load (listed by /readyz)", registry=r)
        self.reloads = Counter("metalearn_model_reloads", "Reloads of the model directory (SIGHUP, or a change METALEARN_MODEL_POLL_S saw) by outcome (done | failed)", ["outcome"], registry=r)
        for outcome in ("done", "failed"):  # (each series from the start at 0: an alert on 'failed' sees its rise)
            self.reloads.labels(outcome=outcome)
        self.inline = Counter("metalearn_engine_predicts_on_event_loop", "Lone session predicts computed on the event loop, the workers idle (service.engine)", registry=r)
        self.in_flight = 0  # HTTP requests the app is handling (RequestMetrics)
        Gauge("metalearn_http_requests_in_flight", "HTTP requests being handled", registry=r).set_function(lambda: self.in_flight)
        if app_state is not None:
            r.register(_StateCollector(app_state))

    def alone(self) -> bool:
        """Whether the request asking is the only one the app is handling (Engine.submit's ``alone``)."""
        return self.in_flight == 1

    # Engine callbacks (called from the worker threads, and from the event loop for what it computes)
    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def computed_here(self) -> None:
        self.inline.inc()

    def batch(self, kind: str, model: str, size: int, seconds: float) -> None:
        self.compute.labels(kind, model).observe(seconds)
        self.batch_size.labels(kind).observe(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting requests per route template and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (template, scope.get("method", ""), str(status["code"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"example": "metalearn_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 3.0\n"}}}},
)
def metrics(request: Request) -> Response:
    """Request counts/latencies per route and status, batch sizes and latencies, queue depth, sessions."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


answer_head_as_get(router)
