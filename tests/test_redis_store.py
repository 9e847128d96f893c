"""The Redis session store against a real ``redis-server`` on loopback.

The fixture starts ``redis-server`` on a free 127.0.0.1 port in a temporary
directory (no persistence) and skips only when ``redis-server`` is not
installed (``apt-get install redis-server``; ``.ci/run`` installs it).
Tests only ever talk to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

redis = pytest.importorskip("redis")

from test_service_helpers import free_port  # noqa: E402
from service.redis_store import RedisSessionStore, decode_tensors, encode_tensors  # noqa: E402
from service.sessions import Session, SessionStoreUnavailable, new_session_id  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER, "redis-server not installed"
        self.log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.workdir / 'redis.log').read_text()[-2000:]}")
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.05)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) server cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server); the Redis tests need it")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def store(redis_server, request):
    prefix = f"test:{request.node.name}:{os.getpid()}:"
    s = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=prefix)
    s.clear()
    yield s
    if redis_server.proc is not None:
        s.clear()
    s.close()


def make_session(owner: str | None = "alice", ttl: float = 60.0, nbytes: int = 1000, model: str = "m", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = nbytes // 4
    tensors = {"head.weight": torch.randn(n - n // 5, generator=g), "head.bias": torch.randn(n // 5, generator=g)}
    now = time.time()
    return Session(new_session_id(), model, owner, now, now + ttl, tensors, {"steps": 3, "loss": [1.5, 0.25]})


def test_round_trip(store, redis_server):
    s = make_session()
    s.tensors["bn.running_mean"] = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    s.tensors["codes"] = torch.tensor([1, 2, 3], dtype=torch.int64)
    store.put(s)
    replica = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix)  # decodes what the first stored
    got = replica.get(s.id, "alice")
    replica.close()
    assert got is not None and got is not s
    assert (got.id, got.model, got.owner, got.meta) == (s.id, s.model, s.owner, s.meta)
    assert got.created == pytest.approx(s.created) and got.expires == pytest.approx(s.expires)
    assert set(got.tensors) == set(s.tensors)
    for name, t in s.tensors.items():
        assert got.tensors[name].dtype == t.dtype and got.tensors[name].shape == t.shape
        assert torch.equal(got.tensors[name], t)
    assert got.nbytes == s.nbytes
    assert store.stats().live_sessions == 1 and store.stats().live_bytes == s.nbytes
    assert store.delete(s.id, "alice") is True
    assert store.get(s.id, "alice") is None
    assert store.delete(s.id, "alice") is False
    assert store.stats().live_sessions == 0 and store.stats().live_bytes == 0


def test_no_pickle_in_redis(store, redis_server):
    """What is stored is safetensors bytes and JSON, nothing a pickle loader would read."""
    s = make_session()
    store.put(s)
    client = redis.Redis.from_url(redis_server.url)
    fields = client.hgetall(store.prefix + "s:" + s.id)
    assert set(fields) == {b"t", b"m", b"o", b"n"}
    import json

    meta = json.loads(fields[b"m"])
    assert meta["model"] == "m" and meta["meta"] == {"steps": 3, "loss": [1.5, 0.25]}
    header_len = int.from_bytes(fields[b"t"][:8], "little")
    header = json.loads(fields[b"t"][8 : 8 + header_len])
    assert set(header) >= {"head.weight", "head.bias"}
    assert not fields[b"t"].startswith(b"\x80")  # pickle protocol marker
    client.close()


def test_empty_and_odd_tensors_encode():
    tensors = {"a": torch.zeros(0), "b": torch.ones(3, 4).t(), "c": torch.tensor(2.5, dtype=torch.bfloat16)}
    back = decode_tensors(encode_tensors(tensors))
    for k, t in tensors.items():
        assert torch.equal(back[k], t)


def test_a_replica_holds_its_sessions_decoded_and_redis_still_decides(store, redis_server, monkeypatch):
    """A session a replica put or got is held decoded: a later get asks Redis for its metadata alone (no
    tensors fetched or decoded) and returns the same object. Redis still decides: a delete on another
    replica, the TTL and another owner all answer None; the held bytes stay within their budget."""
    from service import redis_store

    decoded = []
    real_decode = redis_store.decode_tensors
    monkeypatch.setattr(redis_store, "decode_tensors", lambda blob, device=None: decoded.append(len(blob)) or real_decode(blob, device))
    other = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix, held_bytes=2_500)
    try:
        s = make_session(nbytes=1000)
        store.put(s)
        assert store.get(s.id, "alice") is s and decoded == []  # held since its put
        got = other.get(s.id, "alice")
        assert decoded == [len(encode_tensors(s.tensors))] and torch.equal(got.tensors["head.bias"], s.tensors["head.bias"])
        assert other.get(s.id, "alice") is got and len(decoded) == 1  # decoded once, then held
        assert other.held_stats() == {"sessions": 1, "bytes": s.nbytes, "held_gets": 1, "fetched_gets": 1}
        assert other.get(s.id, "mallory") is None  # the owner check stays in Redis
        assert store.delete(s.id, "alice")
        assert other.get(s.id, "alice") is None  # deleted by another replica: gone here too

        short = make_session(ttl=1.0)
        other.put(short)
        assert other.get(short.id, "alice") is short
        time.sleep(1.2)
        assert other.get(short.id, "alice") is None  # expired in Redis, held or not

        sessions = [make_session(nbytes=1000, seed=i) for i in range(3)]
        for session in sessions:
            other.put(session)
        held = other.held_stats()
        assert (held["sessions"], held["bytes"]) == (2, sessions[1].nbytes + sessions[2].nbytes)  # within 2 500 bytes
        assert other.get(sessions[2].id, "alice") is sessions[2]  # still held
        assert other.get(sessions[0].id, "alice") is not sessions[0]  # the least recently used, dropped: fetched and decoded again

        holding_none = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix, held_bytes=0)
        first = holding_none.get(sessions[2].id, "alice")
        assert holding_none.get(sessions[2].id, "alice") is not first and holding_none.held_stats()["sessions"] == 0
        holding_none.close()
    finally:
        other.close()


def test_ttl_expiry_enforced_by_redis(store, redis_server):
    s = make_session(ttl=1.0)
    keep = make_session(ttl=60)
    store.put(s)
    store.put(keep)
    client = redis.Redis.from_url(redis_server.url)
    pttl = client.pttl(store.prefix + "s:" + s.id)
    assert 0 < pttl <= 1000
    assert store.get(s.id, "alice") is not None
    time.sleep(1.2)
    # Redis itself dropped the key: no client-side clock involved
    assert client.exists(store.prefix + "s:" + s.id) == 0 or client.pttl(store.prefix + "s:" + s.id) < 0
    assert store.get(s.id, "alice") is None
    st = store.stats()
    assert st.expirations == 1 and st.live_sessions == 1 and st.live_bytes == keep.nbytes
    assert store.get(keep.id, "alice") is not None
    client.close()


def test_expired_sessions_are_swept_without_a_get(store):
    for _ in range(3):
        store.put(make_session(ttl=1.0))
    assert store.stats().live_sessions == 3
    time.sleep(1.2)
    st = store.stats()
    assert (st.live_sessions, st.live_bytes, st.expirations) == (0, 0, 3)


def test_byte_budget_lru_eviction(store):
    # budget 10_000 bytes, sessions of 3_000: three fit, the fourth evicts the least recently used
    a, b, c, d = (make_session(nbytes=3000, seed=i) for i in range(4))
    for s in (a, b, c):
        store.put(s)
    assert store.stats().live_bytes == 9000
    assert store.get(a.id, "alice") is not None  # a is now the most recently used; b the least
    store.put(d)
    assert store.get(b.id, "alice") is None
    assert all(store.get(s.id, "alice") is not None for s in (a, c, d))
    st = store.stats()
    assert (st.live_sessions, st.live_bytes, st.evictions, st.expirations) == (3, 9000, 1, 0)
    big = make_session(nbytes=8000, seed=9)
    store.put(big)  # needs 8000: evicts a, c, d in LRU order (a, c, d were used in that order)
    assert store.get(big.id, "alice") is not None
    st = store.stats()
    assert (st.live_sessions, st.live_bytes, st.evictions) == (1, 8000, 4)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_key_that_adapts_many_sessions_evicts_its_own(kind, request):
    """When room is needed, the least recently used session of the owner holding the most bytes goes (the new one
    counted as its owner's): one key adapting in a loop no longer evicts every other key's sessions."""
    from service.sessions import MemorySessionStore

    store = MemorySessionStore(10_000) if kind == "memory" else request.getfixturevalue("store")
    bob = make_session(owner="bob", nbytes=2000, seed=100)
    store.put(bob)
    alice = [make_session(nbytes=2000, seed=i) for i in range(8)]
    for s in alice:
        store.put(s)
    assert store.get(bob.id, "bob") is not None  # (plain LRU evicted it with alice's first four)
    assert [store.get(s.id, "alice") is not None for s in alice] == [False] * 4 + [True] * 4
    assert (store.stats().live_bytes, store.stats().evictions) == (10_000, 4)
    # Bob's next session: alice holds 8000, bob 2000 + 2000: alice's least recently used goes (alice[4] was read first)
    store.put(make_session(owner="bob", nbytes=2000, seed=101))
    assert store.get(bob.id, "bob") is not None and store.get(alice[4].id, "alice") is None
    assert all(store.get(s.id, "alice") is not None for s in alice[5:])


def test_sessions_an_earlier_release_stored_or_forgot_are_handled(store, redis_server):
    """Sessions an earlier release put (no owner records) make room first, oldest first, even beside newer ones;
    and what a replica of an earlier release leaves when it forgets a session (its owner records) is taken off
    the owner's count without being counted as an eviction."""
    client = redis.Redis.from_url(redis_server.url)
    old = [make_session(nbytes=2000, seed=i) for i in range(3)]
    for s in old:
        store.put(s)
    client.delete(store.prefix + "owner_of", store.prefix + "owners", store.prefix + "lru:alice")  # as stored before
    bob = [make_session(owner="bob", nbytes=2000, seed=10 + i) for i in range(4)]
    for s in bob:  # needs 4000 more than the budget: the two oldest earlier-release sessions go, not bob's
        store.put(s)
    assert [store.get(s.id, "alice") is not None for s in old] == [False, False, True]
    assert all(store.get(s.id, "bob") is not None for s in bob) and store.stats().evictions == 2
    # A replica of an earlier release forgets bob[0] (its sweep or eviction): size, orders and hash, not the owner records
    client.zrem(store.prefix + "lru", bob[0].id), client.zrem(store.prefix + "exp", bob[0].id)
    client.hdel(store.prefix + "size", bob[0].id), client.delete(store.prefix + "s:" + bob[0].id)
    client.decrby(store.prefix + "bytes", 2000)
    # 8000 + 6000: old[2] goes (an earlier release's), then from bob, who holds 6000 once bob[0] is found forgotten
    store.put(make_session(owner="carol", nbytes=6000, seed=20))
    assert float(client.zscore(store.prefix + "owners", "bob")) == 4000.0  # bob[0]'s 2000 off, bob[1]'s evicted
    assert store.get(old[2].id, "alice") is None and store.get(bob[1].id, "bob") is None
    assert all(store.get(s.id, "bob") is not None for s in bob[2:])
    assert store.stats().evictions == 4 and store.stats().live_bytes == 10_000
    client.close()


def test_session_larger_than_budget_is_stored_alone(store):
    """As the in-memory store does: everything else is evicted, the big one kept."""
    keep = [make_session(nbytes=2000, seed=i) for i in range(2)]
    for s in keep:
        store.put(s)
    big = make_session(nbytes=20_000)
    store.put(big)
    assert all(store.get(s.id, "alice") is None for s in keep)
    assert store.get(big.id, "alice") is not None
    st = store.stats()
    assert (st.live_sessions, st.live_bytes, st.evictions) == (1, 20_000, 2)
    small = make_session(nbytes=1000, seed=5)
    store.put(small)  # the big one goes
    assert store.get(big.id, "alice") is None and store.get(small.id, "alice") is not None
    assert store.stats().live_bytes == 1000


def test_key_isolation(store):
    s = make_session(owner="alice")
    store.put(s)
    assert store.get(s.id, "bob") is None
    assert store.get(s.id, None) is None
    assert store.delete(s.id, "bob") is False
    assert store.get(s.id, "alice") is not None
    anon = make_session(owner=None)
    store.put(anon)
    assert store.get(anon.id, None) is not None
    assert store.get(anon.id, "alice") is None
    assert store.delete(anon.id, "alice") is False
    assert store.delete(anon.id, None) is True


def test_stats_shared_between_store_instances(store, redis_server):
    other = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix)
    try:
        s = make_session(nbytes=6000)
        store.put(s)
        got = other.get(s.id, "alice")
        assert got is not None and torch.equal(got.tensors["head.weight"], s.tensors["head.weight"])
        other.put(make_session(nbytes=6000, seed=1))  # evicts s, counted once for everyone
        assert store.stats() == other.stats()
        assert store.stats().evictions == 1
        assert store.get(s.id, "alice") is None
    finally:
        other.close()


