"""In-process units of the service: session store, engine queue/timeout, settings, tensor decoding."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from fastapi.testclient import TestClient

from service.engine import Engine, EngineConfig, Job, JobTimeout, QueueFull
from service.problems import Problem
from service.routes.schemas import SessionPredictRequest
from service.sessions import MemorySessionStore, Session, SessionStoreUnavailable
from service.settings import Settings
from service.tensors import EncodedTensor, decode_inputs, decode_labels


def session(sid, nbytes=400, ttl=60.0, owner=None, now=1000.0):
    return Session(sid, "m", owner, now, now + ttl, {"param:w": torch.zeros(nbytes // 4)})


def test_memory_store_lru_ttl_budget_owner():
    clock = [1000.0]
    store = MemorySessionStore(max_bytes=1000, clock=lambda: clock[0])
    store.put(session("a"))
    store.put(session("b"))
    assert store.get("a", None) is not None  # a most recent
    store.put(session("c"))  # 1200 > 1000: evict b
    assert store.get("b", None) is None and store.get("a", None) and store.get("c", None)
    assert store.stats().evictions == 1 and store.stats().live_bytes == 800
    store.put(session("d", ttl=5))
    clock[0] += 10
    assert store.get("d", None) is None
    assert store.stats().expirations >= 1
    store.put(session("e", owner="alice", now=clock[0]))
    assert store.get("e", "bob") is None and not store.delete("e", "bob")
    assert store.get("e", "alice") is not None and store.delete("e", "alice")
    huge = session("huge", nbytes=4000, now=clock[0])
    store.put(huge)  # larger than the budget: stored alone
    assert store.stats().live_sessions == 1


def test_a_reload_drops_the_held_sessions_no_served_version_can_predict_with():
    """forget_models and the session routes share one rule (Session.adapted_from): a session goes when its model
    is not served, or is served in another version than the one its record names; one whose record names none
    stays, as the routes still answer for it."""
    store = MemorySessionStore(max_bytes=10**6, clock=lambda: 1000.0)
    for sid, model, version in (("same", "m", "v1"), ("older", "m", "v0"), ("unnamed", "m", None), ("gone", "x", "v1")):
        held = session(sid)
        held.model = model
        if version is not None:
            held.meta["model_version"] = version
        store.put(held)
    assert store.forget_models({"m": "v1"}) == 2
    assert {sid for sid in ("same", "older", "unnamed", "gone") if store.get(sid, None)} == {"same", "unnamed"}
    assert session("s").adapted_from("v1") and not session("s").adapted_from(None)


def test_memory_store_expiry_index_is_right_and_bounded():
    """Sweeps read expiry times soonest first (not every session): a session put again keeps its later
    expiry, and the entries of sessions deleted meanwhile do not pile up."""
    clock = [1000.0]
    store = MemorySessionStore(max_bytes=10**9, clock=lambda: clock[0])
    store.put(session("a", ttl=10))
    store.put(session("a", ttl=100))  # put again, with a later expiry
    clock[0] = 1050.0
    assert store.get("a", None) is not None and store.stats().expirations == 0
    for i in range(3000):
        store.put(session(f"x{i}", ttl=60, now=clock[0]))
        assert store.delete(f"x{i}", None)
    assert len(store._expiries) <= 2 * store.stats().live_sessions + 1024 + 1
    clock[0] = 1101.0
    assert store.get("a", None) is None and store.stats().expirations == 1 and store.stats().live_sessions == 0


def test_memory_store_counts_what_is_prepared_from_a_session():
    """``Session.prepared`` beyond views of the session's tensors (a kernel's packed weights) grows the
    session's count in the store that holds it. Where that does not fit, the other sessions' prepared
    tensors go, else its own: a prepared tensor never evicts a session. Growth of a session no longer held
    is not counted, and dropping a session gives back everything counted for it."""
    store = MemorySessionStore(max_bytes=1000, clock=lambda: 1000.0)
    a, b = session("a"), session("b")  # 400 bytes each
    store.put(a)
    store.put(b)
    views = b.prepared("views", lambda tensors: {n: t.unsqueeze(0) for n, t in tensors.items()})
    assert views["param:w"].data_ptr() == b.tensors["param:w"].data_ptr()
    assert b.prepared_bytes == 0 and store.stats().live_bytes == 800
    b.prepared("copy", lambda tensors: {"w2": torch.zeros(25)})  # 100 bytes: fits
    assert b.prepared_bytes == 100 and b.held_bytes == 500 and store.stats().live_bytes == 900
    a.prepared("copy", lambda tensors: {"w2": torch.zeros(50)})  # 200 bytes: 1100 > 1000, b's prepared go
    assert (a.prepared_bytes, b.prepared_bytes) == (200, 0) and store.stats().live_bytes == 1000
    assert store.stats().evictions == 0 and store.prepared_dropped == 1
    made = a.prepared("big", lambda tensors: {"w3": torch.zeros(100)})  # 400 more, nothing else prepared: a's own go
    assert made["w3"].numel() == 100  # (the prediction that made it still computes with it)
    assert a.prepared_bytes == 0 and store.stats().live_bytes == 800 and store.prepared_dropped == 2
    assert store.stats().evictions == 0 and store.get("a", None) is a and store.get("b", None) is b
    store.put(session("c"))  # a new session that does not fit: a session goes (a: b was read after it)
    assert store.stats().evictions == 1 and store.get("a", None) is None and store.stats().live_bytes == 800
    b.prepared("copy2", lambda tensors: {"w2": torch.zeros(25)})  # a prepared session counts what it holds
    assert store.stats().live_bytes == 900
    assert store.delete("b", None) and store.stats().live_bytes == 400
    b.prepared("late", lambda tensors: {"w4": torch.zeros(25)})  # no longer held: nothing counted
    assert store.stats().live_bytes == 400 and b.held_bytes == 600
    store.put(b)  # put again: it counts what it holds
    assert store.stats().live_bytes == 1000


def test_memory_store_drops_prepared_tensors_before_sessions():
    """Room is made from what was prepared from the sessions (least recently used first; made again in
    well under a millisecond) before any session is evicted (its client would have to adapt again)."""
    store = MemorySessionStore(max_bytes=2000, clock=lambda: 1000.0)
    a, b, c = session("a"), session("b"), session("c")
    for s in (a, b, c):
        store.put(s)
    for s in (a, b):
        s.prepared("packed", lambda tensors: {"w2": torch.zeros(100)})  # 400 bytes each: 2000 in all
    assert store.stats().live_bytes == 2000
    store.get("a", None)  # a is now the most recently used: b's prepared tensors go first
    made = c.prepared("packed", lambda tensors: {"w2": torch.zeros(100)})
    assert (a.prepared_bytes, b.prepared_bytes, c.prepared_bytes) == (400, 0, 400)
    assert store.stats().live_sessions == 3 and store.stats().evictions == 0 and store.prepared_dropped == 1
    assert c.prepared("packed", lambda tensors: pytest.fail("made twice")) is made
    # b's made again; the room comes from c's (less recently used than a: preparing is not a use)
    assert b.prepared("packed", lambda tensors: {"w2": torch.ones(100)})["w2"][0] == 1
    assert (a.prepared_bytes, b.prepared_bytes, c.prepared_bytes) == (400, 400, 0)
    assert store.prepared_dropped == 2 and store.stats().live_bytes == 2000 and store.stats().evictions == 0
    store.put(session("d", nbytes=1200))  # every prepared tensor goes first, then the least recently used session
    assert (a.prepared_bytes, b.prepared_bytes) == (0, 0) and store.prepared_dropped == 4
    assert store.stats().evictions == 1 and store.get("b", None) is None
    assert all(store.get(k, None) is not None for k in "acd") and store.stats().live_bytes == 2000


def test_worker_cores_from_settings(monkeypatch):
    """``pin_workers``: each worker gets the next ``threads`` of the allowed cores, when they fit; none on
    a GPU, when off, or when the workers need more cores than allowed."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5, 7}, raising=False)
    assert Settings(device="cpu", threads=1, workers=2).resolved_worker_cpus() == [[2], [3]]
    assert Settings(device="cpu", threads=2, workers=2).resolved_worker_cpus() == [[2, 3], [5, 7]]
    assert Settings(device="cpu", threads=3, workers=2).resolved_worker_cpus() is None
    assert Settings(device="cpu", threads=1, workers=2, pin_workers=False).resolved_worker_cpus() is None
    assert Settings(device="cuda", threads=1, workers=1).resolved_worker_cpus() is None
    monkeypatch.setenv("METALEARN_PIN_WORKERS", "false")
    assert Settings(device="cpu", threads=1, workers=2).pin_workers is False


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity control on this platform")
def test_engine_workers_run_on_their_cores():
    """Each worker thread runs on its ``worker_cpus`` entry (and so do the torch threads it starts); the
    process's other threads keep every allowed core."""
    allowed = sorted(os.sched_getaffinity(0))
    cores = [[allowed[0]], [allowed[-1]]]
    engine = Engine(workers=2, threads=1, worker_cpus=cores)
    engine.start()
    try:
        def pinned():
            return [sorted(os.sched_getaffinity(t.native_id)) if t.native_id else None for t in engine._threads]

        deadline = time.monotonic() + 10  # the workers set it first thing
        while pinned() != cores and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pinned() == cores
        assert sorted(os.sched_getaffinity(0)) == allowed
    finally:
        engine.stop()


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("METALEARN_MODEL_DIR", "/tmp/models")
    monkeypatch.setenv("METALEARN_API_KEYS", "a, b")
    monkeypatch.setenv("METALEARN_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("METALEARN_SESSION_BACKEND", "redis")
    settings = Settings()
    assert settings.model_dir == "/tmp/models" and settings.key_list() == ["a", "b"] and settings.max_batch_size == 8
    assert settings.session_backend == "redis"
    assert Settings(device="cpu").resolved_max_batch_size() == 8
    with pytest.raises(ValueError):
        Settings(device="tpu")


def test_engine_config_from_settings(monkeypatch):
    """The service's engine gets every engine setting, the automatic ones resolved; an engine built in code
    without a config batches as the service does on the CPU."""
    monkeypatch.setenv("METALEARN_MAX_WAIT_MS", "7")
    monkeypatch.setenv("METALEARN_CPU_SCRIPTS", "0")
    config = Settings(device="cpu", threads=1, workers=2, pin_workers=False).engine_config()
    assert config == EngineConfig(max_wait_ms=7.0, threads=1, workers=2, cpu_scripts=0)
    assert config.max_batch_size == Settings(device="cpu").resolved_max_batch_size() == Engine().max_batch_size
    assert Settings(device="cuda").engine_config().max_batch_size == 64
    engine = Engine(config, queue_size=3)  # fields of a config changed as keywords
    assert (engine.max_wait, engine.workers, engine.queue_size, engine._scripts) == (0.007, 2, 3, None)
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(max_batch_size=0)


def test_a_misspelt_setting_is_refused_not_ignored(monkeypatch, tmp_path):
    """METALEARN_API_KEY (no S) was ignored: the service served every /v1 call without a key."""
    for name in [n for n in os.environ if n.startswith("METALEARN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("METALEARN_API_KEY", "secret")
    monkeypatch.setenv("METALEARN_SESSION_BACKED", "redis")
    with pytest.raises(ValueError) as error:
        Settings.from_environment()
    assert str(error.value).startswith("bad service settings: unknown variable(s) METALEARN_API_KEY (did you mean "
                                       "METALEARN_API_KEYS?), METALEARN_SESSION_BACKED (did you mean METALEARN_SESSION_BACKEND?)")
    monkeypatch.delenv("METALEARN_API_KEY")
    monkeypatch.delenv("METALEARN_SESSION_BACKED")
    monkeypatch.chdir(tmp_path)  # a .env file, which the settings read too, is checked the same way
    (tmp_path / ".env").write_text("METALEARN_API_KEY=secret\n")
    with pytest.raises(ValueError, match=r"unknown variable\(s\) METALEARN_API_KEY \(did you mean METALEARN_API_KEYS\?\)"):
        Settings.from_environment()
    (tmp_path / ".env").unlink()
    monkeypatch.setenv("METALEARN_DEBUG", "1")  # the CLI's, not a setting: allowed
    monkeypatch.setenv("METALEARN_API_KEYS", "secret")
    assert Settings.from_environment().key_list() == ["secret"]


def test_engine_stop_does_not_wait_for_a_compilation():
    """A compilation under way is of no use to a stopping service: stop() gives it a second at most."""
    engine = Engine(threads=1, cpu_scripts=0)
    waited = []
    engine._scripts = SimpleNamespace(close=lambda: None, join=lambda timeout=None: waited.append(timeout))
    engine.stop(timeout=10.0)
    assert waited and waited[0] <= 1.0


def test_bad_settings_are_refused_in_one_line_naming_the_variable(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("METALEARN_MAX_BATCH_SIZE", "abc")
    monkeypatch.setenv("METALEARN_QUEUE_SIZE", "0")
    with pytest.raises(ValueError) as error:
        Settings.from_environment()
    assert str(error.value) == ("bad service settings: METALEARN_MAX_BATCH_SIZE='abc': Input should be a valid integer, unable to "
                                "parse string as an integer; METALEARN_QUEUE_SIZE='0': Input should be greater than or equal to 1")
    monkeypatch.delenv("METALEARN_MAX_BATCH_SIZE")
    monkeypatch.delenv("METALEARN_QUEUE_SIZE")
    with pytest.raises(ValueError, match=r"^bad service settings: METALEARN_MIN_INNER_LR must be <= METALEARN_MAX_INNER_LR$"):
        Settings.from_environment(min_inner_lr=5, max_inner_lr=1)
    monkeypatch.setenv("METALEARN_SESSION_TTL_S", "7200")
    monkeypatch.setenv("METALEARN_MAX_SESSION_TTL_S", "60")
    with pytest.raises(ValueError, match=r"^bad service settings: METALEARN_SESSION_TTL_S must be <= METALEARN_MAX_SESSION_TTL_S$"):
        Settings.from_environment()
    monkeypatch.delenv("METALEARN_SESSION_TTL_S")
    monkeypatch.delenv("METALEARN_MAX_SESSION_TTL_S")
    # A GPU named where there is none: refused before the server starts, as metalearn serve's one-line error.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Settings(device="auto").usable_device() == "cpu"
    with pytest.raises(RuntimeError, match="device cuda .*no CUDA GPU is available"):
        Settings(device="cuda").usable_device()
    import uvicorn

    from metalearn.cli import main

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started"))
    assert main(["serve", "--model-dir", str(tmp_path), "--device", "cuda"]) != 0
    assert "error: device cuda (METALEARN_DEVICE or --device): no CUDA GPU is available" in capsys.readouterr().err
    monkeypatch.setenv("METALEARN_QUEUE_SIZE", "-1")
    assert main(["serve", "--model-dir", str(tmp_path)]) != 0
    assert "error: bad service settings: METALEARN_QUEUE_SIZE='-1'" in capsys.readouterr().err


def test_tensor_decoding_errors():
    with pytest.raises(Problem, match="rank"):
        decode_inputs([[1.0, 2.0]], "x", (1, 2, 2), None, 10)
    with pytest.raises(Problem, match="bytes do not match"):
        decode_inputs(EncodedTensor(dtype="float32", shape=[1, 2], base64="AAAA"), "x", (2,), None, 10)
    with pytest.raises(Problem, match="negative"):
        decode_inputs(EncodedTensor(dtype="float32", shape=[-1, 2], base64=""), "x", (2,), None, 10)
    assert decode_inputs(EncodedTensor(dtype="uint8", shape=[1, 2], base64="AQI="), "x", (2,), None, 10).tolist() == [[1.0, 2.0]]
    assert decode_labels([1, 0, 1], "y", 3, 2).dtype == torch.int64
    with pytest.raises(Problem, match=r"label 1180591620717411303424 is outside \[0, 2\)"):  # written as the integer it is
        decode_labels([0, 1, 2**70], "y", 3, 2)


class BlockingEngine(Engine):
    """An engine whose computation waits for a test's signal."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.release = threading.Event()

    def _compute(self, batch):
        self.release.wait(10)
        return [{"predictions": [len(batch)]} for _ in batch]


def fake_job(model=None):
    model = model or SimpleNamespace(name="m", derived={})
    return Job("predict", model, query_x=torch.zeros(1, 1), session={"param:w": torch.zeros(1)})


@contextlib.contextmanager
def blocking_engine(**settings):
    """A started BlockingEngine, released and stopped at the end."""
    engine = BlockingEngine(**settings)
    engine.start()
    try:
        yield engine
    finally:
        engine.release.set()
        engine.stop()


async def occupied(engine) -> asyncio.Future:
    """A job the engine's worker has taken and blocks on."""
    computing = asyncio.ensure_future(engine.submit(fake_job()))
    await asyncio.sleep(0.1)
    for _ in range(500):  # (a loaded machine: until the worker has taken it from the queue)
        if engine.depth() == 0:
            break
        await asyncio.sleep(0.01)
    return computing


def test_engine_queue_full_and_timeout():
    with blocking_engine(queue_size=2, max_batch_size=4, max_wait_ms=0, request_timeout_s=0.3) as engine:
        async def scenario():
            first = await occupied(engine)
            waiting = [asyncio.ensure_future(engine.submit(fake_job())) for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull) as full:
                await engine.submit(fake_job())
            assert full.value.retry_after >= 1
            with pytest.raises(JobTimeout):
                await first
            engine.release.set()
            results = await asyncio.gather(*waiting, return_exceptions=True)
            return results

        results = asyncio.run(scenario())
        assert all(isinstance(r, (JobTimeout, dict)) for r in results)
        # the worker is still alive and batches what is queued together
        engine.release.set()
        async def later():
            return await asyncio.gather(*[engine.submit(fake_job(), timeout=5) for _ in range(2)])
        assert all(r["batch_size"] >= 1 for r in asyncio.run(later()))
        assert engine.running


def test_a_job_whose_request_timed_out_while_queued_leaves_the_queue_at_once():
    """A request that timed out (or whose client left) while its job waited: the job is cancelled and leaves
    the queue then, not when a worker reaches it and skips it. (A security review: with the worker held, a
    queue full of such jobs answered new requests 503 overloaded after their own requests had been answered.)"""
    with blocking_engine(queue_size=2, max_batch_size=1, max_wait_ms=0, request_timeout_s=10) as engine:
        async def scenario():
            computing = await occupied(engine)
            for _ in range(2):
                with pytest.raises(JobTimeout):
                    await engine.submit(fake_job(), timeout=0.05)
            depth = engine.depth()
            taken = asyncio.ensure_future(engine.submit(fake_job(), timeout=5))  # room for it
            await asyncio.sleep(0.05)
            engine.release.set()
            return depth, await computing, await taken

        depth, computing, taken = asyncio.run(scenario())
        assert depth == 0 and computing["batch_size"] == 1 and taken["batch_size"] == 1


def test_stopping_with_jobs_queued_cancels_them_all():
    """Engine.stop cancels the queued jobs; a cancelled job's callback withdraws it from the queue, inside cancel():
    stop walked the queue meanwhile and raised "deque mutated during iteration" (a review), leaving the other
    queued requests waiting and the workers unjoined."""
    engine = BlockingEngine(max_batch_size=1, max_wait_ms=0, request_timeout_s=10)
    engine.start()
    computing = engine.submit_nowait(fake_job())
    for _ in range(500):  # (until the worker holds it)
        if computing.running():
            break
        time.sleep(0.01)
    queued = [engine.submit_nowait(fake_job()) for _ in range(3)]
    threads = list(engine._threads)
    threading.Timer(0.2, engine.release.set).start()  # (the worker still holds its job when stop empties the queue)
    engine.stop()
    assert all(future.cancelled() for future in queued) and engine.depth() == 0
    assert computing.result(5)["predictions"] == [1] and not any(thread.is_alive() for thread in threads)


def test_a_batch_takes_adaptations_while_their_work_fits_in_the_limit_of_one():
    """A batch of 8 adaptations each near METALEARN_MAX_EXAMPLE_STEPS held its worker 8 times as long as the limit
    means to (80 s for Conv4-64 against a 30 s request timeout): a batch takes requests while their example-steps
    fit in that limit (the first always)."""
    model = SimpleNamespace(name="m", derived={}, example_steps=lambda examples, steps: examples * steps)

    def adaptation(examples):
        return Job("adapt", model, support_x=torch.zeros(examples, 1), support_y=torch.zeros(examples), steps=2)

    with blocking_engine(max_batch_size=8, max_wait_ms=0, request_timeout_s=10, max_batch_work=25) as engine:
        async def scenario():
            computing = await occupied(engine)
            queued = [asyncio.ensure_future(engine.submit(adaptation(5))) for _ in range(5)]  # 10 example-steps each
            big = asyncio.ensure_future(engine.submit(adaptation(20)))  # 40, over the limit: computed all the same
            await asyncio.sleep(0.1)
            engine.release.set()
            await computing
            return await asyncio.gather(*queued), await big

        queued, big = asyncio.run(scenario())
    assert sorted(r["batch_size"] for r in queued) == [1, 2, 2, 2, 2] and big["batch_size"] == 1


def test_a_worker_loop_that_keeps_failing_logs_once_a_minute_and_pauses(caplog):
    """A bug in the worker's loop outside a computation (a review caught fair_share reading a field the engine's
    Job did not have yet) fails every batch: each job gets the error, the worker goes on, and the traceback is
    logged once a minute with a pause between failures (before: 500 000 tracebacks in two minutes, a core spent)."""

    def broken(jobs):
        raise AttributeError("'Job' object has no attribute 'owner'")

    with blocking_engine(max_batch_size=1, max_wait_ms=0, request_timeout_s=10) as engine, caplog.at_level(logging.ERROR, logger="service"):
        engine._fair.start = broken
        engine.release.set()

        async def five():
            return await asyncio.gather(*[engine.submit(fake_job()) for _ in range(5)], return_exceptions=True)

        started = time.monotonic()
        results = asyncio.run(five())
        assert all(isinstance(r, AttributeError) for r in results) and engine.running
        assert time.monotonic() - started >= 4 * engine.LOOP_FAILURE_PAUSE_S
    assert len([r for r in caplog.records if "worker's loop failed" in r.getMessage()]) == 1


def test_shed_answers_the_queue_and_what_comes_after_with_engine_stopped():
    """Engine.shed (a stopping server near the end of its grace): the queued jobs and any submitted later
    fail with EngineStopped (503), the job computing finishes, and the longest recent batch is known."""
    from service.engine import EngineStopped

    with blocking_engine(max_batch_size=1, max_wait_ms=0, request_timeout_s=10) as engine:
        async def scenario():
            computing = await occupied(engine)
            queued = [asyncio.ensure_future(engine.submit(fake_job())) for _ in range(3)]
            for _ in range(500):  # (until all three are queued: a fixed 50 ms was once too short on a loaded machine)
                if engine.depth() == 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)  # (the longest recent batch is then over 0.05 s)
            assert engine.shed("stopping") == 3
            with pytest.raises(EngineStopped, match="stopping"):
                await engine.submit(fake_job())
            engine.release.set()
            return await computing, await asyncio.gather(*queued, return_exceptions=True)

        done, shed = asyncio.run(scenario())
        assert done["batch_size"] == 1 and all(isinstance(e, EngineStopped) for e in shed)
        assert 0.05 < engine.longest_recent_batch() < 10


class TimedEngine(Engine):
    """An engine whose batch takes 0.1 s a job, and answers when it ended."""

    def _compute(self, batch):
        time.sleep(0.1 * len(batch))
        return [{"ended": time.monotonic()} for _ in batch]


def test_a_stopping_engine_starts_only_batches_that_end_in_time():
    """Engine.finish_by (a stopping server): a worker takes only as many jobs as its model's recent seconds per
    request say end by the deadline, and fails the jobs that would not with EngineStopped (503). (A review: 24
    heavy adaptations queued at SIGTERM, taken 8 at a time in batches longer than the grace left: 16 dropped
    connections.)"""
    from service.engine import EngineStopped

    engine = TimedEngine(max_batch_size=8, max_wait_ms=0, request_timeout_s=10, workers=1)
    engine.start()
    try:
        model = SimpleNamespace(name="m", derived={})

        async def scenario():
            await engine.submit(fake_job(model))  # (the model's cost: 0.1 s a request)
            deadline = time.monotonic() + 0.45
            engine.finish_by(deadline, "stopping")
            results = await asyncio.gather(*[engine.submit(fake_job(model)) for _ in range(8)], return_exceptions=True)
            return deadline, results

        deadline, results = asyncio.run(scenario())
    finally:
        engine.stop()
    computed = [r for r in results if isinstance(r, dict)]
    shed = [r for r in results if isinstance(r, EngineStopped)]
    assert len(computed) + len(shed) == 8 and all("stopping" in str(e) for e in shed)
    assert 1 <= len(computed) <= 4 and max(r["ended"] for r in computed) <= deadline + 0.05


def test_a_batch_still_computing_counts_in_the_longest_recent_batch():
    """A stopping server sheds by the longest recent batch; right after start none may have finished, and the one
    computing is then at least as long as it has run (a margin of 0 let a slow first batch be cancelled)."""
    with blocking_engine(max_batch_size=1, max_wait_ms=0, request_timeout_s=10) as engine:
        async def scenario():
            computing = await occupied(engine)
            for _ in range(100):  # (on a loaded machine the worker may take the job after occupied's 0.1 s)
                if engine._computing:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            while_computing = engine.longest_recent_batch()
            engine.release.set()
            await computing
            return while_computing

        while_computing = asyncio.run(scenario())
        # (the worker hands out the result, then does its bookkeeping: give it a moment on a loaded machine)
        deadline = time.monotonic() + 5
        while engine._computing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert 0.3 <= while_computing < 10 and engine.longest_recent_batch() >= while_computing
        assert not engine._computing  # (none left counted once it finished)


class FaultyEngine(Engine):
    """An engine whose loop fails outside the computation: while forming one batch, then after computing one."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.faults = ["next_batch", "bookkeeping"]

    def _next_batch(self, batch):
        more = super()._next_batch(batch)
        if batch and self.faults[:1] == ["next_batch"]:
            self.faults.pop(0)
            raise RuntimeError("a bug while forming a batch")
        return more

    def _compute(self, batch):
        results = [{"predictions": [1]} for _ in batch]
        if self.faults[:1] == ["bookkeeping"]:
            self.faults.pop(0)
            self.metrics = SimpleNamespace(batch=lambda *a: 1 / 0, queue_depth=lambda depth: None)  # fails after the results are set
        else:
            self.metrics = None
        return results


def test_a_failure_outside_a_computation_fails_its_batch_and_the_worker_goes_on():
    engine = FaultyEngine(max_batch_size=1, max_wait_ms=0, request_timeout_s=5)
    engine.start()
    try:
        async def one():
            return await engine.submit(fake_job())

        with pytest.raises(RuntimeError, match="forming a batch"):
            asyncio.run(one())
        assert asyncio.run(one())["predictions"] == [1]  # its results were set before the bookkeeping failed
        assert asyncio.run(one())["predictions"] == [1]
        assert engine.running and engine.faults == []
    finally:
        engine.stop()


def test_a_job_whose_batch_key_fails_fails_alone():
    """A malformed job (its batch key raises) queued among good ones: it gets the error, they get results."""
    engine = FaultyEngine(max_batch_size=8, max_wait_ms=0, request_timeout_s=5)
    engine.faults = []
    bad = fake_job()
    bad.session = {"param:w": "not a tensor"}
    jobs = [fake_job(), bad, fake_job(), fake_job()]

    for job in jobs:  # queued before the worker starts, so they meet while a batch forms
        engine._pending.append(job)
    engine.start()
    try:
        results = [job.future.result(timeout=5) if job is not bad else job.future.exception(timeout=5) for job in jobs]
        assert isinstance(results[1], AttributeError)
        assert [r["predictions"] for i, r in enumerate(results) if i != 1] == [[1], [1], [1]]
        assert engine.running
        assert asyncio.run(engine.submit(fake_job()))["predictions"] == [1]
    finally:
        engine.stop()


class BarrierEngine(Engine):
    """Each batch waits until ``parties`` batches are running at once (or fails after 5 s)."""

    def __init__(self, parties: int, **kw):
        super().__init__(**kw)
        self.barrier = threading.Barrier(parties, timeout=5)

    def _compute(self, batch):
        self.barrier.wait()
        return [{"predictions": [threading.current_thread().name]} for _ in batch]


def test_workers_run_batches_side_by_side():
    engine = BarrierEngine(2, workers=2, max_batch_size=1, max_wait_ms=0, request_timeout_s=10)
    engine.start()
    try:
        async def two_requests():
            return await asyncio.gather(*[engine.submit(fake_job()) for _ in range(2)])

        results = asyncio.run(two_requests())  # with one worker the barrier would break: BrokenBarrierError
        assert {r["predictions"][0] for r in results} == {"metalearn-engine-0", "metalearn-engine-1"}
        assert engine.running
    finally:
        engine.stop()
    assert not engine.running
    with pytest.raises(ValueError):
        Engine(workers=0)
    assert Settings(device="cpu", threads=1).resolved_workers() == (os.cpu_count() or 1)
    assert Settings(device="cuda").resolved_workers() == 1 and Settings(workers=3).resolved_workers() == 3


class NamingEngine(Engine):
    """Answers each job with the name of the worker that ran it."""

    def _compute(self, batch):
        return [{"predictions": [threading.current_thread().name]} for _ in batch]


def test_a_lone_client_is_served_by_the_most_recently_idle_worker():
    """One request at a time goes to the worker that finished the last one (its caches are warm),
    not round the workers in turn; under concurrency both still run (above)."""
    engine = NamingEngine(workers=2, max_batch_size=1, max_wait_ms=0, request_timeout_s=10)
    engine.start()
    try:
        async def one_at_a_time():
            names = []
            for _ in range(12):
                names.append((await engine.submit(fake_job()))["predictions"][0])
                await asyncio.sleep(0.005)  # both workers are back waiting
            return names

        names = asyncio.run(one_at_a_time())
        assert len(set(names[1:])) == 1, names
    finally:
        threads = list(engine._threads)
        engine.stop()
    assert not any(thread.is_alive() for thread in threads)  # stop wakes the idle workers too


class CostlyEngine(Engine):
    """Each batch takes its model's ``cost`` seconds; the order in which models were computed is kept."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.order: list[str] = []

    def _compute(self, batch):
        time.sleep(batch[0].model.cost)
        self.order.append(batch[0].model.name if batch[0].owner is None else batch[0].owner)
        return [{"predictions": [1]} for _ in batch]


def computed_order(first: Job, rest: list[Job]) -> list[str]:
    """What a CostlyEngine with one worker computed, in order: ``first``, taken by the worker, then ``rest``,
    queued while it computes ``first``."""
    engine = CostlyEngine(max_batch_size=1, max_wait_ms=0, request_timeout_s=10)
    engine.start()
    try:
        async def queued():
            computing = asyncio.ensure_future(engine.submit(first))
            await asyncio.sleep(0.02)  # the worker computes it; the rest queue meanwhile
            return await asyncio.gather(computing, *[engine.submit(job) for job in rest])

        asyncio.run(queued())
        return engine.order
    finally:
        engine.stop()


def test_a_cheap_models_request_does_not_wait_behind_an_expensive_models_queue():
    """One queue serves every model: first come, first served, the cheap model's request queued after five
    expensive ones was computed sixth. With fair shares it is computed as soon as the worker is free."""
    expensive = SimpleNamespace(name="expensive", derived={}, cost=0.05)
    cheap = SimpleNamespace(name="cheap", derived={}, cost=0.0)
    order = computed_order(fake_job(expensive), [fake_job(expensive) for _ in range(4)] + [fake_job(cheap)])
    assert order == ["expensive", "cheap", "expensive", "expensive", "expensive", "expensive"], order


def test_one_api_keys_request_does_not_wait_behind_another_keys_queue():
    """The routes give each job its caller (the API key's owner id): key b's request, queued after five of
    key a's for the same model, is computed as soon as the worker is free, not sixth."""
    model = SimpleNamespace(name="m", derived={}, cost=0.05)

    def job(owner):
        return dataclasses.replace(fake_job(model), owner=owner)

    order = computed_order(job("a"), [job("a") for _ in range(4)] + [job("b")])
    assert order == ["a", "b", "a", "a", "a", "a"], order


def test_while_other_models_wait_jobs_whose_computation_runs_row_by_row_are_taken_one_at_a_time():
    """A compiled computation that runs its rows one by one (a Conv4-64 MAML adaptation) gains little from a
    batch, and a batch of eight held the worker, and every other model's (or API key's) requests, for all
    eight. Alone in the queue such jobs still batch (the Python around each batch cost 4% of MAML's
    throughput), and so do computations that batch."""
    model = SimpleNamespace(name="m", derived={}, cost=0.0)
    another_model = SimpleNamespace(name="other", derived={}, cost=0.0)

    def other_model() -> Job:
        return fake_job(another_model)

    def other_key() -> Job:
        return dataclasses.replace(fake_job(model), owner="another key")

    def batch_sizes(by_row: bool, other: Callable[[], Job] | None) -> list[int]:
        other_waits = other is not None
        engine = BlockingEngine(max_batch_size=8, max_wait_ms=0, request_timeout_s=10, cpu_scripts=8)
        engine._scripts.runs_by_row = lambda key: by_row and key[0] == id(model)
        if other_waits:
            engine._fair.settle([other()], 100.0)  # (the other had its share: the model's jobs go first)
        engine.start()
        try:
            async def queued():
                first = asyncio.ensure_future(engine.submit(fake_job(model)))
                await asyncio.sleep(0.1)  # the worker holds it; more queue meanwhile
                rest = [asyncio.ensure_future(engine.submit(fake_job(model))) for _ in range(4)]
                waiting = [asyncio.ensure_future(engine.submit(other()))] if other_waits else []
                await asyncio.sleep(0.05)
                engine.release.set()
                return await asyncio.gather(first, *rest, *waiting)

            return [r["predictions"][0] for r in asyncio.run(queued())][:5]
        finally:
            engine.stop()

    assert batch_sizes(by_row=True, other=other_model) == [1, 1, 1, 1, 1]
    assert batch_sizes(by_row=True, other=other_key) == [1, 1, 1, 1, 1]
    assert batch_sizes(by_row=True, other=None) == [1, 4, 4, 4, 4]
    assert batch_sizes(by_row=False, other=other_model) == [1, 4, 4, 4, 4]


def simulate_one_worker(fair, pending: deque, costs: dict, until: float) -> dict:
    """A worker serving ``pending`` (jobs of models with a name, and owners) through ``fair`` for ``until``
    seconds of compute, one job a batch: the compute seconds each (owner, model name) got."""
    got: dict = {}
    clock = 0.0
    while pending and clock < until:
        index = fair.pick(pending)
        job = pending[index]
        del pending[index]
        charged = fair.start([job])
        cost = costs[job.model.name]
        fair.settle([job], cost, charged)
        got[job.owner, job.model.name] = got.get((job.owner, job.model.name), 0.0) + cost
        clock += cost
    return got


def queued_jobs(*runs: tuple) -> deque:
    """(owner, model, count), ...: that many jobs of each, in that order."""
    return deque(SimpleNamespace(owner=owner, model=model) for owner, model, count in runs for _ in range(count))


def test_fair_shares_give_each_queued_model_an_equal_share_of_compute_and_bank_no_credit_while_idle():
    from service.fair_share import FairShare

    heavy, light = SimpleNamespace(name="heavy"), SimpleNamespace(name="light")
    costs = {"heavy": 0.045, "light": 0.002}
    # Both always queued, the heavy model's jobs first: each gets half of the time
    fair = FairShare()
    got = simulate_one_worker(fair, queued_jobs((None, heavy, 400), (None, light, 4000)), costs, until=3.0)
    assert abs(got[None, "heavy"] - got[None, "light"]) <= costs["heavy"] + costs["light"], got

    # One model alone: first come, first served (index 0), whatever was charged
    assert fair.pick(queued_jobs((None, heavy, 3))) == 0
    # The light model idle while the heavy one ran 2 s alone: back, it shares from then on, not 2 s first
    simulate_one_worker(fair, queued_jobs((None, heavy, 45)), costs, until=2.0)
    got = simulate_one_worker(fair, queued_jobs((None, heavy, 100), (None, light, 1000)), costs, until=1.0)
    assert got[None, "heavy"] >= 0.4, got
    # A reload forgets the models no longer served
    fair.keep([id(light)])
    assert set(fair._models.charged) == {(None, id(light))} and set(fair._per_job) == {id(light)}


def test_a_batchs_cancelled_jobs_are_refunded_to_their_own_keys():
    """A batch is charged its estimate when taken, to each job's key; a job cancelled before it ran (its request
    timed out, its client left) gets its key's part back, and the running jobs' part is what they settle."""
    from service.fair_share import FairShare

    model = SimpleNamespace(name="m")
    a, b = SimpleNamespace(owner="a", model=model), SimpleNamespace(owner="b", model=model)
    fair = FairShare()
    fair.settle([SimpleNamespace(owner="c", model=model)], 0.1)  # (a recent cost: 0.1 s a request)
    charged = fair.start([a, b])
    assert charged == pytest.approx(0.2)
    charged = fair.refund([a, b], [b], charged)  # a's was cancelled
    fair.settle([b], 0.1, charged)
    assert fair._owners.charged["a"] == pytest.approx(0.0) and fair._owners.charged["b"] == pytest.approx(0.1)


def test_the_computation_limit_counts_shifted_views():
    """A model that adapts on shifted views of its support images too adapts on SHIFTED_VIEWS times its examples."""
    from metalearn.adaptation import SHIFTED_VIEWS
    from service.problems import Problem
    from service.routes.deps import check_work

    from service.registry import LoadedModel

    def model(support_shift):
        model = SimpleNamespace(support_shift=support_shift, learner=SimpleNamespace(head_only=False))
        model.example_steps = functools.partial(LoadedModel.example_steps, model)
        return model

    settings = SimpleNamespace(max_example_steps=100)
    check_work(settings, 5, 10, model(0))
    with pytest.raises(Problem, match=f"{5 * SHIFTED_VIEWS} support examples \\(with their shifted views\\) x 10 inner steps = {50 * SHIFTED_VIEWS} example-steps"):
        check_work(settings, 5, 10, model(1))


def test_fair_shares_give_each_api_key_an_equal_share_and_each_of_its_models_an_equal_share_of_that():
    """With API keys, one key's burst (or its expensive model) no longer holds every other key's requests
    behind it: each key queued gets an equal share of the compute, its models equal shares of the key's."""
    from service.fair_share import FairShare

    heavy, light = SimpleNamespace(name="heavy"), SimpleNamespace(name="light")
    costs = {"heavy": 0.045, "light": 0.002}
    # Key a floods the heavy model, key b sends light requests after: halves, not a's queue first
    got = simulate_one_worker(FairShare(), queued_jobs(("a", heavy, 400), ("b", light, 4000)), costs, until=3.0)
    assert abs(got["a", "heavy"] - got["b", "light"]) <= costs["heavy"] + costs["light"], got
    # Key a uses both models, key b the light one: b gets half, a's half is split between its models
    got = simulate_one_worker(FairShare(), queued_jobs(("a", heavy, 400), ("a", light, 4000), ("b", light, 4000)), costs, until=4.0)
    assert abs(got["b", "light"] - 2.0) <= 0.05 and abs(got["a", "heavy"] - got["a", "light"]) <= 0.05, got
    # One key's first request, queued after another key's 100: taken next
    fair = FairShare()
    simulate_one_worker(fair, queued_jobs(("a", light, 10)), costs, until=1.0)
    assert fair.pick(queued_jobs(("a", light, 100), ("b", light, 1))) == 100


def test_workers_adapting_one_model_at_once_do_not_share_its_module():
    """``functional_call`` swaps the given tensors into the module for the length of a call (and
    ANIL's feature capture hooks it), so two workers adapting the same model at once through the
    generic path would compute with each other's parameters and could leave adapted ones in the
    model. Each worker must get exactly what a lone sequential adaptation gets, and the model stay put."""
    from metalearn import MLP, MetaConfig, MetaLearner
    from metalearn.adaptation import adapt, predict

    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, [40, 40], 1), MetaConfig("maml", task_type="regression", inner_steps=20, inner_lr=0.02))
    model = SimpleNamespace(name="sine", learner=learner, device="cpu", support_shift=0, input_shape=(1,), task_type="regression", n_way=None, derived={})
    original = {n: p.detach().clone() for n, p in learner.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    tasks = []
    for i in range(24):
        x = torch.rand(10, 1, generator=generator) * 10 - 5
        tasks.append((x, torch.sin(x + i) * (1 + i / 10), torch.linspace(-5, 5, 7).unsqueeze(1)))
    expected = [predict(learner, adapt(learner, x, y, steps=20), qx).squeeze(-1) for x, y, qx in tasks]

    engine = Engine(workers=2, threads=1, max_batch_size=1, max_wait_ms=0, request_timeout_s=60)
    engine.start()
    try:
        async def all_at_once():
            jobs = [Job("adapt", model, support_x=x, support_y=y, steps=20, query_x=qx, keep_session=False) for x, y, qx in tasks]
            return await asyncio.gather(*[engine.submit(job) for job in jobs])

        results = asyncio.run(all_at_once())
    finally:
        engine.stop()
    assert engine.batches == len(tasks)
    for result, want in zip(results, expected):
        torch.testing.assert_close(torch.tensor(result["predictions"]), want, rtol=1e-5, atol=1e-5)
    for name, p in learner.named_parameters():
        assert torch.equal(p.detach(), original[name]), f"{name} changed"


def test_the_routes_give_each_job_its_callers_owner_id(tmp_path):
    """What the fair shares between keys go by: every computing route's job carries the caller's owner id."""
    from service.app import create_app
    from service.settings import hash_key
    from test_service_helpers import make_model_dir

    keys = ["a-key-long-enough-0001", "a-key-long-enough-0002"]
    app = create_app(Settings(model_dir=str(make_model_dir(tmp_path / "models")), api_keys=",".join(keys)))
    owners = []
    with TestClient(app) as client:
        sid = client.post("/v1/models/sine/adapt", json={"support": {"x": [[0.5]], "y": [0.1]}}, headers={"X-API-Key": keys[1]}).json()["session_id"]
        submit = app.state.engine.submit_nowait

        def noted(job):
            owners.append(job.owner)
            return submit(job)

        app.state.engine.submit_nowait = noted
        for key in keys:
            assert client.post("/v1/models/sine/adapt", json={"support": {"x": [[0.5]], "y": [0.1]}}, headers={"X-API-Key": key}).status_code == 201
            assert client.post("/v1/models/sine/predict", json={"support": {"x": [[0.5]], "y": [0.1]}, "query": {"x": [[0.2]]}},
                               headers={"X-API-Key": key}).status_code == 200
        app.state.engine.inline_predict_s = 0  # (a lone session predict may compute on the event loop: no submit)
        assert client.post(f"/v1/sessions/{sid}/predict", json={"x": [[0.2]] * 3}, headers={"X-API-Key": keys[1]}).status_code == 200
    assert owners == [hash_key(keys[0])] * 2 + [hash_key(keys[1])] * 3


def test_queue_full_and_store_down_are_503_problems(tmp_path, caplog):
    from service.app import create_app

    app = create_app(Settings(model_dir=str(tmp_path), queue_size=1))

    class DownStore(MemorySessionStore):
        def get(self, session_id, owner):
            raise SessionStoreUnavailable("redis://nowhere: connection refused")

    with TestClient(app) as client, caplog.at_level(logging.WARNING, logger="service"):
        app.state.store = DownStore()
        response = client.get("/v1/sessions/abc")
        assert response.status_code == 503 and response.json()["title"] == "Session store unavailable"
        client.get("/v1/sessions/abc")
        said = [r.getMessage() for r in caplog.records if "session store is unavailable" in r.getMessage()]
        assert said == ["the session store is unavailable, session calls answer 503: redis://nowhere: connection refused"]  # once a minute
        assert "Retry-After" in response.headers
        assert client.get("/readyz").status_code == 503  # no models in an empty dir
        assert client.get("/healthz").status_code == 200

        def full(job):
            raise QueueFull(3)

        app.state.engine.submit_nowait = full
        app.state.registry.models["x"] = None  # not reached: unknown model first
        response = client.post("/v1/models/x/predict", json={})
        assert response.status_code in (404, 422, 503)



def test_cors_lets_the_configured_origins_call_from_a_browser(tmp_path):
    """METALEARN_CORS_ORIGINS: a browser's preflight from a configured origin is allowed (with the API key
    header, and a tracing library's traceparent), an answer (a 413 and a bug's 500 too) carries the headers a page
    needs to read it and its Location, Allow and WWW-Authenticate, other origins get none; without the setting no
    answer has them. An origin with a path or trailing slash is refused at start."""
    from service.app import create_app

    page = "https://app.example.com"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key,content-type,traceparent"}
    app = create_app(Settings(model_dir=str(tmp_path), cors_origins=f"{page}, http://localhost:5173", api_keys="k", max_body_bytes=1024))

    @app.get("/v1/bug")
    async def bug():
        raise KeyError("a bug")

    with TestClient(app) as client:
        allowed = client.options("/v1/models/any/predict", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == page
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        answer = client.get("/v1/models", headers={"Origin": page, "X-API-Key": "k"})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == page
        exposed = answer.headers["access-control-expose-headers"].lower()
        assert all(name in exposed for name in ("x-request-id", "retry-after", "location", "allow", "www-authenticate")), exposed
        too_big = client.post("/v1/models/any/predict", content=b"x" * 2048, headers={"Origin": page, "X-API-Key": "k", "Content-Type": "application/json"})
        assert too_big.status_code == 413 and too_big.headers["access-control-allow-origin"] == page
        # (the middleware that answers a bug is outside the CORS one: it adds the headers itself)
        failed = client.get("/v1/bug", headers={"Origin": page, "X-API-Key": "k"})
        assert failed.status_code == 500 and failed.headers["access-control-allow-origin"] == page and failed.json()["request_id"]
        assert "access-control-allow-origin" not in client.get("/v1/bug", headers={"Origin": "https://evil.example"}).headers
        unknown_header = client.options("/v1/models/any/predict", headers={**preflight, "Access-Control-Request-Headers": "content-type,x-trace-me"})
        assert unknown_header.status_code == 400 and "headers it may not send: x-trace-me;" in unknown_header.json()["detail"]
        other = client.options("/v1/models/any/predict", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        # a problem, as every refusal is (Starlette's own answer: the plain text "Disallowed CORS origin")
        assert other.headers["content-type"] == "application/problem+json" and other.json()["type"].endswith("/bad-request")
        assert "request's origin is not allowed here" in other.json()["detail"] and other.headers["x-request-id"]
        wrong_method = client.options("/v1/models/any/predict", headers={**preflight, "Access-Control-Request-Method": "PUT"})
        assert wrong_method.status_code == 400 and "request's method is not allowed" in wrong_method.json()["detail"]
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://evil.example"}).headers
    with TestClient(create_app(Settings(model_dir=str(tmp_path)))) as client:
        assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": page}).headers
    for bad in ("https://app.example.com/", "app.example.com", "https://app.example.com/ui"):
        with pytest.raises(ValueError, match="METALEARN_CORS_ORIGINS: .* is not an origin"):
            Settings(cors_origins=bad)


def test_forwarded_allow_ips_are_addresses_networks_or_a_star():
    """What uvicorn would take as a name that never matches (a typo: no proxy believed, silently) is refused;
    the entries reach uvicorn stripped (" *" would otherwise be a name too)."""
    assert Settings(forwarded_allow_ips=" 10.0.0.1, 172.16.0.0/12 ,::1").forwarded_allow_list() == ["10.0.0.1", "172.16.0.0/12", "::1"]
    assert Settings(forwarded_allow_ips=" *").forwarded_allow_list() == ["*"]
    for bad in ("proxy", "10.0.0.300", "*.example.com"):
        with pytest.raises(ValueError, match="METALEARN_FORWARDED_ALLOW_IPS: .* is not an IP address"):
            Settings(forwarded_allow_ips=bad)


def test_every_answer_carries_a_request_id(tmp_path, caplog):
    """X-Request-ID on every answer (a valid one the caller sent is echoed), and in a 500's body and log line."""
    from service.app import create_app

    app = create_app(Settings(model_dir=str(tmp_path), max_body_bytes=1024))

    class BrokenStore(MemorySessionStore):
        def get(self, session_id, owner):
            raise RuntimeError("a bug")

    made = re.compile(r"[0-9a-f]{24}")
    with TestClient(app, raise_server_exceptions=False) as client:
        first, second = client.get("/healthz"), client.get("/healthz")
        assert made.fullmatch(first.headers["x-request-id"]) and made.fullmatch(second.headers["x-request-id"])
        assert first.headers["x-request-id"] != second.headers["x-request-id"]
        assert client.get("/healthz", headers={"X-Request-ID": "lb-7:trace_0.1"}).headers["x-request-id"] == "lb-7:trace_0.1"
        for refused in (b"two words", b"x" * 129, "caf\u00e9".encode()):
            assert made.fullmatch(client.get("/healthz", headers={"X-Request-ID": refused}).headers["x-request-id"])
        assert made.fullmatch(client.get("/v1/sessions/abc").headers["x-request-id"])  # 404
        assert made.fullmatch(client.post("/v1/sessions/abc/predict", content=b"{" * 2000).headers["x-request-id"])  # 413
        app.state.store = BrokenStore()
        with caplog.at_level("ERROR", logger="service"):
            response = client.get("/v1/sessions/abc", headers={"X-Request-ID": "support-ticket-42"})
        assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
        assert response.headers["x-request-id"] == response.json()["request_id"] == "support-ticket-42"
        assert any("support-ticket-42" in record.getMessage() and record.exc_info for record in caplog.records)
        assert "/v1/sessions/{session_id}" in caplog.text and "/v1/sessions/abc" not in caplog.text  # no session id in the log
        assert client.get("/healthz").status_code == 200

@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_engine_adapts_on_the_shifted_support_the_checkpoint_records(tmp_path, algorithm):
    """A checkpoint with test-time support augmentation: every engine path (here the fast MAML and ANIL
    kernels, micro-batched) adapts exactly as ``adapt(..., support_shift=...)`` does in process."""
    from metalearn import MLP, Conv4, MetaConfig, MetaLearner, adapt, predict
    from metalearn.checkpoint import save_checkpoint
    from metalearn.data.preprocess import OMNIGLOT_PREPROCESSING
    from service.registry import ModelRegistry
    from test_service_helpers import image_tasks

    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=5, channels=8), MetaConfig(algorithm, inner_steps=2, inner_lr=0.4))
    save_checkpoint(tmp_path / "shifted.safetensors", learner, input_shape=(1, 28, 28), n_way=5,
                    preprocessing=OMNIGLOT_PREPROCESSING, support_shift=2)
    sine = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression"))
    save_checkpoint(tmp_path / "sine_shifted.safetensors", sine, input_shape=(1,), support_shift=1)
    registry = ModelRegistry.load(tmp_path, "cpu")
    assert "sine_shifted" not in registry.models  # a shift needs image inputs: skipped, with the reason
    assert any("support_shift" in error for error in registry.errors.values())
    model = registry.get("shifted")
    assert model.support_shift == 2 and model.info()["support_shift"] == 2

    tasks = image_tasks(tasks=3, queries=2, seed=3)
    engine = Engine(max_batch_size=4, max_wait_ms=50.0)
    engine.start()
    try:
        jobs = [Job("adapt", model, support_x=tasks.support_x[i], support_y=tasks.support_y[i], steps=2, lr=0.4,
                    query_x=tasks.query_x[i], keep_session=True) for i in range(3)]
        results = [future.result(timeout=60) for future in [engine.submit_nowait(job) for job in jobs]]
    finally:
        engine.stop()
    for i, result in enumerate(results):
        shifted = adapt(model.learner, tasks.support_x[i], tasks.support_y[i], steps=2, lr=0.4, support_shift=2)
        plain = adapt(model.learner, tasks.support_x[i], tasks.support_y[i], steps=2, lr=0.4)
        expected = torch.softmax(predict(model.learner, shifted, tasks.query_x[i]), -1)
        torch.testing.assert_close(torch.tensor(result["probabilities"]), expected, atol=1e-5, rtol=1e-4)
        assert result["support_loss_after"] == pytest.approx(float(shifted.support_loss_after), rel=1e-4, abs=1e-5)
        # the option changes the adaptation (so the comparison above can fail)
        unshifted = torch.softmax(predict(model.learner, plain, tasks.query_x[i]), -1)
        assert (unshifted - expected).abs().max() > 1e-4


def test_json_route_refuses_parameters_it_would_not_fill():
    """A JSONRoute fills only what it knows; anything else fails when the route is declared, not per request."""
    from fastapi import APIRouter, Depends, Header

    from service.routes.json_route import JSONRoute

    router = APIRouter(route_class=JSONRoute)

    def plain(session_id: str) -> dict:
        return {}

    async def other_dependency(limit: int = Depends(lambda: 3)) -> dict:
        return {}

    async def header(token: str = Header(...)) -> dict:
        return {}

    async def two_bodies(a: SessionPredictRequest, b: SessionPredictRequest) -> dict:
        return {}

    async def typed_path(session_id: int) -> dict:
        return {}

    for endpoint, path, message in [
        (plain, "/{session_id}", "async def"),
        (other_dependency, "/", r"only Depends\(owner\)"),
        (header, "/", "a JSONRoute takes"),
        (two_bodies, "/", "one body"),
        (typed_path, "/{session_id}", "str"),
    ]:
        with pytest.raises(TypeError, match=message):
            router.add_api_route(path, endpoint, methods=["POST"])


def test_json_routes_answer_like_fastapi(tmp_path):
    """The /v1 routes' own request handling: content types, key before body, validation errors, the OpenAPI document."""
    from service.app import create_app

    app = create_app(Settings(model_dir=str(tmp_path), api_keys="k" * 16))
    key = {"X-API-Key": "k" * 16}
    with TestClient(app) as client:
        # No valid key: 401, whatever the body.
        response = client.post("/v1/sessions/abc/predict", content=b"{not json")
        assert response.status_code == 401 and response.headers["content-type"] == "application/problem+json"
        assert client.post("/v1/sessions/abc/predict", content=b"{}", headers={"Authorization": "Basic " + "k" * 16}).status_code == 401
        # A declared non-JSON body: 415; no content type: read as JSON.
        response = client.post("/v1/sessions/abc/predict", content=b"x=1", headers={**key, "content-type": "application/x-www-form-urlencoded"})
        assert response.status_code == 415 and "application/json" in response.json()["detail"]
        response = client.post("/v1/sessions/abc/predict", content=b'{"x": [[0.5]]}', headers=key)
        assert response.status_code == 404 and response.json()["title"] == "Unknown session"
        assert client.post("/v1/sessions/abc/predict", content=b'{"x": [[0.5]]}', headers={"Authorization": "Bearer " + "k" * 16}).status_code == 404
        # No body: 422, as FastAPI answers. Not JSON: 400; JSON that does not fit the model: 422 naming the field.
        response = client.post("/v1/sessions/abc/predict", headers=key)
        assert response.status_code == 422 and response.json()["detail"] == "body: Field required"
        response = client.post("/v1/sessions/abc/predict", content=b"{not json", headers={**key, "content-type": "application/json"})
        assert response.status_code == 400 and response.json()["detail"].endswith("at line 1 column 2")  # says where it breaks
        response = client.post("/v1/sessions/abc/predict", content=b"[" * 300 + b"]" * 300, headers=key)
        assert response.status_code == 400 and "recursion limit exceeded" in response.json()["detail"]  # and why, when too deep
        response = client.post("/v1/sessions/abc/predict", json={"x": [[0.5]], "transductive": "maybe"}, headers=key)
        assert response.status_code == 422 and "transductive" in response.json()["detail"]
        assert response.json()["errors"][0]["loc"] == ["body", "transductive"]
        # The OpenAPI document still declares the bodies and both ways to send a key.
        schema = client.get("/openapi.json").json()
        operation = schema["paths"]["/v1/sessions/{session_id}/predict"]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/SessionPredictRequest"}
        assert {name for requirement in operation["security"] for name in requirement} == {"APIKeyHeader", "HTTPBearer"}
        assert set(schema["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
        assert all("X-Request-ID" in response["headers"] for item in schema["paths"].values() for op in item.values() for response in op["responses"].values())


def test_what_the_service_loads_at_start_is_kept_out_of_full_garbage_collections(tmp_path):
    """The lifespan freezes what it loaded (a full collection scanned it all: 115 ms pauses under load)
    and unfreezes it at shutdown."""
    import gc

    from service.app import create_app

    app = create_app(Settings(model_dir=str(tmp_path)))
    assert gc.get_freeze_count() == 0
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 10_000  # torch, FastAPI, the app: far more objects than that
        assert client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == 0


def test_access_lines_name_the_route_not_the_session_and_json_logs(tmp_path, caplog):
    """Each request's access line (service.access) has method, the route's template (a session id in a path
    stays out of the logs), status, duration and request id; JsonFormatter writes records as JSON objects."""
    import json
    import logging

    from service.app import create_app
    from service.logs import JsonFormatter

    app = create_app(Settings(model_dir=str(tmp_path)))
    with TestClient(app) as client, caplog.at_level("INFO", logger="service.access"):
        client.post("/v1/sessions/s3cr3t-session-id/predict", json={"x": [[0.5]]}, headers={"X-Request-ID": "trace-1"})
        client.get("/no/such/route")
        client.put("/v1/sessions/s3cr3t-session-id")  # no route takes it: the path, the session id replaced
        for path in ("//v1/sessions/s3cr3t-session-id", "/v1/sessions//s3cr3t-session-id", "/v1//sessions/s3cr3t-session-id/predict"):
            client.get("http://testserver" + path)  # (a base URL ending in "/": no route either)
    lines = [r for r in caplog.records if r.name == "service.access"]
    assert [(r.method, r.path, r.status, r.request_id) for r in lines] == [
        ("POST", "/v1/sessions/{session_id}/predict", 404, "trace-1"), ("GET", "/no/such/route", 404, lines[1].request_id),
        ("PUT", "/v1/sessions/{session_id}", 405, lines[2].request_id),
        ("GET", "//v1/sessions/{session_id}", 404, lines[3].request_id), ("GET", "/v1/sessions//{session_id}", 404, lines[4].request_id),
        ("GET", "/v1//sessions/{session_id}/predict", 404, lines[5].request_id)]
    assert all(r.duration_ms > 0 for r in lines) and "s3cr3t" not in caplog.text
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["message"].startswith("POST /v1/sessions/{session_id}/predict 404") and line["request_id"] == "trace-1"
    assert {"ts", "level", "logger", "method", "path", "status", "duration_ms", "client"} <= set(line) and line["level"] == "INFO"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("service").makeRecord("service", logging.ERROR, __file__, 1, "failed: %s", ("x",), sys.exc_info())
    error = json.loads(JsonFormatter().format(record))
    assert error["message"] == "failed: x" and "ValueError: boom" in error["exception"] and "request_id" not in error


class WhereEngine(Engine):
    """Notes the thread each batch computes on; a job of kind "hold" keeps its worker until released."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.threads_seen: list[str] = []
        self.release = threading.Event()

    def _compute(self, batch):
        if batch[0].kind == "hold":
            self.release.wait(10)
            return [{} for _ in batch]
        self.threads_seen.append(threading.current_thread().name)
        return super()._compute(batch)


def adapted_session(tmp_path, engine: Engine, queries: int) -> tuple:
    """(model, query_x, session tensors): a small Conv4 MAML checkpoint served from ``tmp_path`` and a
    session ``engine`` adapted for it, with queries ``queries`` per class."""
    from metalearn import Conv4, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint
    from service.registry import ModelRegistry
    from test_service_helpers import image_tasks

    torch.manual_seed(0)
    learner = MetaLearner(Conv4(out_features=5, channels=8), MetaConfig("maml", inner_steps=2, inner_lr=0.4))
    save_checkpoint(tmp_path / "m.safetensors", learner, input_shape=(1, 28, 28), n_way=5)
    model = ModelRegistry.load(tmp_path, "cpu").get("m")
    tasks = image_tasks(tasks=1, queries=queries, seed=1)
    job = Job("adapt", model, support_x=tasks.support_x[0], support_y=tasks.support_y[0], steps=2, lr=0.4)
    return model, tasks.query_x[0], engine.submit_nowait(job).result(30)["tensors"]


def test_a_lone_session_predict_computes_on_the_event_loop_when_the_workers_idle(tmp_path):
    """The hand-off to a sleeping worker and back costs a lone session predict more than it gains: when
    its request is the only one, every worker idles and the model's last lone prediction was cheap, it
    computes on the caller's thread, with the same answer. Not otherwise: a model's first lone prediction,
    a request that is not alone, a busy worker, too many query images for the budget, the setting at 0."""
    engine = WhereEngine(workers=2, threads=1, max_batch_size=4, max_wait_ms=0, request_timeout_s=30, inline_predict_ms=1000)
    engine.start()
    here = threading.current_thread().name
    try:
        model, query, session = adapted_session(tmp_path, engine, queries=2)

        def predict(query_x, alone=lambda: True, transductive=False, idle_workers=2):
            while len(engine._idle) < idle_workers:  # a worker that just answered is busy until it waits again
                time.sleep(0.001)
            job = Job("predict", model, query_x=query_x, session=session, transductive=transductive)
            result = asyncio.run(engine.submit(job, alone=alone))
            return torch.tensor(result["probabilities"]), engine.threads_seen[-1]

        first, where = predict(query)
        assert where != here  # not measured yet: a worker computes it
        again, where = predict(query)
        assert where == here
        torch.testing.assert_close(again, first, rtol=1e-5, atol=1e-6)
        assert predict(query, alone=lambda: False)[1] != here
        assert predict(query, transductive=True)[1] != here  # measured apart: its own first
        assert predict(query, transductive=True)[1] == here

        per_image = model.derived["lone_predict_s"][False]
        engine.inline_predict_s = per_image * len(query) / 2  # half the images fit the budget
        assert predict(query)[1] != here
        engine.inline_predict_s = 1.0
        assert predict(query[: len(query) // 4])[1] == here

        holding = engine.submit_nowait(Job("hold", model, query_x=query, session=session))
        while not holding.running():  # (taken by a worker, alone)
            time.sleep(0.001)
        assert predict(query, idle_workers=1)[1] != here  # the other worker takes it
        engine.release.set()
        holding.result(10)

        engine.inline_predict_s = 0.0
        assert predict(query)[1] != here
    finally:
        engine.stop()


def test_session_predicts_arriving_together_go_to_the_workers_and_batch(tmp_path):
    """Requests read in the same turn of the event loop count before a lone one decides to compute in
    place: a burst of session predicts all go to the workers (and batch), none blocks the loop."""
    engine = WhereEngine(workers=1, threads=1, max_batch_size=8, max_wait_ms=0, request_timeout_s=30, inline_predict_ms=1000)
    engine.start()
    here = threading.current_thread().name
    try:
        model, query, session = adapted_session(tmp_path, engine, queries=1)
        in_flight = 0

        async def request():
            nonlocal in_flight
            in_flight += 1
            try:
                job = Job("predict", model, query_x=query, session=session)
                return await engine.submit(job, alone=lambda: in_flight == 1)
            finally:
                in_flight -= 1

        async def burst(count):
            return await asyncio.gather(*[request() for _ in range(count)])

        asyncio.run(burst(1))  # measured: a lone one would now compute in place
        while not engine._idle:  # (the worker back waiting)
            time.sleep(0.001)
        assert asyncio.run(burst(1)) and engine.threads_seen[-1] == here
        engine.threads_seen.clear()
        batches = engine.batches
        results = asyncio.run(burst(8))
    finally:
        engine.stop()
    assert len(results) == 8 and here not in engine.threads_seen
    assert engine.batches - batches < 8  # batched


def test_a_drain_set_where_nothing_drains_is_said_at_start(tmp_path, caplog):
    """METALEARN_DRAIN_S is metalearn serve's: the app run by plain uvicorn or gunicorn warns that it does
    nothing there, instead of leaving the operator to believe the load balancer gets its 503s."""
    import uvicorn

    from service.app import create_app
    from service.server import _draining_server

    plain = create_app(Settings(model_dir=str(tmp_path), drain_s=5))
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(plain):
        pass
    assert "METALEARN_DRAIN_S=5 does nothing here" in caplog.text
    caplog.clear()
    served = create_app(Settings(model_dir=str(tmp_path), drain_s=5))
    _draining_server(uvicorn.Config(served), served, 5)
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(served):
        pass
    assert "METALEARN_DRAIN_S" not in caplog.text


def test_bodies_of_too_many_list_values_are_refused_unparsed_and_pictures_decode_off_the_loop(tmp_path, monkeypatch):
    """Parsing JSON lists holds the GIL whichever thread does it (a 15 MB list: 3-5 s, the event loop waiting): a body of
    more comma-separated values than METALEARN_MAX_LIST_VALUES is refused before it is parsed. Pictures, which Pillow
    decodes without the GIL, are decoded in a worker thread; numbers are read inline."""
    import json

    import anyio
    from pydantic import BaseModel

    from service.app import create_app
    from service.routes.deps import decode_off_the_loop
    from service.tensors import ImageList

    parsed = []
    real = BaseModel.model_validate_json.__func__
    monkeypatch.setattr(SessionPredictRequest, "model_validate_json", classmethod(lambda cls, raw: (parsed.append(len(raw)), real(cls, raw))[1]))
    with TestClient(create_app(Settings(model_dir=str(tmp_path), max_list_values=4096))) as client:
        values, lists = json.dumps({"x": [[0.5] * 4097]}).encode(), json.dumps({"x": [[0.5, 0.25]] * 257}).encode()
        for body, counts in ((values, "4097 or so values in 2 JSON lists"), (lists, "514 or so values in 258 JSON lists")):
            response = client.post("/v1/sessions/abc/predict", content=body)
            assert response.status_code == 413, response.text
            assert response.json()["detail"].startswith(f"the body holds {counts}, over the limit of 4096 values in 256 lists (METALEARN_MAX_LIST_VALUES): "
                                                        "send large tensors as {dtype, shape, base64}")
        within = json.dumps({"x": [[0.5, 0.25]] * 255}).encode()
        assert len(within) > 2 * 256 and client.post("/v1/sessions/abc/predict", content=within).status_code == 404  # parsed: no such session
        assert parsed == [len(within)]

    def request():
        return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(decode_threads=anyio.CapacityLimiter(1))))

    loop_thread = threading.get_ident()
    where = lambda value: anyio.run(decode_off_the_loop, request(), (value,), threading.get_ident)  # noqa: E731
    assert where([[0.5]]) == loop_thread and where(ImageList(images=["AAAA"])) != loop_thread


def test_api_keys_that_would_open_the_api_are_refused_and_short_ones_warned(tmp_path, caplog):
    from service.app import create_app
    from service.server import _loopback

    for keys in (" ", " , ", "a-long-enough-key-1,,a-long-enough-key-2", "a-long-enough-key-1,"):
        with pytest.raises(ValueError, match="METALEARN_API_KEYS: a blank key"):
            Settings(model_dir=str(tmp_path), api_keys=keys)
    with caplog.at_level("WARNING", logger="service"), TestClient(create_app(Settings(model_dir=str(tmp_path), api_keys="short, " + "k" * 16))):
        pass
    assert "1 of the API keys are shorter than 16 characters" in caplog.text
    assert [_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "0.0.0.0", "::", "10.0.0.5", "example.com")] == [
        True, True, True, True, True, False, False, False, False]


def test_text_logs_escape_control_characters():
    """A path or a file name with a newline must not write a log line of its own (in JSON, json.dumps escapes it)."""
    from service.logs import TextFormatter

    record = logging.LogRecord("service.access", logging.INFO, __file__, 1, "GET %s 404", ("/x\n2026-01-01 INFO service.access: GET /v1/admin 200\r\x1b[2J",), None)
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.endswith("INFO service.access: GET /x\\n2026-01-01 INFO service.access: GET /v1/admin 200\\r\\x1b[2J 404")
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "Traceback (most recent call last):\n" in TextFormatter().format(record)  # (a traceback keeps its lines)


def test_redis_addresses_in_messages_lose_their_passwords():
    from service.redis_store import _redact

    assert _redact("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _redact("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert _redact("redis://redis:6379/0?password=s3cret&socket_timeout=2") == "redis://redis:6379/0?***"
    assert _redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def metasgd_with_learned_rates():
    """A sinusoid Meta-SGD learner (2 inner steps, initial rate 0.01) whose learned rates are far from 0.01, so that
    adapting with either is visible."""
    from metalearn import MLP, MetaConfig, MetaLearner

    torch.manual_seed(0)
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("metasgd", task_type="regression", inner_steps=2, inner_lr=0.01))
    with torch.no_grad():
        for rate in learner.lrs.values():
            rate.uniform_(0.05, 0.2)
    return learner


def test_a_model_with_learned_learning_rates_adapts_with_them_unless_its_checkpoint_chose_a_rate(tmp_path):
    """Meta-SGD: a request without inner_lr adapts with the learned rates and its answer says null (not the
    manifest's initial lr, which it did not use); one with inner_lr uses and echoes it. A checkpoint that records a
    test-time rate (a run's eval_inner_lr, with which it validated and metalearn eval evaluates) adapts with that
    rate: the service used the learned ones (a review: predictions up to 0.335 apart from eval's).
    Checkpoint.adaptation_settings decides for both."""
    from metalearn import MLP, MetaConfig, MetaLearner, adapt, predict
    from metalearn.checkpoint import adaptation_settings, load_checkpoint, save_checkpoint
    from service.app import create_app
    from test_service_helpers import sine_tasks

    learner = metasgd_with_learned_rates()
    save_checkpoint(tmp_path / "msgd.safetensors", learner, input_shape=(1,))
    save_checkpoint(tmp_path / "chosen.safetensors", learner, input_shape=(1,), inner_lr=0.002)
    assert load_checkpoint(tmp_path / "msgd.safetensors").adaptation_settings() == {"steps": 2, "lr": None, "support_shift": 0}
    assert load_checkpoint(tmp_path / "chosen.safetensors").adaptation_settings() == {"steps": 2, "lr": 0.002, "support_shift": 0}
    # Recorded before lr_chosen was: the run's eval_inner_lr says; a model with no learned rates takes inner.lr.
    for config, lr in (({"eval_inner_lr": 0.002}, 0.002), ({}, None)):
        assert adaptation_settings({"inner": {"steps": 2, "lr": 0.002}, "training": {"config": config}}, learner)["lr"] == lr
    plain = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression", inner_lr=0.01))
    assert adaptation_settings({"inner": {"lr": 0.05}}, plain) == {"steps": 1, "lr": 0.05, "support_shift": 0}

    tasks = sine_tasks(tasks=1)
    sx, sy, qx = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0]
    body = {"support": {"x": sx.tolist(), "y": sy.squeeze(-1).tolist()}, "query": {"x": qx.tolist()}}
    with TestClient(create_app(Settings(model_dir=str(tmp_path), device="cpu"))) as client:
        info, chosen_info = client.get("/v1/models/msgd").json(), client.get("/v1/models/chosen").json()
        learned = client.post("/v1/models/msgd/predict", json=body).json()
        fixed = client.post("/v1/models/msgd/predict", json={**body, "inner_lr": 0.01}).json()
        adapted = client.post("/v1/models/msgd/adapt", json={"support": body["support"]})
        chosen = client.post("/v1/models/chosen/predict", json=body).json()
    assert info["learned_lrs"] is True and info["inner_lr"] == pytest.approx(0.01)
    assert chosen_info["learned_lrs"] is False and chosen_info["inner_lr"] == pytest.approx(0.002)
    assert "inner_lr" not in learned and fixed["inner_lr"] == 0.01 and chosen["inner_lr"] == pytest.approx(0.002)
    assert adapted.status_code == 201 and adapted.json()["inner_lr"] is None
    with torch.no_grad():
        want = {lr: predict(learner, adapt(learner, sx, sy, steps=2, lr=lr), qx).squeeze(-1) for lr in (None, 0.01, 0.002)}
    for answer, lr in ((learned, None), (fixed, 0.01), (chosen, 0.002)):
        torch.testing.assert_close(torch.tensor(answer["predictions"]), want[lr], rtol=1e-4, atol=1e-5)
    assert (want[None] - want[0.01]).abs().max() > 1e-3 and (want[None] - want[0.002]).abs().max() > 1e-3


def test_a_stored_session_that_does_not_fit_its_model_is_unknown_not_unadapted(tmp_path, caplog):
    """A session record a shared store holds but this service did not write (by hand, another program): with
    no tensors it predicted with the unadapted model, silently; with others it failed deep in the engine. It is
    dropped (kept, every read decoded it, logged and refused it again), the log saying what is wrong."""
    from service.app import create_app
    from service.sessions import new_session_id
    from test_service_helpers import image_tasks, make_model_dir

    app = create_app(Settings(model_dir=str(make_model_dir(tmp_path / "models"))))
    task = image_tasks(seed=3)
    support = {"x": task.support_x[0].tolist(), "y": task.support_y[0].tolist()}
    query = {"x": task.query_x[0][:2].tolist()}
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="service"):
        adapted = client.post("/v1/models/conv_maml/adapt", json={"support": support})
        assert adapted.status_code == 201
        real = app.state.store.get(adapted.json()["session_id"], None)
        first = next(iter(real.tensors))
        variants = {
            "nothing": {},
            "a tensor too few": {k: v for k, v in real.tensors.items() if k != first},
            "another shape": {**real.tensors, first: real.tensors[first][:1]},
            "not finite": {**real.tensors, first: torch.full_like(real.tensors[first], float("nan"))},
            "float64": {**real.tensors, first: real.tensors[first].double()},
        }
        said = {"nothing": "missing", "a tensor too few": "missing", "another shape": "of other sizes", "not finite": "not finite:",
                "float64": "not torch.float32:"}
        for name, tensors in variants.items():
            forged = Session(new_session_id(), "conv_maml", None, time.time(), time.time() + 60, tensors, dict(real.meta))
            app.state.store.put(forged)
            answer = client.post(f"/v1/sessions/{forged.id}/predict", json=query)
            assert answer.status_code == 404 and "does not fit model 'conv_maml'" in answer.json()["detail"], name
            assert said[name] in answer.json()["detail"], (name, answer.json()["detail"])
            assert app.state.store.get(forged.id, None) is None, name  # dropped
        assert "does not fit model" in caplog.text
        assert client.post(f"/v1/sessions/{real.id}/predict", json=query).status_code == 200


def test_an_adaptation_is_not_computed_while_the_session_store_refuses(tmp_path):
    """Redis down a moment ago (``SessionStore.failed_recently``) and still down (``check``): an adaptation is
    answered 503 at once, not computed (0.85 s of a worker for a demo model) and then refused when its session
    cannot be stored. Once the store answers again, adaptations compute at once."""
    from service.app import create_app
    from test_service_helpers import image_tasks, make_model_dir

    class RefusingStore(MemorySessionStore):
        down = True

        def failed_recently(self):
            return True

        def check(self):
            if self.down:
                raise SessionStoreUnavailable("redis://nowhere: connection refused")

    app = create_app(Settings(model_dir=str(make_model_dir(tmp_path / "models"))))
    task = image_tasks(seed=3)
    body = {"support": {"x": task.support_x[0].tolist(), "y": task.support_y[0].tolist()}}
    with TestClient(app) as client:
        app.state.store = RefusingStore()
        refused = client.post("/v1/models/conv_maml/adapt", json=body)
        assert refused.status_code == 503 and refused.json()["title"] == "Session store unavailable"
        assert app.state.engine.batches == 0
        app.state.store.down = False  # back, though it failed a moment ago
        assert client.post("/v1/models/conv_maml/adapt", json=body).status_code == 201
        assert app.state.engine.batches == 1
