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