def test_prefixes_are_isolated(store, redis_server):
    other = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix + "other:")
    try:
        s = make_session()
        store.put(s)
        assert other.get(s.id, "alice") is None
        assert other.stats().live_sessions == 0
    finally:
        other.clear()
        other.close()


def test_concurrent_puts_keep_the_budget(store, redis_server):
    from concurrent.futures import ThreadPoolExecutor

    stores = [RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix) for _ in range(4)]
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: stores[i % 4].put(make_session(nbytes=1000, seed=i)), range(64)))
        st = store.stats()
        assert st.live_bytes <= 10_000 and st.live_sessions == 10 and st.evictions == 54
        assert st.live_bytes == 10_000
    finally:
        for s in stores:
            s.close()


def test_unavailable_fast_and_recovers(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "r")
    server.start()
    st = RedisSessionStore(server.url, budget_bytes=10_000, prefix="fault:")
    try:
        s = make_session()
        st.put(s)
        server.stop()
        for call in (lambda: st.get(s.id, "alice"), lambda: st.put(make_session()), st.stats,
                     lambda: st.delete(s.id, "alice")):
            t0 = time.monotonic()
            with pytest.raises(SessionStoreUnavailable):
                call()
            assert time.monotonic() - t0 < 2.0
        assert st.failed_recently()  # (an adaptation then checks the store before it computes)
        with pytest.raises(SessionStoreUnavailable):
            st.check()
        assert st.ping() is False
        server.start()  # same port, empty (no persistence)
        st.check()  # back: no waiting out the second
        assert not st.failed_recently()
        assert st.get(s.id, "alice") is None
        s2 = make_session()
        st.put(s2)
        assert st.get(s2.id, "alice") is not None
        assert st.ping() is True
    finally:
        st.close()
        server.stop()


