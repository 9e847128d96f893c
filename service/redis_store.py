"""A session store in Redis, shared by every replica of the service.

Select it with ``METALEARN_SESSION_BACKEND=redis`` and ``METALEARN_REDIS_URL``
(``service.app.create_store``). Every replica pointed at the same Redis sees
the same sessions: adapt on one, predict on another.

Layout (``P`` is the key prefix, ``metalearn:`` by default)::

    P s:<id>       hash   t = safetensors bytes of the session tensors
                          m = JSON metadata (model, owner, created, expires, meta)
                          o = owner ("" for none), n = tensor bytes
                          expires with the session (PEXPIRE: Redis enforces the TTL)
    P lru          zset   id -> use tick (least recently used first)
    P exp          zset   id -> expiry, Redis server time in ms
    P size         hash   id -> tensor bytes
    P bytes        string running total of the live sessions' tensor bytes
    P tick         string monotonic counter that orders uses
    P evictions    string sessions evicted for the byte budget (shared by replicas)
    P expirations  string sessions that reached their TTL (shared by replicas)

Every operation is one Lua script, so the bookkeeping stays consistent with
many replicas writing at once: a script first sweeps the sessions whose TTL
has passed (by Redis's own clock; Redis has already dropped or will drop the
session hash itself), then does its work; ``put`` evicts least recently used
sessions until the new one fits the byte budget.

No pickle anywhere: tensors travel as safetensors bytes, everything else as
JSON. Every Redis failure (refused connection, timeout, loading, OOM, ...) is
raised as :class:`~service.sessions.SessionStoreUnavailable` so the service
answers ``503``; sockets have short timeouts so a dead Redis never hangs a
request, and the connection pool reconnects on the next call once Redis is
back, with no restart of the service.

The scripts touch keys derived from the prefix inside Lua (eviction needs the
victims' keys), which standalone Redis and Sentinel accept; Redis Cluster
would need every key in one hash slot (a ``{tag}`` prefix) and is untested.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any

import redis
import torch
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from service.sessions import MemorySessionStore, Session, SessionMeta, SessionStore, SessionStoreFull, SessionStoreUnavailable, StoreStats

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "metalearn:"
DEFAULT_HELD = 64 * 1024 * 1024

# Shared Lua: sweep sessions whose expiry (server time) has passed.
# KEYS[1] lru, KEYS[2] exp, KEYS[3] size, KEYS[4] bytes, KEYS[5] tick, KEYS[6] evictions, KEYS[7] expirations,
# KEYS[8] owner_of (id -> "BYTES OWNER"), KEYS[9] owners (owner -> the bytes of its sessions); ARGV[1] prefix.
# Each owner also has its own recency order, prefix .. 'lru:' .. owner (what eviction takes from). A session's
# bytes are kept beside its owner because a replica of an earlier release forgets a session without these
# records: what it leaves is found stale (no size) and taken off its owner's count.
_LUA_COMMON = r"""
local lru, exp, size, total, tick, evictions, expirations = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local owner_of, owners = KEYS[8], KEYS[9]
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Counters and recency are bookkeeping: a Redis out of memory (maxmemory with noeviction) refuses
-- their writes, and reads and deletions must still work (deleting is always allowed).
local function count(key, n) redis.pcall('INCRBY', key, n) end

-- Take a session off its owner's records (its recency order, its bytes); nothing for one stored without them.
local function disown(id)
  local record = redis.call('HGET', owner_of, id)
  if not record then return end
  local n, o = string.match(record, '^(%d+) (.*)$')
  redis.call('HDEL', owner_of, id)
  redis.call('ZREM', prefix .. 'lru:' .. o, id)
  if redis.call('EXISTS', prefix .. 'lru:' .. o) == 0 then
    redis.call('ZREM', owners, o)
  else
    redis.pcall('ZINCRBY', owners, -tonumber(n), o)
  end
end

local function forget(id)
  local n = tonumber(redis.call('HGET', size, id) or '0')
  disown(id)
  redis.call('ZREM', lru, id)
  redis.call('ZREM', exp, id)
  redis.call('HDEL', size, id)
  if n > 0 then count(total, -n) end
  redis.call('DEL', prefix .. 's:' .. id)
end

-- A key under a session's name that is not a hash was written by something else: dropped, as a record that
-- does not decode is (its reads would fail with WRONGTYPE, a 503 for as long as it stays).
local function foreign(key, id)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'hash' or kind == 'none' then return false end
  redis.log(redis.LOG_WARNING, 'metalearn: dropping ' .. key .. ', a ' .. kind .. ' where a session belongs')
  forget(id)
  return true
