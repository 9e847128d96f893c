"""``serve(model_dir, host, port, **settings)``: run the service with uvicorn (what ``metalearn serve`` calls)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
import time

from service import logs
from service.settings import Settings

log = logging.getLogger("service")


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, **settings_overrides) -> None:
    """Serve the models of ``model_dir`` on ``host:port`` until interrupted.

    ``settings_overrides`` are :class:`service.settings.Settings` fields (e.g.
    ``device="cuda"``, ``api_keys="k1,k2"``, ``max_batch_size=64``); the others
    come from ``METALEARN_*`` environment variables. ``log_level`` is passed to uvicorn.
    """
    import uvicorn

    from service.app import create_app

    # Until the app's startup installs its reload handler, a SIGHUP (an operator's reload sent to every
    # replica) would end a replica that is starting: ignored meanwhile.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log_level = settings_overrides.pop("log_level", "info")
    settings = Settings.from_environment(model_dir=str(model_dir), **settings_overrides)
    settings.usable_device()  # refused here in one line, not as a traceback from the app's startup
    # Every logger, uvicorn's too, one format (log_config=None: uvicorn's loggers go to the root's handler);
    # the access lines are the service's own (service.request_ids), with the request id.
    logs.configure(log_level, settings.log_format)
    if not settings.key_list() and not _loopback(host):
        log.warning("serving on %s without API keys: whoever reaches this address can adapt, predict and read or delete any "
                    "session by its id; set METALEARN_API_KEYS (and put a TLS proxy in front: README, Deployment)", host)
    app = create_app(settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, log_config=None, access_log=False,
                            timeout_graceful_shutdown=GRACE_S, forwarded_allow_ips=settings.forwarded_allow_list())
    _draining_server(config, app, settings.drain_s).run()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


# How long requests in flight get once the server stops (uvicorn's graceful shutdown). Requests still
# queued when less than SHED_MARGIN_S plus twice the longest recent batch (one computing counted by its
# time so far) is left are answered 503 (retry elsewhere) instead of losing their connection: the batches
# computing then still finish in time. Meanwhile no batch starts that is expected to end within the last
# SHED_MARGIN_S (Engine.finish_by): its requests are answered 503 too.
GRACE_S = 10.0
SHED_MARGIN_S = 1.0
STOPPING = "the service is stopping; retry (another replica answers)"


def _draining_server(config, app, drain_s: float):
    """uvicorn's server that, on its first SIGTERM, first answers ``/readyz`` with 503 for ``drain_s`` seconds
    while serving everything else, then stops as uvicorn does (a second signal ends the drain): a load
    balancer that checks readiness stops sending new requests before the listener closes. Once stopping,
    what is still queued near the end of the grace period is answered 503 (``Engine.shed``)."""
    import uvicorn

    def later(seconds: float, action, *args) -> None:
        timer = threading.Timer(seconds, action, args)
        timer.daemon = True
        timer.start()

    def shed_in_time(deadline: float) -> None:
        """Shed once less than the margin and twice the longest recent batch is left: looked at again every 50 ms,
        so that a batch still computing counts by its time so far (at SIGTERM none may have finished yet)."""
        engine = app.state.engine
        while deadline - time.monotonic() > SHED_MARGIN_S + 2 * engine.longest_recent_batch():
            time.sleep(0.05)
        count = engine.shed(STOPPING)
        if count:
            log.warning("stopping: answered %d queued request(s) with 503 before the grace period ends", count)

    class Server(uvicorn.Server):
        draining = False

        def handle_exit(self, sig: int, frame) -> None:
            if sig == signal.SIGTERM and drain_s > 0 and not self.draining:
                self.draining = app.state.draining = True
                log.info("SIGTERM: /readyz answers 503 for %g s, then the server stops", drain_s)
                later(drain_s, self.handle_exit, sig, frame)
                return
            if not self.should_exit:
                deadline = time.monotonic() + GRACE_S
                app.state.engine.finish_by(deadline - SHED_MARGIN_S, STOPPING)  # (no batch started that ends later)
                watcher = threading.Thread(target=shed_in_time, args=(deadline,), daemon=True)
                watcher.start()
            super().handle_exit(sig, frame)

    app.state.drains = True
    return Server(config)