def test_hung_redis_times_out(tmp_path):
    """A Redis that accepts connections but never answers (SIGSTOP) fails within the socket timeout."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "r")
    server.start()
    st = RedisSessionStore(server.url, budget_bytes=10_000, prefix="hang:", socket_timeout=0.3)
    try:
        st.put(make_session())
        os.kill(server.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(SessionStoreUnavailable):
            st.stats()
        assert time.monotonic() - t0 < 2.0
        os.kill(server.proc.pid, signal.SIGCONT)
        # For one timeout after a call timed out, calls fail at once (under load, each would otherwise hold
        # a thread for another timeout); then Redis is asked again.
        t0 = time.monotonic()
        with pytest.raises(SessionStoreUnavailable, match="no answer within 0.3 s a moment ago"):
            st.stats()
        assert time.monotonic() - t0 < 0.05
        time.sleep(0.35)
        assert st.stats().live_sessions == 1
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        st.close()
        server.stop()


def test_byte_count_resynchronises_when_keys_vanish(store, redis_server):
    """Keys removed behind the store's back (FLUSHDB of the sessions, say) do not leak budget forever."""
    s = make_session(nbytes=4000)
    store.put(s)
    client = redis.Redis.from_url(redis_server.url)
    client.delete(store.prefix + "lru", store.prefix + "exp", store.prefix + "size", store.prefix + "s:" + s.id)
    client.close()
    assert store.stats().live_bytes == 4000  # the orphaned count
    store.put(make_session(nbytes=1000, seed=1))
    assert store.stats().live_bytes == 1000 and store.stats().live_sessions == 1


