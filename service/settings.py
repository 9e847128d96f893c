"""Service settings: one pydantic-settings class, read from ``METALEARN_*`` environment variables.

Every field below is an environment variable named ``METALEARN_`` + the field
name in upper case, e.g. ``METALEARN_MODEL_DIR=runs METALEARN_DEVICE=cuda``.
A ``.env`` file in the working directory is read too. ``EngineConfig`` is the
engine's part of them as ``service.engine.Engine`` takes it (``Settings.engine_config``).
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and computes. The service fills one from its settings
    (``Settings.engine_config``, whose METALEARN_* variables document each field). For an engine built in
    code or a test, the defaults here are the settings' own, except where the settings work a value out
    from the machine (0 = auto there): ``max_batch_size`` is the CPU's 8, and one worker computes at
    torch's own thread count."""

    max_batch_size: int = 8  # requests computed together as one batch
    max_wait_ms: float = 1.0  # how long a worker waits for more requests to fill a batch
    queue_size: int = 256  # pending requests beyond this are refused (QueueFull)
    request_timeout_s: float = 30.0
    threads: int = 0  # torch threads of each worker; 0 = leave torch's setting
    workers: int = 1
    cuda_graphs: int = 16  # graphs kept on a GPU with one worker; 0 = none (service.cuda_graphs)
    cpu_traces: int = 24  # traces kept per worker on the CPU; 0 = none (service.cpu_traces)
    cpu_scripts: int = 8  # compiled computations on the CPU, shared by the workers; 0 = none (service.cpu_scripts)
    worker_cpus: list[list[int]] | None = None  # the cores each worker runs on (Settings.resolved_worker_cpus); None = anywhere
    inline_predict_ms: float = 5.0  # lone session predicts this cheap compute on the caller's thread; 0 = never
    max_batch_work: int = 10240  # a batch takes requests while their example-steps (LoadedModel.example_steps) fit in this; 0 = no bound

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")


ENGINE = EngineConfig()  # the engine's defaults (Settings works threads, workers and max_batch_size out from the machine instead)


