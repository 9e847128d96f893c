"""The routes' own cost per request, in process, with the engine's answer given instantly: ``JSONRoute`` against FastAPI's generic handler.

    python bench/experiments/route_overhead.py

Builds the service app twice on the benchmark's checkpoints (Conv4-64 MAML and
ANIL, 5-way): as served (the ``/v1`` routes are ``service.routes.json_route.JSONRoute``),
and with the same endpoints re-declared as plain FastAPI ``APIRoute``\\ s ahead
of them. Each app's lifespan runs (models loaded, worker started); a real
engine answer is computed once per request kind, then ``engine.submit`` returns
it at once, so what is timed is the app: middleware, routing, key check, body
parsing and validation, tensor decoding, the session lookup and the response.
Requests are driven through the ASGI interface directly (no sockets), in
alternating blocks of 1000, and the medians are printed with their ratio.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fastapi.routing import APIRoute

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import service_bench as sb  # noqa: E402

from service.app import create_app  # noqa: E402
from service.routes import models, sessions  # noqa: E402
from service.settings import Settings  # noqa: E402


def with_generic_routes(app):
    """``app`` with the /v1 endpoints also declared as FastAPI ``APIRoute``s, matched before the JSONRoutes."""
    for router in (sessions.router, models.router):
        for route in router.routes:
            generic = APIRoute(
                route.path, route.endpoint, methods=route.methods, response_model=route.response_model,
                status_code=route.status_code, response_model_exclude_none=route.response_model_exclude_none,
                response_class=route.response_class, dependencies=route.dependencies,
            )
            app.router.routes.insert(0, generic)
    return app


async def call(app, path: str, body: bytes) -> tuple[int, bytes]:
    """One POST through the app's ASGI interface."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    connected = asyncio.Event()  # never set: as a server does, receive() after the body waits for a disconnect

    async def receive():
        if messages:
            return messages.pop()
        await connected.wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def requests_for(app, batch) -> dict[str, tuple[str, bytes]]:
    """A MAML session predict and an ANIL stateless predict; the engine then answers them instantly."""
    support = {"x": sb.encode(batch.support_x[0]), "y": sb.encode(batch.support_y[0], "int64")}
    status, payload = await call(app, "/v1/models/maml/adapt", json.dumps({"support": support}).encode())
    assert status == 201, payload
    session_id = json.loads(payload)["session_id"]
    requests = {
        "MAML session predict": (f"/v1/sessions/{session_id}/predict", json.dumps({"x": sb.encode(batch.query_x[0])}).encode()),
        "ANIL stateless predict": ("/v1/models/anil/predict", json.dumps({"support": support, "query": {"x": sb.encode(batch.query_x[0])}}).encode()),
    }
    engine, answers = app.state.engine, {}
    real_submit = engine.submit

    async def instant_submit(job, timeout=None, alone=None):
        key = (job.kind, job.model.name)
        if key not in answers:
            answers[key] = await real_submit(job)
        return answers[key]

    engine.submit = instant_submit
    for path, body in requests.values():
        status, payload = await call(app, path, body)
        assert status == 200, payload
    return requests


async def block_us(app, path: str, body: bytes, count: int = 1000) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await call(app, path, body)
        times.append(1e6 * (time.perf_counter() - start))
    return times


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="route_overhead_"))
    sb.make_checkpoints(work)
    batch, origin = sb.make_tasks(1)
    settings = Settings(model_dir=str(work), device="cpu")
    apps = {"JSONRoute": create_app(settings), "FastAPI APIRoute": with_generic_routes(create_app(settings))}
    async with apps["JSONRoute"].router.lifespan_context(apps["JSONRoute"]), apps["FastAPI APIRoute"].router.lifespan_context(apps["FastAPI APIRoute"]):
        requests = {name: await requests_for(app, batch) for name, app in apps.items()}
        print(f"# the app's own time per request, engine answering instantly; tasks: {origin}")
        for kind in requests["JSONRoute"]:
            times = {name: [] for name in apps}
            for rep in range(6):
                for name in (apps if rep % 2 == 0 else reversed(list(apps))):
                    times[name] += await block_us(apps[name], *requests[name][kind])
            medians = {name: statistics.median(t) for name, t in times.items()}
            print(f"{kind}: " + "  ".join(f"{name} {us:.0f} us" for name, us in medians.items())
                  + f"  (generic / JSONRoute: {medians['FastAPI APIRoute'] / medians['JSONRoute']:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
