"""``serve(model_dir, host, port, **settings)``: run the service with uvicorn (what ``metalearn serve`` calls)."""

from __future__ import annotations

from metalearn.models import import_model_modules
from service import logs
from service.settings import Settings


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, **settings_overrides) -> None:
    """Serve the models of ``model_dir`` on ``host:port`` until interrupted.

    ``settings_overrides`` are :class:`service.settings.Settings` fields (e.g.
    ``device="cuda"``, ``api_keys="k1,k2"``, ``max_batch_size=64``); the others
    come from ``METALEARN_*`` environment variables. ``log_level`` is passed to uvicorn.
    """
    import uvicorn

    from service.app import create_app

    log_level = settings_overrides.pop("log_level", "info")
    settings = Settings.from_environment(model_dir=str(model_dir), **settings_overrides)
    settings.usable_device()  # refused here in one line, not as a traceback from the app's startup
    import_model_modules(settings.model_modules)  # (the same)
    # Every logger, uvicorn's too, one format (log_config=None: uvicorn's loggers go to the root's handler);
    # the access lines are the service's own (service.request_ids), with the request id.
    logs.configure(log_level, settings.log_format)
    app = create_app(settings)
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=None, access_log=False, timeout_graceful_shutdown=10)