def _comma_list(text: str) -> list[str]:
    """A comma-separated setting's entries, stripped, the empty ones left out."""
    return [entry.strip() for entry in text.split(",") if entry.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METALEARN_", env_file=".env", extra="ignore", protected_namespaces=())

    # Models
    model_dir: str = Field("models", description="Directory of checkpoints (*.safetensors) and run directories (DIR/best.safetensors).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run; auto = cuda when available.")
    model_modules: str = Field("", description="Comma-separated Python modules imported at start, before the models load: those that register architectures of your own (metalearn.register_architecture) for the checkpoints of model_dir. A module that fails to import stops the start.")
    model_poll_s: float = Field(0.0, ge=0, description="Every this many seconds, look for checkpoints added, changed or removed in model_dir and reload when there are (as on SIGHUP); 0 = only on SIGHUP.")

    # Engine
    max_batch_size: int = Field(0, ge=0, description="Most requests run together as one batched computation (0 = auto: 8 on the CPU, where bigger batches spill the caches, 64 on a GPU).")
    max_wait_ms: float = Field(ENGINE.max_wait_ms, ge=0, description="How long the worker waits for more requests to fill a batch.")
    queue_size: int = Field(ENGINE.queue_size, ge=1, description="Pending requests beyond this are answered 503 with Retry-After.")
    request_timeout_s: float = Field(ENGINE.request_timeout_s, gt=0, description="Per-request deadline for adaptation/prediction (503 when exceeded).")
    threads: int = Field(0, ge=0, description="torch intra-op threads of each worker (0 = auto: one less than the cores the process may use, at least 1, leaving a core to the HTTP event loop).")
    workers: int = Field(0, ge=0, description="Worker threads running micro-batches side by side (0 = auto: 1 on a GPU; on the CPU the cores the process may use divided by threads, at least 1). With more than one, each keeps its own copy of a model that takes the generic path.")
    pin_workers: bool = Field(True, description="On the CPU, each worker (with its torch threads) runs on cores of its own: worker i on the i-th `threads` of the cores the process may use, when workers x threads fit in them (else none is pinned); the HTTP event loop runs anywhere. Under load a worker's batches are not moved between cores and its caches stay warm: on 2 cores, 8% more ANIL requests/s and 20% more MAML session predicts/s at concurrency 16; lone requests the same within 3% (bench/experiments/settings_ab.py). Turn it off when several server processes share the same cores (gunicorn -w N, each without a cpuset of its own).")
    inline_predict_ms: float = Field(ENGINE.inline_predict_ms, ge=0, description="On the CPU, a session predict whose request is the only one the service is handling, every worker idle, computes on the event loop's thread, without the hand-off to a worker and back, when its model's last lone prediction took at most this many ms for as many query images (0 = never): a lone Conv4-64 MAML session predict 3.23 against 3.81 ms p50 on a 2-core AVX2 EPYC. Concurrent requests still go to the workers and batch. The event loop then keeps its own CPU traces of those predictions (and, with several workers, its own copy of a model on the generic path), as a worker does.")

    cuda_graphs: int = Field(ENGINE.cuda_graphs, ge=0, description="On a GPU with one worker (the default), CUDA graphs kept: a request shape seen twice is captured once and replayed, one launch instead of ~1000 (0 = off; with several workers there are none).")
    cpu_traces: int = Field(ENGINE.cpu_traces, ge=0, description="On the CPU, TorchScript traces kept per worker (and by the event loop, for the lone session predicts it computes: inline_predict_ms): a request shape seen twice is traced once and replayed without the GIL (ANIL adaptations and every prediction of the fast kernels; 0 = off). A trace holds 1-12 MB (12: an ANIL adaptation of 8 requests, 10 steps).")
    cpu_scripts: int = Field(ENGINE.cpu_scripts, ge=0, description="On the CPU, compiled computations kept (shared by the workers; what the CPU traces do not cover: MAML's adaptations, and the generic path's adaptations and session predictions: Meta-SGD, regression, any module): a request shape seen in 3 batches is recorded and compiled on a background thread (seconds), then every request of that shape runs through it without the GIL (a small model's whole batches too; 0 = off).")

    # Limits
    max_support: int = Field(512, ge=1, description="Most support examples in one request.")
    max_query: int = Field(1024, ge=1, description="Most query examples in one request.")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Request bodies over this are answered 413.")
    max_list_values: int = Field(262144, ge=1024, description="Request bodies of more comma-separated values than this, or more JSON lists than a sixteenth of it (numbers sent as lists), are answered 413 before they are parsed: parsing holds the event loop; large tensors go as base64.")
    body_timeout_s: float = Field(30.0, gt=0, description="A request body that stops arriving for this long is answered 408 (a stalled upload holds its connection and buffer).")
    max_inner_steps: int = Field(100, ge=0, description="Largest inner_steps a request may ask for.")
    max_example_steps: int = Field(ENGINE.max_batch_work, ge=1, description="Most support examples x inner_steps in one request (for a model that adapts its head alone, ANIL, the examples alone: its body runs once per example): a bound on one request's computation, which cannot be stopped once it runs (a request that timed out would hold its worker for nobody), and on one batch's: a batch takes requests while their example-steps fit. A Conv4-64 MAML adaptation takes about 1 ms per example-step on one core, so 10240 is about 10 s; set it so that your heaviest model's largest request finishes well within request_timeout_s.")
    min_inner_lr: float = Field(1e-6, gt=0, description="Smallest inner_lr a request may ask for.")
    max_inner_lr: float = Field(10.0, gt=0, description="Largest inner_lr a request may ask for.")

    # Sessions
    session_ttl_s: int = Field(3600, ge=1, description="Session lifetime when the request gives no ttl_s.")
    max_session_ttl_s: int = Field(86400, ge=1, description="Largest ttl_s a request may ask for.")
    cache_bytes: int = Field(512 * 1024 * 1024, ge=0, description="Byte budget of the session store (LRU eviction beyond; with session_backend=redis, every replica's sessions together): the sessions' tensors and what the workers prepare from them (for a MAML or ANIL session predicted alone on the CPU, a packed copy of the conv weights of the blocks where packing pays). When room is needed, what was prepared goes first, then sessions: the least recently used one of the API key holding the most bytes (the new session counted as its key's; without keys, plain LRU).")
    session_backend: Literal["memory", "redis"] = Field("memory", description="memory (per process) or redis (shared between replicas).")
    redis_url: str = Field("redis://localhost:6379/0", description="Redis URL when session_backend=redis (redis://, rediss:// with TLS, or unix://). One Redis database per deployment: the keys' prefix is fixed, so two deployments sharing a database would share one session budget.")
    redis_timeout_s: float = Field(0.5, gt=0, le=60, description="With session_backend=redis: how long a Redis call may take (connecting, or an answer) before the session call answers 503; after one times out, session calls fail at once for that long. Raise it for a distant Redis or large sessions (a 100 MB session took 0.86 s to read on loopback).")
    redis_held_bytes: int = Field(64 * 1024 * 1024, ge=0, description="With session_backend=redis: bytes of the sessions each replica keeps decoded, counted as the in-memory store counts them (least recently used dropped, as in the in-memory store, which also keeps one larger session alone; 0 = none). A prediction with a held session fetches only its metadata from Redis, which still checks existence, expiry and owner.")

    # Security
    api_keys: str = Field("", description="Comma-separated API keys; when set every /v1 call needs one (Authorization: Bearer KEY or X-API-Key).")
    cors_origins: str = Field("", description="Comma-separated origins (scheme://host[:port], e.g. https://app.example.com) whose web pages may call the API from a browser (CORS), or * for any; empty: none (browsers refuse cross-origin calls). The API key headers are allowed; no cookies are used.")

    forwarded_allow_ips: str = Field("127.0.0.1,::1", description="metalearn serve only: comma-separated addresses or networks (10.0.0.0/8), or *, of the proxies whose X-Forwarded-For and X-Forwarded-Proto are believed: the client's address in the access lines, the scheme of the service's redirects (uvicorn's forwarded_allow_ips, whose FORWARDED_ALLOW_IPS variable metalearn serve does not read; plain uvicorn users pass --forwarded-allow-ips).")

    # Stopping
    drain_s: float = Field(0.0, ge=0, description="metalearn serve only: on SIGTERM, answer /readyz with 503 for this many seconds while serving every other request, then stop (a load balancer that checks readiness stops sending requests first; 0 = stop at once). A second signal ends the drain.")

    # Logs
    log_format: Literal["text", "json"] = Field("text", description="metalearn serve's log lines: text, or one JSON object per line (ts, level, logger, message; access lines add method, path, status, duration_ms, request_id, client).")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
            parts.port  # (raises for a port that is not a number)
        except ValueError as error:
            raise ValueError(f"not a URL redis can use ({error})") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must start with redis://, rediss:// (TLS) or unix://, e.g. redis://127.0.0.1:6379/0")
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys_as_text(cls, value):
        if isinstance(value, (list, tuple, set)):
            return ",".join(str(v) for v in value)
        return value

    @model_validator(mode="after")
    def _check(self):
        if self.api_keys and any(not key.strip() for key in self.api_keys.split(",")):
            # (" " or " , " would otherwise mean no keys at all: every /v1 call open, as the operator did not mean)
            raise ValueError(f"{ENV_PREFIX}API_KEYS: a blank key (only spaces, or a stray or doubled comma): set the keys, or leave it empty for an API open to all")
        if self.min_inner_lr > self.max_inner_lr:
            raise ValueError(f"{ENV_PREFIX}MIN_INNER_LR must be <= {ENV_PREFIX}MAX_INNER_LR")
        if self.session_ttl_s > self.max_session_ttl_s:
            raise ValueError(f"{ENV_PREFIX}SESSION_TTL_S must be <= {ENV_PREFIX}MAX_SESSION_TTL_S")
        for entry in self.forwarded_allow_list():
            # (uvicorn would take anything else as a name that never matches: a typo would trust nobody, silently)
            if entry != "*":
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}FORWARDED_ALLOW_IPS: {entry!r} is not an IP address, a network (10.0.0.0/8) or *") from None
        for origin in self.cors_origin_list():
            # A browser sends scheme://host[:port] and nothing else: a path or trailing slash never matches.
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                raise ValueError(f"{ENV_PREFIX}CORS_ORIGINS: {origin!r} is not an origin (scheme://host[:port], no path or "
                                 "trailing slash, e.g. https://app.example.com), nor *")
        return self

    def forwarded_allow_list(self) -> list[str]:
        return _comma_list(self.forwarded_allow_ips)

    def cors_origin_list(self) -> list[str]:
        return _comma_list(self.cors_origins)

    def key_list(self) -> list[str]:
        return _comma_list(self.api_keys)

    def short_keys(self) -> int:
        """How many keys are short enough to guess (under ``SHORT_KEY`` characters): warned about at start."""
        return sum(len(key) < SHORT_KEY for key in self.key_list())

    def owner_hashes(self) -> dict[str, str]:
        """API key -> owner id stored with sessions (a hash, so keys never sit in the store)."""
        return {key: hash_key(key) for key in self.key_list()}

    def resolved_threads(self) -> int:
        if self.threads:
            return self.threads
        return max(1, usable_cores() - 1)

    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        if self.resolved_device().startswith("cuda"):
            return 1  # one worker owns the GPU; its batches are big enough to fill it
        return max(1, usable_cores() // self.resolved_threads())

    def resolved_worker_cpus(self) -> list[list[int]] | None:
        """The cores of each worker (``pin_workers``): consecutive ``threads`` of the allowed ones; None to
        leave them to the scheduler (off, on a GPU, no affinity control, or fewer cores than threads)."""
        if not self.pin_workers or self.resolved_device() != "cpu" or not hasattr(os, "sched_getaffinity"):
            return None
        allowed, threads, workers = sorted(os.sched_getaffinity(0)), self.resolved_threads(), self.resolved_workers()
        if workers * threads > len(allowed):
            return None
        return [allowed[i * threads : (i + 1) * threads] for i in range(workers)]

    def resolved_max_batch_size(self) -> int:
        if self.max_batch_size:
            return self.max_batch_size
        return 64 if self.resolved_device().startswith("cuda") else ENGINE.max_batch_size

    def engine_config(self) -> EngineConfig:
        """The engine's configuration, the automatic values resolved for this machine."""
        return EngineConfig(
            max_batch_size=self.resolved_max_batch_size(),
            max_wait_ms=self.max_wait_ms,
            queue_size=self.queue_size,
            request_timeout_s=self.request_timeout_s,
            threads=self.resolved_threads(),
            workers=self.resolved_workers(),
            cuda_graphs=self.cuda_graphs,
            cpu_traces=self.cpu_traces,
            cpu_scripts=self.cpu_scripts,
            worker_cpus=self.resolved_worker_cpus(),
            inline_predict_ms=self.inline_predict_ms,
            max_batch_work=self.max_example_steps,
        )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        from metalearn import default_device

        return default_device()

    def usable_device(self) -> str:
        """``resolved_device``, refused with a message when it names a GPU this process cannot use."""
        device = self.resolved_device()
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device cuda ({ENV_PREFIX}DEVICE or --device): no CUDA GPU is available to this process "
                               f"(torch {torch.__version__}); use auto or cpu")
        return device

    @classmethod
    def from_environment(cls, **overrides) -> "Settings":
        """The settings, a bad value refused with one line per problem naming its variable (not pydantic's report),
        and so is a ``METALEARN_*`` variable that names no setting: a misspelt one would otherwise be ignored
        (``METALEARN_API_KEY=...`` served every /v1 call without a key)."""
        from dotenv import dotenv_values  # (what pydantic-settings reads the .env file with)

        given = set(os.environ) | set(dotenv_values(cls.model_config["env_file"]))
        unknown = sorted(name for name in given if name.upper().startswith(ENV_PREFIX) and name.upper() not in OTHER_VARIABLES
                         and name.upper()[len(ENV_PREFIX):].lower() not in cls.model_fields)
        if unknown:
            known = [ENV_PREFIX + field.upper() for field in cls.model_fields]
            def hint(name: str) -> str:
                close = difflib.get_close_matches(name.upper(), known, n=1)
                return f"{name} (did you mean {close[0]}?)" if close else name
            raise ValueError(f"bad service settings: unknown variable(s) {', '.join(hint(n) for n in unknown)}; the settings "
                             "are listed in the README's Settings table")
        try:
            return cls(**overrides)
        except ValidationError as error:
            problems = []
            for item in error.errors():
                name = ENV_PREFIX + ".".join(str(part) for part in item["loc"]).upper()
                message = item["msg"].removeprefix("Value error, ")
                problems.append(f"{name}={item['input']!r}: {message}" if item["loc"] else message)
            raise ValueError("bad service settings: " + "; ".join(problems)) from None


def usable_cores() -> int:
    """The cores this process may run on (a container's cpuset, ``taskset``), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


SHORT_KEY = 16


def hash_key(key: str) -> str:
    return hashlib.sha256(("metalearn-owner:" + key).encode()).hexdigest()[:32]


ENV_PREFIX = "METALEARN_"
# METALEARN_* variables that are not service settings: the CLI's traceback switch, docker compose's image variant.
OTHER_VARIABLES = {"METALEARN_DEBUG", "METALEARN_VARIANT"}