def test_loading_error_is_unavailable(store, monkeypatch):
    """Any Redis error (here BusyLoadingError) becomes SessionStoreUnavailable."""

    def boom(*a, **k):
        raise redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory")

    monkeypatch.setattr(store._client, "evalsha", boom)
    monkeypatch.setattr(store._client, "eval", boom)
    with pytest.raises(SessionStoreUnavailable, match="loading"):
        store.stats()


def test_the_settings_select_the_store_and_its_budget(redis_server, monkeypatch):
    from service.app import create_store
    from service.sessions import MemorySessionStore
    from service.settings import Settings

    monkeypatch.setenv("METALEARN_SESSION_BACKEND", "redis")
    monkeypatch.setenv("METALEARN_REDIS_URL", redis_server.url)
    monkeypatch.setenv("METALEARN_REDIS_HELD_BYTES", "777")
    for budget in (12345, 0):  # 0 is a budget in both stores (each keeps the newest session alone), not "the default"
        monkeypatch.setenv("METALEARN_CACHE_BYTES", str(budget))
        st = create_store(Settings())
        try:
            assert isinstance(st, RedisSessionStore) and st.budget_bytes == budget and st.held_bytes == 777
            assert st.stats().live_sessions >= 0
        finally:
            st.close()
    monkeypatch.setenv("METALEARN_SESSION_BACKEND", "memory")
    memory = create_store(Settings())
    assert isinstance(memory, MemorySessionStore) and memory.max_bytes == 0


