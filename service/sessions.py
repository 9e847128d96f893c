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
import heapq
import itertools
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field


class SessionStoreUnavailable(RuntimeError):
    """The store cannot be reached (e.g. Redis is down): session calls answer 503."""


class SessionStoreFull(SessionStoreUnavailable):
    """The store refuses new data (Redis at maxmemory without eviction): adaptations answer 503, while
    existing sessions still predict."""


_GROWTH = threading.Lock()


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
    prepared_bytes: int = field(default=0, init=False, repr=False, compare=False)
    # The model version whose layout the tensors fit: set where the adaptation made them, else found by
    # routes.sessions (a session decoded from Redis), once per object
    fits_version: str | None = field(default=None, init=False, repr=False, compare=False)
    _on_grow: Callable[[Session, int], None] | None = field(default=None, init=False, repr=False, compare=False)

    def adapted_from(self, version: str | None) -> bool:
        """Whether this session can predict with the model version ``version`` (None: its model is not served):
        the version it was adapted from, or any where its record does not say."""
        return version is not None and self.meta.get("model_version") in (None, version)

    def prepared(self, key: Hashable, make: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``make(self.tensors)``, made once per session object and ``key``: what a worker derives from the
        session for its predictions (``Engine._session_inputs``: its tensors as ``[1, ...]`` views on a
        device, a few KB of constants a kernel computes with, or a packed copy of the conv weights of the
        blocks where packing pays). The in-memory store keeps the object between requests, so this is done
        once per session where stacking the session's 26 tensors took 70 us of a 1.5 ms prediction and
        packing a MAML session's weights 200 us; two workers making it at once make equal values. The
        memory it takes beyond the session's own tensors is ``prepared_bytes``, which the store holding the
        session counts in its budget (a Conv4-64 MAML session: 440 KB of tensors, 4 KB of constants, up to
        440 KB packed) and gives back first when it needs room (:meth:`forget_prepared`). The Redis store
        keeps the objects of the sessions a replica holds (``RedisSessionStore``); one it rebuilds is
        prepared again."""
        made = self._prepared.get(key)
        if made is None:
            made = make(self.tensors)
            grown = _bytes_beside(made, self.tensors)
            with _GROWTH:  # two workers may prepare keys of one session at once, and the store forget them
                if key in self._prepared:  # (the other worker's, equal)
                    made, grown = self._prepared[key], 0
                else:
                    self._prepared[key] = made
                    self.prepared_bytes += grown
            if grown and self._on_grow is not None:
                self._on_grow(self, grown)
        return made

    def forget_prepared(self) -> int:
        """Drop what was prepared from the session (made again when a prediction needs it): the bytes freed.
        A prediction that holds it already goes on with it."""
        with _GROWTH:
            freed, self.prepared_bytes = self.prepared_bytes, 0
            self._prepared = {}
        return freed

    @property
    def nbytes(self) -> int:
        """The session's own tensors (what its API reports and Redis stores)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def held_bytes(self) -> int:
        """What holding the session object costs: its tensors and what was prepared from them."""
        return self.nbytes + self.prepared_bytes

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


def _bytes_beside(made: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> int:
    """The bytes of ``made``'s tensors that are not views of ``tensors`` (oneDNN's packed tensors have no
    storage to compare: their elements are counted)."""
    shared = {t.untyped_storage().data_ptr() for t in tensors.values() if not t.is_mkldnn}
    return sum(
        t.numel() * t.element_size() for t in made.values() if t.is_mkldnn or t.untyped_storage().data_ptr() not in shared
    )


@dataclass
class StoreStats:
    live_sessions: int
    live_bytes: int
    evictions: int
    expirations: int


class SessionMeta(BaseModel):
    """How a session was adapted: what the adapt route writes in ``Session.meta`` (and ``GET /v1/sessions/{id}``
    shows), each field absent where a store record lacks it. Strict: a Redis record whose fields have other
    JSON types is one this service did not write (``service.redis_store.decode_metadata``)."""

    model_config = ConfigDict(protected_namespaces=(), strict=True)
    model_version: Optional[str] = Field(None, description="The checkpoint version the session was adapted from.")
    inner_steps: Optional[int] = None
    inner_lr: Optional[float] = Field(None, description="null or absent: the model's learned rates (learned_lrs).")
    support_size: Optional[int] = None
    support_loss_before: Optional[float] = None
    support_loss_after: Optional[float] = None


class SessionStore(abc.ABC):
    """What the routes need from a session store (the engine never sees one: it gets a session's tensors). Every method may raise :class:`SessionStoreUnavailable`."""

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

    prepared_dropped = 0  # times a held session's prepared tensors were dropped for room (a store that holds sessions)

    def forget_models(self, served: dict[str, str]) -> int:
        """Drop the sessions held in this process of models not served in that version (``served``: model name ->
        version), after a reload replaced or removed some: they answer 404 anyway, and would hold their memory
        until they expire. Returns how many were dropped. A store with nothing in process has none."""
        return 0

    def failed_recently(self) -> bool:
        """Whether a call failed in the last second (a network store: Redis down). An adaptation then asks
        :meth:`check` before it computes a session the store may not take."""
        return False

    def check(self) -> None:  # noqa: B027 - a store that cannot fail has nothing to check
        """Raise :class:`SessionStoreUnavailable` unless the store answers now (may block: a network call)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemorySessionStore(SessionStore):
    """In-process store: LRU order, per-session TTL and a byte budget.

    ``put`` makes room for the new session in ``max_bytes``: it drops what was
    prepared from the other sessions, least recently used first, then evicts
    sessions: the least recently used one of the owner (API key) holding the
    most bytes, the new session counted, so that a key adapting many sessions
    evicts its own rather than everyone's (with one owner, plain LRU; a session
    larger than the whole budget is still stored, alone). A session counts its ``held_bytes``: what a worker
    prepares from it later (``Session.prepared``) grows its count and makes room
    from the other sessions' prepared tensors, else is dropped again itself: it
    never evicts a session.
    Expired sessions are dropped lazily (on access and on every ``put``/``stats``)
    and counted as expirations; budget evictions are counted separately.
    Thread-safe.
    """

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, clock=time.time):
        self.max_bytes = int(max_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._sizes: dict[str, int] = {}  # as counted: a session's held_bytes may grow before its hook reports it
        self._bytes = 0
        self._owner_bytes: dict[str | None, int] = {}  # what each owner's sessions hold (their _sizes summed), per owner holding one
        self._owner_order: dict[str | None, OrderedDict[str, None]] = {}  # each owner's sessions, least recent first
        self.evictions = 0
        self.expirations = 0
        self.prepared_dropped = 0  # sessions whose prepared tensors were dropped for room
        # Expiry times, soonest first, so that a sweep looks only at the sessions due (a scan of every session
        # took 2.4 ms of each put into a full store of 20 000); an entry whose session went is skipped.
        self._expiries: list[tuple[float, int, str]] = []
        self._expiry_order = itertools.count()
        self._with_prepared: set[str] = set()  # sessions holding prepared tensors (where room comes from first)

    def _resize(self, session: Session, delta: int) -> None:
        self._sizes[session.id] += delta
        self._bytes += delta
        self._owner_bytes[session.owner] += delta

    def _drop(self, session_id: str) -> Session:
        session = self._sessions.pop(session_id)
        self._resize(session, -self._sizes[session_id])
        del self._sizes[session_id]
        order = self._owner_order[session.owner]
        del order[session_id]
        if not order:  # (an owner is counted while it holds a session)
            del self._owner_order[session.owner], self._owner_bytes[session.owner]
        self._with_prepared.discard(session_id)
        return session

    def _evict_for(self, size: int, keep: Session | None = None, sessions_too: bool = True, owner: str | None = None) -> None:
        """Make room for ``size`` more bytes: first what was prepared from the sessions (not ``keep``), least
        recently used first (made again in well under a millisecond when a prediction needs it), then, with
        ``sessions_too``, sessions themselves, whose clients would have to adapt again: the least recently used
        of the owner holding the most, ``size`` counted as ``owner``'s."""
        kept = getattr(keep, "id", None)
        for session_id in self._sessions:  # least recently used first, while another session holds some
            if self._bytes + size <= self.max_bytes or len(self._with_prepared) <= (kept in self._with_prepared):
                break
            if session_id in self._with_prepared and session_id != kept:
                self._forget_prepared(self._sessions[session_id])
        while sessions_too and self._bytes + size > self.max_bytes and self._sessions:
            heaviest = max(self._owner_bytes, key=lambda o: self._owner_bytes[o] + (size if o == owner else 0))
            self._drop(next(iter(self._owner_order[heaviest])))  # (its own order: no scan of the others' sessions)
            self.evictions += 1

    def _forget_prepared(self, session: Session) -> None:
        self._with_prepared.discard(session.id)
        self._resize(session, -session.forget_prepared())
        self.prepared_dropped += 1

    def _grew(self, session: Session, grown: int) -> None:
        """What was prepared from ``session`` grew: room from the other sessions' prepared tensors, else its
        own go again (a prepared tensor never evicts a session; the prediction that made it keeps it)."""
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return  # dropped meanwhile, or replaced
            self._evict_for(grown, keep=session, sessions_too=False)
            self._resize(session, grown)
            self._with_prepared.add(session.id)
            if self._bytes > self.max_bytes and session.prepared_bytes:
                self._forget_prepared(session)

    def _sweep(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, _, session_id = heapq.heappop(expiries)
            session = self._sessions.get(session_id)
            if session is not None and session.expired(now):  # (not gone, nor put again with a later expiry)
                self._drop(session_id)
                self.expirations += 1
        if len(expiries) > 2 * len(self._sessions) + 1024:  # entries of sessions deleted or evicted: rebuilt
            self._expiries = [(s.expires, next(self._expiry_order), s.id) for s in self._sessions.values()]
            heapq.heapify(self._expiries)

    def put(self, session: Session) -> None:
        with self._lock:
            now = self._clock()
            self._sweep(now)
            if session.id in self._sessions:
                self._drop(session.id)
            session._on_grow = self._grew  # before its size is read: growth after it is reported (under this lock)
            size = session.held_bytes
            self._evict_for(size, owner=session.owner)
            self._sessions[session.id] = session
            self._owner_order.setdefault(session.owner, OrderedDict())[session.id] = None
            self._owner_bytes.setdefault(session.owner, 0)
            self._sizes[session.id] = 0
            self._resize(session, size)
            heapq.heappush(self._expiries, (session.expires, next(self._expiry_order), session.id))
            if session.prepared_bytes:
                self._with_prepared.add(session.id)

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
            self._owner_order[owner].move_to_end(session_id)
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

    def forget_models(self, served: dict[str, str]) -> int:
        with self._lock:
            stale = [i for i, s in self._sessions.items() if not s.adapted_from(served.get(s.model))]
            for session_id in stale:
                self._drop(session_id)
            return len(stale)
