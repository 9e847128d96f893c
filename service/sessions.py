"""Session stores: where adapted parameters live between requests.

A :class:`Session` is what one adaptation produced: the parameters that
adaptation changed (the head for ANIL) and the support-set BatchNorm
statistics, as a flat ``{name: tensor}`` dict, plus a little JSON metadata.
Stores implement :class:`SessionStore`; the in-memory store is the default,
``service.redis_store.RedisSessionStore`` shares sessions between replicas.

Ownership: a session records the (hashed) API key that created it; ``get`` and
``delete`` with another owner behave as if the session did not exist.
"""

from __future__ import annotations

import abc
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


class SessionStoreUnavailable(RuntimeError):
    """The store cannot be reached (e.g. Redis is down): session calls answer 503."""


def new_session_id() -> str:
    """An unguessable id: 256 bits from the OS CSPRNG."""
    return secrets.token_urlsafe(32)


@dataclass
class Session:
    id: str
    model: str
    owner: str | None
    created: float
    expires: float
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    _prepared: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def prepared(self, key: Hashable, make: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``make(self.tensors)``, made once per session object and ``key``: what a worker derives from the
        session for its predictions (its tensors as ``[1, ...]`` views on a device, or a few KB of constants
        a kernel computes with: ``Engine._session_inputs``). The in-memory store keeps the object between
        requests, so this is done once per session where stacking the session's 26 tensors took 70 us of a
        1.5 ms prediction and preparing a MAML kernel's constants 50 us; two workers making it at once make
        equal values. Not counted in ``nbytes``: views share the session's memory, and a Conv4 MAML
        session's constants are 4 KB, 1% of its 440 KB. The Redis store keeps the objects of the
        sessions a replica holds (``RedisSessionStore``); one it rebuilds is prepared again."""
        made = self._prepared.get(key)
        if made is None:
            made = self._prepared[key] = make(self.tensors)
        return made

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


@dataclass
class StoreStats:
    live_sessions: int
    live_bytes: int
    evictions: int
    expirations: int


class SessionStore(abc.ABC):
    """What the engine needs from a session store. Every method may raise :class:`SessionStoreUnavailable`."""

    @abc.abstractmethod
    def put(self, session: Session) -> None:
        """Store a new session (may evict least recently used ones to honour the byte budget)."""

    @abc.abstractmethod
    def get(self, session_id: str, owner: str | None) -> Session | None:
        """The live session, or None if unknown, expired, or owned by someone else; marks it recently used."""

    @abc.abstractmethod
    def delete(self, session_id: str, owner: str | None) -> bool:
        """Remove a session; False if there was none visible to ``owner``."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Live sessions and bytes, evictions and expirations so far (for /metrics)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemorySessionStore(SessionStore):
    """In-process store: LRU order, per-session TTL and a byte budget.

    ``put`` evicts least recently used sessions until the new one fits in
    ``max_bytes`` (a session larger than the whole budget is still stored, alone).
    Expired sessions are dropped lazily (on access and on every ``put``/``stats``)
    and counted as expirations; budget evictions are counted separately.
    Thread-safe.
    """

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, clock=time.time):
        import threading
        from collections import OrderedDict

        self.max_bytes = int(max_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._bytes = 0
        self.evictions = 0
        self.expirations = 0

    def _drop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id)
        self._bytes -= session.nbytes
        return session

    def _sweep(self, now: float) -> None:
        for session_id in [s.id for s in self._sessions.values() if s.expired(now)]:
            self._drop(session_id)
            self.expirations += 1

    def put(self, session: Session) -> None:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            if session.id in self._sessions:
                self._drop(session.id)
            size = session.nbytes
            while self._sessions and self._bytes + size > self.max_bytes:
                oldest = next(iter(self._sessions))
                self._drop(oldest)
                self.evictions += 1
            self._sessions[session.id] = session
            self._bytes += size

    def get(self, session_id: str, owner: str | None) -> Session | None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if session.expired(self._clock()):
                self._drop(session_id)
                self.expirations += 1
                return None
            if session.owner != owner:
                return None
            self._sessions.move_to_end(session_id)
            return session

    def delete(self, session_id: str, owner: str | None) -> bool:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            if session.expired(self._clock()):
                self._drop(session_id)
                self.expirations += 1
                return False
            if session.owner != owner:
                return False
            self._drop(session_id)
            return True

    def stats(self) -> StoreStats:
        with self._lock:
            self._sweep(self._clock())
            return StoreStats(len(self._sessions), self._bytes, self.evictions, self.expirations)