def test_app_builds_the_redis_store(redis_server, monkeypatch):
    """service.app picks the Redis store from METALEARN_SESSION_BACKEND / METALEARN_REDIS_URL."""
    app_module = pytest.importorskip("service.app")
    from service.settings import Settings

    monkeypatch.setenv("METALEARN_SESSION_BACKEND", "redis")
    monkeypatch.setenv("METALEARN_REDIS_URL", redis_server.url)
    monkeypatch.setenv("METALEARN_CACHE_BYTES", "4096")
    monkeypatch.setenv("METALEARN_REDIS_HELD_BYTES", "2048")
    store = app_module.create_store(Settings())
    try:
        assert isinstance(store, RedisSessionStore) and store.budget_bytes == 4096 and store.held_bytes == 2048
    finally:
        store.close()


def test_metrics_report_the_held_sessions(store):
    """/metrics' collector reads the held sessions and how reads were answered from a store that holds them."""
    from service.routes.metrics import ServiceMetrics

    class State:
        pass

    state = State()
    state.store = store
    s = make_session()
    store.put(s)
    store.get(s.id, "alice")
    text = ServiceMetrics(state).render().decode()
    assert "metalearn_sessions_held 1.0" in text and "metalearn_session_held_gets_total 1.0" in text
    assert "metalearn_session_fetched_gets_total 0.0" in text


def test_a_full_redis_still_reads_and_says_it_is_full(store, redis_server):
    """Redis at maxmemory with noeviction (its default) refuses writes: the bookkeeping a read does (its
    recency) is skipped rather than failing the read, deletions work, and a new session is refused as
    SessionStoreFull (the app's 503 says the store is full, not unreachable)."""
    from service.sessions import SessionStoreFull

    kept = make_session(nbytes=400)
    store.put(kept)
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 1024)
        replica = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix, held_bytes=0)
        got = replica.get(kept.id, "alice")
        replica.close()
        assert got is not None and torch.equal(got.tensors["head.weight"], kept.tensors["head.weight"])
        assert store.stats().live_sessions == 1
        with pytest.raises(SessionStoreFull, match="maxmemory"):
            store.put(make_session(nbytes=400, seed=1))
        assert store.delete(kept.id, "alice") is True
    finally:
        client.config_set("maxmemory", 0)
        client.close()