end

local function sweep()
  local ids = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 1000)
  for _, id in ipairs(ids) do
    forget(id)
    count(expirations, 1)
  end
end
sweep()
"""

# ARGV: prefix, id, tensors, meta json, owner, nbytes, ttl_ms, budget
_LUA_PUT = _LUA_COMMON + r"""
local id, blob, meta, owner = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local nbytes, ttl, budget = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
if redis.call('HEXISTS', size, id) == 1 then forget(id) end
-- The least recently used session of the owner holding the most bytes, this session counted as its
-- owner's: a key adapting many sessions evicts its own rather than everyone's (one owner: plain LRU).
-- Sessions stored by an earlier release (no owner record) go first, oldest first. nil after it dropped a stale
-- entry instead (each round makes progress).
local function victim()
  local oldest = redis.call('ZRANGE', lru, 0, 0)[1]
  if oldest and redis.call('HEXISTS', owner_of, oldest) == 0 then return oldest end
  local ranked = redis.call('ZRANGE', owners, 0, -1, 'WITHSCORES')
  local heaviest, most = nil, -1
  for i = 1, #ranked, 2 do
    local held = tonumber(ranked[i + 1]) + (ranked[i] == owner and nbytes or 0)
    if held > most then heaviest, most = ranked[i], held end
  end
  if not heaviest then return oldest end
  local order = prefix .. 'lru:' .. heaviest
  local id = redis.call('ZRANGE', order, 0, 0)[1]
  if not id then
    redis.call('ZREM', owners, heaviest)
  elseif redis.call('HEXISTS', size, id) == 0 then
    disown(id)  -- (forgotten by a replica of an earlier release: off its owner's count, not an eviction)
    redis.call('ZREM', order, id)
  else
    return id
  end
  return nil
end
local evicted = 0
-- a session larger than the whole budget evicts everything and is stored alone
-- (as the in-memory store does)
while redis.call('ZCARD', lru) > 0 and tonumber(redis.call('GET', total) or '0') + nbytes > budget do
  local id = victim()
  if id then
    forget(id)
    redis.call('INCR', evictions)
    evicted = evicted + 1
  end
end
if redis.call('ZCARD', lru) == 0 then
  -- nothing else is live: resynchronise the byte counts (they drift only if keys were removed by hand)
  redis.call('SET', total, 0)
  redis.call('DEL', owners, owner_of)
end
local key = prefix .. 's:' .. id
redis.call('HSET', key, 't', blob, 'm', meta, 'o', owner, 'n', nbytes)
redis.call('PEXPIRE', key, ttl)
local recent = redis.call('INCR', tick)
redis.call('ZADD', lru, recent, id)
redis.call('ZADD', prefix .. 'lru:' .. owner, recent, id)
redis.call('ZADD', exp, now + ttl, id)
redis.call('HSET', size, id, nbytes)
redis.call('HSET', owner_of, id, nbytes .. ' ' .. owner)
redis.call('ZINCRBY', owners, nbytes, owner)
redis.call('INCRBY', total, nbytes)
return {1, evicted}
"""

# ARGV: prefix, id, owner, "1" for the metadata alone -> nil | {tensors ("" with "1"), meta json}
_LUA_GET = _LUA_COMMON + r"""
local id, owner, meta_only = ARGV[2], ARGV[3], ARGV[4] == '1'
local key = prefix .. 's:' .. id
if foreign(key, id) then return false end
local v = redis.call('HMGET', key, 'm', 'o')
if not v[1] then
  if redis.call('HEXISTS', size, id) == 1 then
    -- Redis expired the hash before our sweep saw it
    forget(id)
    count(expirations, 1)
  end
  return false
end
if v[2] ~= owner then return false end
local recent = redis.pcall('INCR', tick)
if type(recent) == 'number' then
  redis.pcall('ZADD', lru, recent, id)
  if redis.call('HEXISTS', owner_of, id) == 1 then redis.pcall('ZADD', prefix .. 'lru:' .. owner, recent, id) end
end
if meta_only then return {'', v[1]} end
return {redis.call('HGET', key, 't'), v[1]}
"""

# ARGV: prefix, id, owner -> 1 | 0
_LUA_DELETE = _LUA_COMMON + r"""
local id, owner = ARGV[2], ARGV[3]
local key = prefix .. 's:' .. id
if foreign(key, id) then return 0 end
local o = redis.call('HGET', key, 'o')
if not o then
  if redis.call('HEXISTS', size, id) == 1 then
    forget(id)
    count(expirations, 1)
  end
  return 0
end
if o ~= owner then return 0 end
forget(id)
return 1
"""

# ARGV: prefix -> {live sessions, live bytes, evictions, expirations}
_LUA_STATS = _LUA_COMMON + r"""
return {redis.call('ZCARD', lru), tonumber(redis.call('GET', total) or '0'),
        tonumber(redis.call('GET', evictions) or '0'), tonumber(redis.call('GET', expirations) or '0')}
"""


def _owner_field(owner: str | None) -> str:
    # Owners are hashed API keys (never empty); "" stands for "no key configured".
    return owner or ""


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Session tensors as safetensors bytes (CPU, contiguous, no shared storage)."""
    return st_save({name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()})


class CorruptRecord(ValueError):
    """A session record in Redis that this service did not write (by hand, another program, a bug): dropped."""


def decode_tensors(blob: bytes, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The session tensors of a record's safetensors bytes (:class:`CorruptRecord` for bytes that are not
    safetensors data; safetensors never unpickles). Whether they fit the session's model is the route's check
    (``LoadedModel.session_problem``)."""
    try:
        tensors = st_load(blob)
    except Exception as error:  # noqa: BLE001 - safetensors raises several kinds for bytes that are not its own
        raise CorruptRecord(f"its tensors are not safetensors data ({type(error).__name__}: {str(error)[:100]})") from None
    if device is not None and torch.device(device).type != "cpu":
        tensors = {name: t.to(device) for name, t in tensors.items()}
    return tensors


def decode_metadata(raw: Any) -> dict:
    """A record's JSON metadata, checked for the fields and types :meth:`RedisSessionStore.put` writes
    (:class:`CorruptRecord` otherwise: a string expiry in the replica's held sessions broke every later sweep)."""
    try:
        m = json.loads(raw)
    except (TypeError, ValueError):
        raise CorruptRecord("its metadata is not JSON") from None
    if not isinstance(m, dict):
        raise CorruptRecord("its metadata is not a JSON object")
    if not isinstance(m.get("model"), str) or not (m.get("owner") is None or isinstance(m["owner"], str)):
        raise CorruptRecord("its metadata has no model name, or an owner that is not a string")
    for key in ("created", "expires"):
        value = m.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CorruptRecord(f"its metadata's {key!r} is not a time ({str(value)[:40]!r})")
    meta = m.get("meta") or {}
    if not isinstance(meta, dict):
        raise CorruptRecord("its metadata's 'meta' is not a JSON object")
    try:  # (GET /v1/sessions/{id} shows them, typed)
        SessionMeta.model_validate(meta)
    except ValidationError as error:
        first = error.errors()[0]
        raise CorruptRecord(f"its metadata's meta.{first['loc'][0]}: {first['msg']}") from None
    return m


class RedisSessionStore(SessionStore):
    """Sessions in Redis: TTL enforced by Redis, LRU eviction under a byte budget, owner checks.

    ``budget_bytes`` counts the tensor bytes of all live sessions of this prefix,
    across every replica; ``put`` evicts least recently used sessions until the
    new one fits (one larger than the whole budget is stored alone, as the
    in-memory store does). ``device`` is where :meth:`get` puts the tensors
    (``None``: CPU; the engine moves them to the model's device). ``socket_timeout``
    bounds every Redis call (connect and read).

    Each replica also holds the sessions it last put or got, decoded, in a
    :class:`MemorySessionStore` of ``held_bytes`` (least recently used dropped;
    0: none). A session holds
    nothing but what its adaptation produced and never changes, so :meth:`get`
    of a held one asks Redis for its metadata alone: Redis still decides whether
    it exists, has expired and belongs to the caller, and counts the use, but
    its tensors do not travel again (a Conv4 MAML session's get: 0.10-0.14 ms
    held against 0.77-0.86 ms fetching and decoding its 440 KB,
    ``bench/experiments/redis_held.py``), and the object the engine keeps its
    prepared inputs on (``Session.prepared``) lives on.
    """

    @classmethod
    def from_settings(cls, settings: Any, device: str | torch.device | None = None) -> "RedisSessionStore":
        """The store ``METALEARN_SESSION_BACKEND=redis`` selects (``service.settings.Settings``):
        ``METALEARN_REDIS_URL``, the budget ``METALEARN_CACHE_BYTES`` (all replicas' sessions together),
        ``METALEARN_REDIS_HELD_BYTES``, ``METALEARN_REDIS_TIMEOUT_S``."""
        return cls(settings.redis_url, settings.cache_bytes, device=device, held_bytes=settings.redis_held_bytes,
                   socket_timeout=settings.redis_timeout_s)

    def __init__(
        self,
        url: str,
        budget_bytes: int,
        prefix: str = DEFAULT_PREFIX,
        *,
        device: str | torch.device | None = None,
        socket_timeout: float = 0.5,
        client: redis.Redis | None = None,
        held_bytes: int = DEFAULT_HELD,
    ) -> None:
        if budget_bytes < 0 or held_bytes < 0:
            raise ValueError(f"budget_bytes and held_bytes must be >= 0, got {budget_bytes} and {held_bytes}")
        self.url = url
        self._where = f"Redis at {_redact(url)}"  # (for messages: the URL without its password)
        self.socket_timeout = socket_timeout
        self._hung_until = -math.inf  # until when calls fail at once, after one timed out
        self._failed_at = -math.inf  # when the last call failed (failed_recently); -inf once one succeeded since
        self.budget_bytes = int(budget_bytes)
        self.held_bytes = int(held_bytes)
        self._held = self._new_held()
        self._counts_lock = threading.Lock()  # the service calls the store from several threads
        self.held_gets = self.fetched_gets = 0  # gets answered with a held session / by fetching its tensors
        self.prefix = prefix
        self.device = device
        self._client = client or redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            # one immediate retry: a pooled connection that Redis dropped (restart) is
            # replaced on the spot; with Redis down both tries fail fast. Not after a timeout:
            # a hung Redis would hold each call for two timeouts instead of one.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            health_check_interval=10,
            max_connections=64,
        )
        self._keys = [prefix + k for k in ("lru", "exp", "size", "bytes", "tick", "evictions", "expirations", "owner_of", "owners")]
        self._put = self._client.register_script(_LUA_PUT)
        self._get = self._client.register_script(_LUA_GET)
        self._delete = self._client.register_script(_LUA_DELETE)
        self._stats = self._client.register_script(_LUA_STATS)

    def __repr__(self) -> str:
        return f"RedisSessionStore(url={_redact(self.url)!r}, budget_bytes={self.budget_bytes}, prefix={self.prefix!r})"

    def _call(self, script, *args: Any):
        if time.monotonic() < self._hung_until:
            # Redis just left a call unanswered for a whole timeout: the calls arriving meanwhile fail at once
            # instead of each holding a thread for another timeout (a hung Redis under load).
            raise SessionStoreUnavailable(f"session store unavailable ({self._where}): no answer within {self.socket_timeout:g} s a moment ago")
        try:
            answer = script(keys=self._keys, args=[self.prefix, *args])
        except (redis.exceptions.RedisError, OSError) as e:  # (OSError: socket errors that escape redis-py's wrapping)
            if isinstance(e, redis.exceptions.TimeoutError):
                self._hung_until = time.monotonic() + self.socket_timeout
            if isinstance(e, redis.exceptions.ResponseError) and ("maxmemory" in str(e) or str(e).startswith("OOM")):
                failure: SessionStoreUnavailable = SessionStoreFull(f"{self._where} is out of memory (maxmemory): {e}")
            else:
                failure = SessionStoreUnavailable(f"session store unavailable ({self._where}): {e}")
            self._failed_at = time.monotonic()
            raise failure from e
        self._failed_at = -math.inf
        return answer

    def failed_recently(self) -> bool:
        return time.monotonic() - self._failed_at < 1.0

    def check(self) -> None:
        self._call(self._stats)  # (one round trip; Redis back: it clears failed_recently)

    # SessionStore -------------------------------------------------------------------

    def put(self, session: Session) -> None:
        blob = encode_tensors(session.tensors)
        nbytes = session.nbytes
        meta = json.dumps(
            {
                "model": session.model,
                "owner": session.owner,
                "created": session.created,
                "expires": session.expires,
                "meta": session.meta,
            }
        )
        ttl_ms = max(1, math.ceil((session.expires - time.time()) * 1000))
        _, evicted = self._call(
            self._put, session.id, blob, meta, _owner_field(session.owner), nbytes, ttl_ms, self.budget_bytes
        )
        if evicted:
            log.debug("evicted %d session(s) to fit %s", evicted, session.id)
        if self._held is not None:
            self._held.put(session)

    def get(self, session_id: str, owner: str | None) -> Session | None:
        held = None if self._held is None else self._held.get(session_id, owner)
        found = self._call(self._get, session_id, _owner_field(owner), "1" if held is not None else "0")
        if not found:
            if held is not None:
                self._held.delete(session_id, owner)
            return None
        blob, meta = found
        try:
            m = decode_metadata(meta)
            if held is not None:
                if held.created == m["created"]:
                    self._count("held_gets")
                    return held
                self._held.delete(session_id, owner)  # put again under the same id since: fetch what is there now
                return self.get(session_id, owner)
            session = Session(
                id=session_id,
                model=m["model"],
                owner=m.get("owner"),
                created=m["created"],
                expires=m["expires"],
                tensors=decode_tensors(blob, self.device),
                meta=m.get("meta") or {},
            )
        except CorruptRecord as error:
            return self._drop_corrupt(session_id, owner, error)
        if self._held is not None:
            self._held.put(session)
        self._count("fetched_gets")
        return session

    def _drop_corrupt(self, session_id: str, owner: str | None, error: CorruptRecord) -> None:
        """A record this service did not write: logged with its key, deleted (its caller adapts again, as for a
        session that expired), and answered as no session."""
        log.error("dropping session record %ss:%s... in %s: %s", self.prefix, session_id[:8], self._where, error)
        if self._held is not None:
            self._held.delete(session_id, owner)
        try:
            self._call(self._delete, session_id, _owner_field(owner))
        except SessionStoreUnavailable:
            pass  # (it stays unusable and is dropped again next time)
        return None

    def delete(self, session_id: str, owner: str | None) -> bool:
        deleted = bool(self._call(self._delete, session_id, _owner_field(owner)))
        if deleted and self._held is not None:
            self._held.delete(session_id, owner)
        return deleted

    # The sessions this replica holds decoded -------------------------------------------
    def _new_held(self) -> MemorySessionStore | None:
        """The held sessions: an in-memory store of ``held_bytes`` (its LRU order, expiry and owner check
        serve here too), or None for none."""
        return MemorySessionStore(self.held_bytes) if self.held_bytes else None

    def _count(self, name: str) -> None:
        with self._counts_lock:
            setattr(self, name, getattr(self, name) + 1)

    @property
    def prepared_dropped(self) -> int:
        """Times the held sessions' prepared tensors were dropped for room (``MemorySessionStore``)."""
        return self._held.prepared_dropped if self._held is not None else 0

    def held_stats(self) -> dict[str, int]:
        """This replica's held sessions and bytes, and its gets answered with one or by fetching (for /metrics)."""
        held = self._held.stats() if self._held is not None else StoreStats(0, 0, 0, 0)
        return {"sessions": held.live_sessions, "bytes": held.live_bytes, "held_gets": self.held_gets, "fetched_gets": self.fetched_gets}

    def forget_models(self, served: dict[str, str]) -> int:
        """The held copies of other versions' sessions (their records stay in Redis until their TTL: finding them
        would mean scanning every key, and each replica answers 404 for them anyway)."""
        return 0 if self._held is None else self._held.forget_models(served)

    def stats(self) -> StoreStats:
        live, nbytes, evictions, expirations = self._call(self._stats)
        return StoreStats(
            live_sessions=int(live), live_bytes=int(nbytes), evictions=int(evictions), expirations=int(expirations)
        )

    def ping(self) -> bool:
        """True when Redis answers (for readiness checks); never raises."""
        try:
            return bool(self._client.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    def clear(self) -> None:
        """Drop every session and counter under this prefix (tests, admin)."""
        self._held = self._new_held()
        try:
            for key in self._client.scan_iter(match=self.prefix + "*", count=1000):
                self._client.delete(key)
        except redis.exceptions.RedisError as e:
            raise SessionStoreUnavailable(str(e)) from e

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # pragma: no cover - best effort
            pass


def _redact(url: str) -> str:
    """The URL without its password (``redis://:PASS@host`` or redis-py's ``?password=PASS``) or its query."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password:
            netloc = netloc.replace(":" + parts.password + "@", ":***@")
        # (the query holds options redis-py reads, the password among them: left out whole)
        return urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))
    except ValueError:
        return "(an unreadable URL)"
