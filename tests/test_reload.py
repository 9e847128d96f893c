"""Reloading the model directory (SIGHUP): only what changed is loaded, sessions of a replaced version are gone,
a replacement that does not load leaves the served version in place, requests go on being answered."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import threading
import time
import weakref

import httpx
import numpy as np
import pytest
import torch

from metalearn.client import Client, ServiceError
from service.engine import Engine, Job
from service.registry import ModelRegistry
from test_service_helpers import ServerProcess, image_tasks, make_model_dir, sine_tasks


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("reload_models"))


def replace_atomically(source, target):
    """As ``metalearn train`` writes a checkpoint: a full copy beside it, renamed over it."""
    partial = target.with_name("." + target.name + ".partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def wait_for(condition, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and proc.alive(), proc.log()
        time.sleep(0.05)


def test_a_reload_loads_what_changed_and_keeps_the_rest(trained, tmp_path):
    model_dir = shutil.copytree(trained, tmp_path / "models")
    first = ModelRegistry.load(model_dir)
    assert first.names() == ["anil_run", "conv_maml", "sine"] and "broken" in " ".join(first.errors)

    again = ModelRegistry.load(model_dir, previous=first)
    assert all(again.get(n) is first.get(n) for n in first.names())  # nothing read again
    assert again.changes_from(first) == {"added": [], "updated": [], "removed": [], "kept": ["anil_run", "conv_maml", "sine"]}

    replace_atomically(trained / "anil_run" / "best.safetensors", model_dir / "conv_maml.safetensors")
    shutil.copyfile(trained / "sine.safetensors", model_dir / "sine2.safetensors")
    shutil.rmtree(model_dir / "anil_run")
    second = ModelRegistry.load(model_dir, previous=again)
    assert second.changes_from(again) == {"added": ["sine2"], "updated": ["conv_maml"], "removed": ["anil_run"], "kept": ["sine"]}
    assert second.get("conv_maml").version == first.get("anil_run").version and second.get("sine") is first.get("sine")

    # The same checkpoint written again (a copy, a new file time) changes nothing.
    replace_atomically(trained / "sine.safetensors", model_dir / "sine.safetensors")
    os.utime(model_dir / "sine2.safetensors")
    same = ModelRegistry.load(model_dir, previous=second)
    assert same.changes_from(second)["kept"] == ["conv_maml", "sine", "sine2"] and same.get("sine") is first.get("sine")
    # A rewrite in place counts as a change too; one that does not load leaves the served version.
    (model_dir / "sine.safetensors").write_bytes(b"half a checkpoint")
    third = ModelRegistry.load(model_dir, previous=same)
    assert third.get("sine") is first.get("sine") and third.changes_from(same)["kept"] == ["conv_maml", "sine", "sine2"]
    assert "still serving the version loaded before" in third.errors[str(model_dir / "sine.safetensors")]
    # A model directory emptied or gone (an unmounted volume: an empty mount point, or none) drops nothing.
    for path in model_dir.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = ModelRegistry.load(model_dir, previous=third)
    assert kept.models == third.models and not kept.changed_on_disk(model_dir)  # (no reload again at every look)
    shutil.rmtree(model_dir)
    assert ModelRegistry.load(model_dir, previous=kept) is kept


def test_sighup_reloads_the_models_of_a_running_service(trained, tmp_path):
    model_dir = shutil.copytree(trained, tmp_path / "models")
    proc = ServerProcess(model_dir, tmp_path / "serve.log", cli=True).wait_ready()
    images, sines = image_tasks(tasks=1, queries=3, seed=3), sine_tasks(tasks=1, seed=3)
    answers: list[int] = []
    stop = threading.Event()
    try:
        with Client(proc.url) as client:
            before = {m["name"]: m["version"] for m in client.models()}
            replaced = client.adapt("conv_maml", images.support_x[0], images.support_y[0])
            dropped = client.adapt("sine", sines.support_x[0], sines.support_y[0])
            kept = client.adapt("anil_run", images.support_x[0], images.support_y[0])
            expected = kept.predict_full(images.query_x[0]).probabilities

            def predict_all_along():  # a kept model's session, predicted throughout the reload
                with Client(proc.url, retries=0) as own:
                    session = own.session(kept.id)
                    while not stop.is_set():
                        try:
                            np.testing.assert_allclose(session.predict_full(images.query_x[0]).probabilities, expected, atol=1e-6)
                            answers.append(200)
                        except ServiceError as error:
                            answers.append(error.status)

            load = threading.Thread(target=predict_all_along)
            load.start()
            wait_for(lambda: len(answers) >= 5, proc)
            replace_atomically(trained / "anil_run" / "best.safetensors", model_dir / "conv_maml.safetensors")
            (model_dir / "sine.safetensors").unlink()
            shutil.copyfile(trained / "conv_maml.safetensors", model_dir / "conv_copy.safetensors")
            proc.process.send_signal(signal.SIGHUP)
            wait_for(lambda: {m["name"] for m in client.models()} == {"anil_run", "conv_copy", "conv_maml"}, proc)
            reloaded = len(answers)
            wait_for(lambda: len(answers) >= reloaded + 5, proc)
            stop.set()
            load.join(30)

            after = {m["name"]: m["version"] for m in client.models()}
            assert after == {"anil_run": before["anil_run"], "conv_maml": before["anil_run"], "conv_copy": before["conv_maml"]}
            assert client.model("conv_maml")["algorithm"] == "anil"
            assert "conv_copy" in httpx.get(proc.url + "/openapi.json").text  # the docs' examples name the models served
            for session in (replaced, dropped):  # (dropped from the store at the reload: see below)
                with pytest.raises(ServiceError) as gone:
                    session.predict(images.query_x[0] if session is replaced else sines.query_x[0])
                assert gone.value.status == 404 and "a reload replaced or removed its model" in str(gone.value)
                with pytest.raises(ServiceError) as gone:  # described as it predicts: gone
                    session.describe()
                assert gone.value.status == 404 and "a reload replaced or removed its model" in str(gone.value)
            assert kept.describe()["model"] == "anil_run"
            # Held no longer: the replaced and the removed model's sessions are dropped at the reload (they held
            # their memory until they expired), the kept one stays.
            assert "metalearn_sessions_live 1.0" in httpx.get(proc.url + "/metrics").text
            assert "dropped 2 sessions of models no longer served in their version" in proc.log()
            np.testing.assert_allclose(kept.predict_full(images.query_x[0]).probabilities, expected, atol=1e-6)
            assert client.predict("conv_copy", images.support_x[0], images.support_y[0], images.query_x[0]).probabilities.shape == (15, 5)
            assert "reloaded the models" in proc.log() and "updated conv_maml" in proc.log()
            assert 'metalearn_model_reloads_total{outcome="done"} 1.0' in httpx.get(proc.url + "/metrics").text

            # A new file that does not load: the version served stays, /readyz says why.
            (model_dir / "conv_copy.safetensors").write_bytes(b"not a checkpoint")
            proc.process.send_signal(signal.SIGHUP)
            wait_for(lambda: "conv_copy" in " ".join(httpx.get(proc.url + "/readyz").json()["skipped"]), proc)
            assert client.model("conv_copy")["version"] == before["conv_maml"]
            assert client.predict("conv_copy", images.support_x[0], images.support_y[0], images.query_x[0]).probabilities.shape == (15, 5)
        log = proc.log()
    finally:
        stop.set()
        proc.stop()
    assert answers and set(answers) == {200}, (len(answers), set(answers))
    assert "Traceback" not in log, log


def test_a_reload_frees_the_models_it_replaced(trained):
    """Every recording (a CPU trace, a compilation) keeps its model alive: ``Engine.serve_only`` drops the
    recordings of models no longer served, idle workers' too, so that a replaced model's memory goes."""
    registry = ModelRegistry.load(trained)
    engine = Engine(workers=2, threads=1, cpu_traces=4, cpu_scripts=4)
    engine.start()
    try:
        g = torch.Generator().manual_seed(0)
        for name in ("conv_maml", "anil_run"):
            for _ in range(4):  # recorded from the second or third use on
                job = Job("adapt", registry.get(name), support_x=torch.rand(5, 1, 28, 28, generator=g), support_y=torch.randperm(5, generator=g),
                          steps=2, query_x=torch.rand(3, 1, 28, 28, generator=g))
                engine.submit_nowait(job).result(60)
        assert engine._scripts.wait(60)
        assert engine.trace_stats()["held"] > 0 and engine.script_stats()["held"] > 0  # ANIL's traced, MAML's compiled
        replaced = [weakref.ref(registry.get(name)) for name in ("conv_maml", "anil_run")]
        engine.serve_only([registry.get("sine")])
        del registry, job
        deadline = time.monotonic() + 10
        while any(ref() is not None for ref in replaced) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.05)
        assert all(ref() is None for ref in replaced)
        assert engine.trace_stats()["held"] == 0 and engine.script_stats()["held"] == 0
    finally:
        engine.stop()


def test_a_replaced_model_and_its_successor_never_share_a_batch(trained):
    """During a reload, jobs queued for the replaced model and new ones for its successor carry the same
    name: each must still be computed with its own weights (a batch runs on its first job's model)."""
    replaced, successor = ModelRegistry.load(trained).get("sine"), ModelRegistry.load(trained).get("sine")
    with torch.no_grad():
        for p in successor.learner.parameters():
            p.add_(0.3)
    tasks = sine_tasks(tasks=1)

    def job(model):
        return Job("adapt", model, support_x=tasks.support_x[0], support_y=tasks.support_y[0], steps=2, query_x=tasks.query_x[0], keep_session=False)

    def predictions(engine, jobs):
        futures = [engine.submit_nowait(j) for j in jobs]
        return [torch.as_tensor(f.result(60)["predictions"]) for f in futures]

    alone = Engine(workers=1, threads=1, max_batch_size=1, max_wait_ms=0, cpu_traces=0, cpu_scripts=0)
    alone.start()
    try:
        expected = [predictions(alone, [job(model)])[0] for model in (replaced, successor)]
    finally:
        alone.stop()
    assert not torch.allclose(expected[0], expected[1])

    # A worker waits long for company, so both jobs would be one batch if they counted as compatible.
    together = Engine(workers=1, threads=1, max_batch_size=8, max_wait_ms=300, cpu_traces=0, cpu_scripts=0)
    together.start()
    try:
        got = predictions(together, [job(replaced), job(successor)])
    finally:
        together.stop()
    assert together.batches == 2
    for result, want in zip(got, expected):
        torch.testing.assert_close(result, want, rtol=1e-5, atol=1e-6)


def test_a_directory_of_links_serves_some_of_another_directorys_models(trained, tmp_path):
    """How to serve only some models of a directory (README, Many models): a directory of symbolic links to
    them, a checkpoint file's or a run directory's. A new version written over the target (as ``metalearn
    train`` writes, a file renamed over it) is a change there too, and a link removed is a model removed."""
    source = shutil.copytree(trained, tmp_path / "all")
    served = tmp_path / "served"
    served.mkdir()
    (served / "sine.safetensors").symlink_to(source / "sine.safetensors")
    (served / "anil_run").symlink_to(source / "anil_run", target_is_directory=True)
    first = ModelRegistry.load(served)
    assert first.names() == ["anil_run", "sine"] and not first.errors and not first.changed_on_disk(served)

    replace_atomically(trained / "conv_maml.safetensors", source / "sine.safetensors")
    assert first.changed_on_disk(served)
    second = ModelRegistry.load(served, previous=first)
    assert second.changes_from(first) == {"added": [], "updated": ["sine"], "removed": [], "kept": ["anil_run"]}
    assert second.get("sine").version == ModelRegistry.load(trained).get("conv_maml").version
    (served / "anil_run").unlink()
    assert ModelRegistry.load(served, previous=second).changes_from(second)["removed"] == ["anil_run"]


def test_changed_on_disk_sees_each_change_once(trained, tmp_path):
    model_dir = shutil.copytree(trained, tmp_path / "models")
    registry = ModelRegistry.load(model_dir)
    assert not registry.changed_on_disk(model_dir)  # the broken file counts as seen too
    os.utime(model_dir / "sine.safetensors", ns=(1, 1))
    assert registry.changed_on_disk(model_dir)
    registry = ModelRegistry.load(model_dir, previous=registry)
    assert not registry.changed_on_disk(model_dir)
    (model_dir / "broken2.safetensors").write_bytes(b"not yet a whole checkpoint")
    assert registry.changed_on_disk(model_dir)
    registry = ModelRegistry.load(model_dir, previous=registry)
    assert not registry.changed_on_disk(model_dir) and "broken2" in " ".join(registry.errors)  # not again and again
    shutil.rmtree(model_dir / "anil_run")
    assert registry.changed_on_disk(model_dir)
    shutil.rmtree(model_dir)
    assert not registry.changed_on_disk(model_dir)  # a directory gone: nothing to reload


def test_model_poll_reloads_without_a_signal(trained, tmp_path):
    """METALEARN_MODEL_POLL_S: a new version published in the model directory is served within a poll or two;
    a file that does not load triggers one reload, not one per poll."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    model_dir = shutil.copytree(trained, tmp_path / "models")
    app = create_app(Settings(model_dir=str(model_dir), model_poll_s=0.05, workers=1, threads=1))

    def reloads(client) -> float:
        lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith('metalearn_model_reloads_total{outcome="done"}')]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    with TestClient(app) as client:
        versions = {m["name"]: m["version"] for m in client.get("/v1/models").json()["models"]}
        time.sleep(0.3)
        assert reloads(client) == 0  # nothing changed, nothing reloaded
        replace_atomically(trained / "anil_run" / "best.safetensors", model_dir / "conv_maml.safetensors")
        deadline = time.monotonic() + 30
        while client.get("/v1/models/conv_maml").json()["version"] != versions["anil_run"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (tmp_path / "half").write_bytes(b"half a checkpoint")
        os.replace(tmp_path / "half", model_dir / "half.safetensors")  # whole at once: each poll sees one file
        while "half" not in " ".join(client.get("/readyz").json()["skipped"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        settled = reloads(client)
        time.sleep(0.5)  # ten polls
        assert reloads(client) == settled == 2


def test_a_run_directory_without_its_best_checkpoint_is_named_not_served(trained, tmp_path, caplog):
    model_dir = shutil.copytree(trained, tmp_path / "models")
    (model_dir / "anil_run" / "best.safetensors").rename(model_dir / "anil_run" / "last.safetensors")
    with caplog.at_level("INFO", logger="service.registry"):
        registry = ModelRegistry.load(model_dir)
    assert "anil_run" not in registry.names() and "sine" in registry.names()
    assert f"not serving run directory {model_dir / 'anil_run'} yet: it has no best.safetensors" in caplog.text
    shutil.copyfile(model_dir / "anil_run" / "last.safetensors", model_dir / "anil_run" / "best.safetensors")
    assert registry.changed_on_disk(model_dir)
    assert "anil_run" in ModelRegistry.load(model_dir, previous=registry).names()


def test_a_directory_the_service_may_not_enter_is_skipped(trained, tmp_path, caplog, monkeypatch):
    """A volume's lost+found (root's, mode 0700) or a run of another user: a PermissionError looking into it
    once stopped the start (and every reload); now it is skipped, with a warning unless it is lost+found.
    (The tests run as root, who may enter anything: the refusal is simulated.)"""
    import pathlib

    model_dir = shutil.copytree(trained, tmp_path / "models")
    for name in ("lost+found", "locked_run"):
        (model_dir / name).mkdir()
    real_is_file = pathlib.Path.is_file

    def is_file(self, *args, **kwargs):
        if self.parent.name in ("lost+found", "locked_run"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "is_file", is_file)
    with caplog.at_level("WARNING", logger="service.registry"):
        registry = ModelRegistry.load(model_dir)
        assert not registry.changed_on_disk(model_dir)
    assert {"sine", "anil_run"} <= set(registry.names())
    assert f"skipping {model_dir / 'locked_run'}: Permission denied" in caplog.text
    assert "lost+found" not in caplog.text


def test_a_session_of_a_version_no_longer_served_answers_404_where_the_store_keeps_it(tmp_path, monkeypatch):
    """A store that keeps a replaced version's sessions (Redis: their records stay until their TTL) still
    answers 404 for them, saying why; the in-memory store drops them at the reload (forget_models)."""
    from fastapi.testclient import TestClient

    from metalearn import MLP, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint
    from service.app import create_app, reload_models
    from service.sessions import MemorySessionStore
    from service.settings import Settings

    def save(seed):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / "sine.safetensors", MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression")), input_shape=(1,))

    save(0)
    app = create_app(Settings(model_dir=str(tmp_path)))
    with TestClient(app) as client:
        created = client.post("/v1/models/sine/adapt", json={"support": {"x": [[0.5]], "y": [0.25]}})
        assert created.status_code == 201, created.text
        path = f"/v1/sessions/{created.json()['session_id']}"
        monkeypatch.setattr(MemorySessionStore, "forget_models", lambda self, served: 0)  # (kept, as Redis keeps them)
        save(1)
        assert client.portal.call(reload_models, app)["updated"] == ["sine"]
        gone = client.post(path + "/predict", json={"x": [[0.5]]})
        assert gone.status_code == 404 and "is no longer served in that version; adapt again" in gone.json()["detail"]


def test_an_adaptation_that_a_reload_overtakes_leaves_no_session_behind(tmp_path, monkeypatch):
    """An adaptation computing while a reload replaces its model: its session, stored after the reload dropped
    the old version's, could never predict and held its share of the budget until its TTL under an id nobody
    had (a review: 16 of 62 sessions leaked so). It is deleted, and the request answered 503 not-ready, which
    clients retry: the new version answers."""
    from fastapi.testclient import TestClient

    import service.routes.models as model_routes
    from metalearn import MLP, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint
    from service.app import create_app, reload_models
    from service.settings import Settings

    def save(seed):
        torch.manual_seed(seed)
        save_checkpoint(tmp_path / "sine.safetensors", MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression")), input_shape=(1,))

    save(0)
    app = create_app(Settings(model_dir=str(tmp_path)))
    computed = model_routes.compute_unless_client_gone

    async def overtaken(request, engine, job):
        result = await computed(request, engine, job)
        save(1)
        assert (await reload_models(app))["updated"] == ["sine"]
        return result

    body = {"support": {"x": [[0.5]], "y": [0.25]}}
    with TestClient(app) as client:
        monkeypatch.setattr(model_routes, "compute_unless_client_gone", overtaken)
        answer = client.post("/v1/models/sine/adapt", json=body)
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "1", answer.text
        assert answer.json()["type"].endswith("/not-ready") and "a reload replaced model 'sine'" in answer.json()["detail"]
        assert app.state.store.stats().live_sessions == 0
        monkeypatch.setattr(model_routes, "compute_unless_client_gone", computed)
        again = client.post("/v1/models/sine/adapt", json=body)
        assert again.status_code == 201 and again.json()["model_version"] == app.state.registry.get("sine").version