CORRUPT = {  # what a session record's fields were replaced with, by hand or by another program
    "expiry as text": lambda good: {"m": good[b"m"].replace(b'"expires": ', b'"expires": "soon", "x": ')},
    "metadata not JSON": lambda good: {"m": b"{not json"},
    "metadata a list": lambda good: {"m": b"[1, 2]"},
    "no model name": lambda good: {"m": good[b"m"].replace(b'"model"', b'"modell"')},
    "tensors not safetensors": lambda good: {"t": b"\x80\x04garbage"},
    "meta field of another type": lambda good: {"m": good[b"m"].replace(b'"meta": {', b'"meta": {"inner_steps": "ten", ')},
}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_a_corrupt_record_is_dropped_and_the_replica_keeps_working(store, redis_server, kind, caplog):
    """A record this service did not write is no session (logged with its key, deleted). A string expiry once
    reached the replica's held sessions and broke every later sweep of them: each later put failed."""
    client = redis.Redis.from_url(redis_server.url)
    bad, good = make_session(), make_session(seed=1)
    store.put(bad)
    key = f"{store.prefix}s:{bad.id}"
    client.hset(key, mapping=CORRUPT[kind](client.hgetall(key)))
    replica = RedisSessionStore(redis_server.url, budget_bytes=10_000, prefix=store.prefix)  # holds nothing yet: decodes
    assert replica.get(bad.id, "alice") is None
    assert not client.exists(key) and "dropping session record" in caplog.text
    for _ in range(3):  # the held sessions' sweeps run on each put and get
        replica.put(make_session())
    replica.put(good)
    assert replica.get(good.id, "alice") is good and store.get(good.id, "alice") is not None
    replica.close()
    client.close()


def test_a_key_of_another_type_at_a_sessions_name_is_dropped_not_an_outage(store, redis_server):
    """Something else written where a session's hash belongs (a string, a list): reads of it failed with
    WRONGTYPE, a 503 for its owner and every other key for as long as it stayed. Now it is no session, and gone."""
    client = redis.Redis.from_url(redis_server.url)
    for write in (lambda key: client.set(key, "x"), lambda key: client.rpush(key, "a", "b")):
        session = make_session()
        store.put(session)
        key = f"{store.prefix}s:{session.id}"
        client.delete(key)
        write(key)
        assert store.get(session.id, "bob") is None and not client.exists(key)
        write(key)
        assert store.delete(session.id, "alice") is False and not client.exists(key)
    good = make_session(seed=1)
    store.put(good)
    assert store.get(good.id, "alice") is not None
    assert store.stats().live_sessions == 1  # (the dropped ones' bookkeeping went with them)
    client.close()


def test_redis_settings_are_checked_and_a_misconfiguration_is_logged_at_start(tmp_path, monkeypatch, caplog):
    import logging

    from fastapi.testclient import TestClient

    from service.app import create_app, create_store
    from service.settings import Settings

    for bad in ("http://127.0.0.1:6379/0", "127.0.0.1:6379", "redis://127.0.0.1:notaport/0", ""):
        monkeypatch.setenv("METALEARN_REDIS_URL", bad)
        with pytest.raises(ValueError, match="METALEARN_REDIS_URL="):
            Settings.from_environment()
    monkeypatch.delenv("METALEARN_REDIS_URL")
    with pytest.raises(ValueError):
        Settings(redis_timeout_s=0)
    unanswered = f"redis://127.0.0.1:{free_port()}/0"
    store = create_store(Settings(session_backend="redis", redis_url=unanswered, redis_timeout_s=2.5))
    assert store.socket_timeout == 2.5
    store.close()
    with caplog.at_level(logging.WARNING, logger="service"):
        with TestClient(create_app(Settings(model_dir=str(tmp_path), redis_url=unanswered))):
            pass
        assert "METALEARN_REDIS_URL is set but METALEARN_SESSION_BACKEND is memory" in caplog.text
        with TestClient(create_app(Settings(model_dir=str(tmp_path), session_backend="redis", redis_url=unanswered))):
            pass
        assert "does not answer now" in caplog.text
