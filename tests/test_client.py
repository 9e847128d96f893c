"""metalearn.client against a real server: numpy/torch in, numpy out, problems raised as ServiceError; blocking and asyncio."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import torch

from metalearn.adaptation import adapt, predict
from metalearn.checkpoint import load_checkpoint
from metalearn.client import AsyncClient, Client, ClientError, ServiceError, ServiceUnreachable, encode_images, encode_tensor
from test_service_helpers import ServerProcess, image_tasks, make_model_dir, sine_tasks


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir = make_model_dir(tmp_path_factory.mktemp("client_models"))
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("log") / "client.log", api_keys="k1")
    try:
        yield proc.wait_ready(), model_dir
    finally:
        proc.stop()


@pytest.mark.parametrize("encoding", ["base64", "json"])
def test_client_flow_numpy_and_torch(served, encoding):
    server, model_dir = served
    task = image_tasks(tasks=1, queries=2, seed=4)
    sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]
    learner = load_checkpoint(model_dir / "conv_maml.safetensors").learner
    reference = torch.softmax(predict(learner, adapt(learner, sx, sy), qx), -1).numpy()
    with Client(server.url, api_key="k1", encoding=encoding) as client:
        assert {m["name"] for m in client.models()} == {"anil_run", "conv_maml", "sine"}
        session = client.adapt("conv_maml", sx.numpy(), sy.numpy())  # numpy in
        labels = session.predict(qx)  # torch in
        assert isinstance(labels, np.ndarray) and labels.tolist() == reference.argmax(-1).tolist()
        np.testing.assert_allclose(session.probabilities, reference, atol=1e-5)
        assert session.describe()["model"] == "conv_maml"
        out = client.predict("conv_maml", sx, sy, qx)
        np.testing.assert_allclose(out.probabilities, reference, atol=1e-5)
        session.delete()
        with pytest.raises(ServiceError) as error:
            session.predict(qx)
        assert error.value.status == 404 and error.value.problem["title"] == "Unknown session"
        with client.adapt("conv_maml", sx, sy) as scoped:  # deleted on leaving the block
            assert scoped.predict(qx).tolist() == reference.argmax(-1).tolist()
        with pytest.raises(ServiceError) as error:
            scoped.describe()
        assert error.value.status == 404
        with client.adapt("conv_maml", sx, sy) as scoped:
            scoped.delete()  # gone already: leaving the block is fine


def test_client_regression_and_errors(served):
    server, model_dir = served
    task = sine_tasks(tasks=1, seed=2)
    sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]
    learner = load_checkpoint(model_dir / "sine.safetensors").learner
    reference = predict(learner, adapt(learner, sx, sy), qx).squeeze(1).numpy()
    with Client(server.url, api_key="k1") as client:
        values = client.adapt("sine", sx, sy.numpy().astype(np.float64)).predict(qx.numpy())
        np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-5)
        # numpy and torch scalars for the numbers, as an application computing them would pass them
        three = predict(learner, adapt(learner, sx, sy, steps=3, lr=0.02), qx).squeeze(1).numpy()
        session = client.adapt("sine", sx, sy, inner_steps=np.int64(3), inner_lr=np.float32(0.02), ttl_s=torch.tensor(60))
        assert (session.info["inner_steps"], session.info["ttl_s"]) == (3, 60)
        np.testing.assert_allclose(session.predict(qx), three, rtol=1e-5, atol=1e-5)
        with pytest.raises(ServiceError) as error:
            client.adapt("sine", sx, sy, inner_steps=np.float64(2.5))
        assert error.value.status == 422 and "inner_steps" in error.value.detail
        with pytest.raises(ServiceError) as error:
            client.adapt("sine", np.zeros((3, 2)), np.zeros(3))
        assert error.value.status == 422 and "shape" in error.value.detail
        with pytest.raises(ServiceError) as error:
            client.adapt("nope", sx, sy)
        assert error.value.status == 404
        assert len(error.value.request_id) == 24 and error.value.request_id not in str(error.value)  # quoted for 5xx only
    with Client(server.url) as anonymous, pytest.raises(ServiceError) as error:
        anonymous.models()
    assert error.value.status == 401


@pytest.mark.parametrize("status", [503, 429])  # (429: the proxy's rate limit, deploy/nginx.conf)
def test_client_retries_503_and_429_after_retry_after(status):
    import httpx

    answers = [httpx.Response(status, headers={"Retry-After": "0"}, json={"title": "Service busy", "detail": "queue full", "status": status})] * 2
    answers.append(httpx.Response(200, json={"status": "ok"}))
    calls = []

    def handler(request):
        calls.append(request.url.path)
        return answers[len(calls) - 1]

    with Client("http://service", transport=httpx.MockTransport(handler)) as client:
        assert client.health() == {"status": "ok"} and len(calls) == 3
    calls.clear()
    with Client("http://service", retries=1, transport=httpx.MockTransport(handler)) as client, pytest.raises(ServiceError) as error:
        client.health()
    assert len(calls) == 2 and error.value.status == status and error.value.retry_after == "0" and error.value.detail == "queue full"


def test_client_errors_quote_the_request_id_of_a_server_error():
    import httpx

    def handler(request):
        return httpx.Response(500, headers={"X-Request-ID": "4f2a"}, json={"title": "Internal error", "detail": "unexpected KeyError", "status": 500})

    with Client("http://service", transport=httpx.MockTransport(handler)) as client, pytest.raises(ServiceError) as error:
        client.models()
    assert error.value.request_id == "4f2a" and str(error.value) == "500 Internal error: unexpected KeyError (request id 4f2a)"


def test_async_client_flow_with_concurrent_calls(served):
    """AsyncClient: the same answers as the offline computation, calls awaited side by side on one connection pool."""
    server, model_dir = served
    tasks = image_tasks(tasks=3, queries=2, seed=6)
    learner = load_checkpoint(model_dir / "conv_maml.safetensors").learner
    references = [torch.softmax(predict(learner, adapt(learner, tasks.support_x[i], tasks.support_y[i]), tasks.query_x[i]), -1).numpy() for i in range(3)]

    async def flow():
        async with AsyncClient(server.url, api_key="k1") as client:
            assert {m["name"] for m in await client.models()} >= {"conv_maml"}
            sessions = await asyncio.gather(*(client.adapt("conv_maml", tasks.support_x[i], tasks.support_y[i].numpy()) for i in range(3)))
            labels = await asyncio.gather(*(s.predict(tasks.query_x[i]) for i, s in enumerate(sessions)))
            stateless = await client.predict("conv_maml", tasks.support_x[0], tasks.support_y[0], tasks.query_x[0])
            described = await sessions[1].describe()
            await sessions[2].delete()
            with pytest.raises(ServiceError) as gone:
                await sessions[2].predict(tasks.query_x[2])
            async with await client.adapt("conv_maml", tasks.support_x[0], tasks.support_y[0]) as scoped:
                await scoped.predict(tasks.query_x[0])
            with pytest.raises(ServiceError) as scoped_gone:
                await scoped.describe()
            assert scoped_gone.value.status == 404
            return sessions, labels, stateless, described, gone.value

    sessions, labels, stateless, described, gone = asyncio.run(flow())
    for session, label, reference in zip(sessions, labels, references):
        assert isinstance(label, np.ndarray) and label.tolist() == reference.argmax(-1).tolist()
        np.testing.assert_allclose(session.probabilities, reference, atol=1e-5)
    np.testing.assert_allclose(stateless.probabilities, references[0], atol=1e-5)
    assert described["session_id"] == sessions[1].id and described["model"] == "conv_maml"
    assert gone.status == 404 and gone.problem["title"] == "Unknown session" and len(gone.request_id) == 24


def test_async_client_retries_503_after_retry_after():
    import httpx

    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) <= 2:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"title": "Service busy", "detail": "queue full", "status": 503})
        return httpx.Response(200, json={"models": [{"name": "m"}]})

    async def call(retries):
        async with AsyncClient("http://service", retries=retries, transport=httpx.MockTransport(handler)) as client:
            return await client.models()

    assert asyncio.run(call(retries=2)) == [{"name": "m"}] and len(calls) == 3
    calls.clear()
    with pytest.raises(ServiceError) as error:
        asyncio.run(call(retries=1))
    assert len(calls) == 2 and error.value.status == 503 and error.value.retry_after == "0"


def test_model_names_are_quoted_in_the_path():
    """A model is named after its file, which may hold '#', '?', '%' or spaces: unquoted, 'a#b' asked for model 'a'."""
    import httpx

    paths = []

    def handler(request):
        paths.append(request.url.raw_path.decode())
        if request.url.path.endswith("/adapt"):
            return httpx.Response(201, json={"session_id": "s", "model": "m"})
        if request.url.path.endswith("/predict"):
            return httpx.Response(200, json={"model": "m", "predictions": [0]})
        return httpx.Response(200, json={"name": "m"})

    name, x, y = "a#b? c%", np.zeros((1, 1), np.float32), np.zeros(1, np.int64)
    with Client("http://service", transport=httpx.MockTransport(handler)) as client:
        client.model(name)
        client.adapt(name, x, y)
        client.predict(name, x, y, x)

    async def calls():
        async with AsyncClient("http://service", transport=httpx.MockTransport(handler)) as client:
            await client.model(name)
            await client.adapt(name, x, y)
            await client.predict(name, x, y, x)

    asyncio.run(calls())
    quoted = "/v1/models/a%23b%3F%20c%25"
    assert paths == [quoted, quoted + "/adapt", quoted + "/predict"] * 2


def test_client_errors_pickle_name_their_type_and_cover_a_service_that_does_not_answer():
    """ServiceError crosses a process pool as itself and carries ``code``; a refused connection is retried, then
    raised as ServiceUnreachable; both are ClientError."""
    import pickle
    import socket

    import httpx

    from metalearn.client import ClientError, ServiceUnreachable

    def handler(request):
        problem = {"type": "https://metalearn.dev/problems/unknown-session", "title": "Unknown session", "status": 404, "detail": "no such session"}
        return httpx.Response(404, headers={"X-Request-ID": "9c1d"}, json=problem)

    with Client("http://service", transport=httpx.MockTransport(handler)) as client, pytest.raises(ServiceError) as error:
        client.session("abc").predict([[0.5]])
    copy = pickle.loads(pickle.dumps(error.value))
    assert isinstance(copy, ClientError) and (copy.status, copy.code, copy.request_id, str(copy)) == (404, "unknown-session", "9c1d", str(error.value))
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.perf_counter()
    with Client(f"http://127.0.0.1:{port}", retries=1, max_retry_wait=0.2) as client, pytest.raises(ServiceUnreachable, match="cannot be reached") as down:
        client.health()
    assert isinstance(down.value, ClientError) and isinstance(down.value.__cause__, httpx.ConnectError)
    assert 0.1 <= time.perf_counter() - started < 5  # one retry after 0.1-0.2 s


def test_a_tls_handshake_refused_is_said_so_and_not_retried():
    """https:// to a plain-HTTP server (as an untrusted certificate) fails in the TLS handshake: trying again
    mends nothing, so the client raises at once and says what to check, instead of waiting out its retries."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.perf_counter()
        with Client(f"https://127.0.0.1:{server.server_port}", retries=2, max_retry_wait=5) as client:
            with pytest.raises(ServiceUnreachable, match="refused the TLS handshake: is it served over https"):
                client.health()
        assert time.perf_counter() - started < 1.0  # (a retry waits 0.5-1 s, then 1-2 s)
    finally:
        server.shutdown()
        server.server_close()


def test_client_quotes_session_ids_and_refuses_what_it_would_misread():
    import httpx

    paths = []

    def handler(request):
        paths.append(request.url.raw_path.decode())
        return httpx.Response(200, json={"session_id": "x", "model": "m", "predictions": [0], "probabilities": [[1.0, 0.0]]})

    with Client("http://service", transport=httpx.MockTransport(handler)) as client:
        client.session("../models/m").describe()
        client.session("a#b").predict([[0.5]])
        assert paths == ["/v1/sessions/..%2Fmodels%2Fm", "/v1/sessions/a%23b/predict"]  # (not /v1/models/m, not session a)
        with pytest.raises(TypeError, match="array of bool: send labels as class indices"):
            client.adapt("m", np.zeros((2, 1)), np.array([True, False]))
        with pytest.raises(TypeError, match="complex"):
            client.adapt("m", np.zeros((2, 1), np.complex64), [0, 1])
        with pytest.raises(ValueError, match="label 18446744073709551615 is beyond any class index"):  # (not wrapped to -1)
            client.adapt("m", np.zeros((2, 1)), np.array([0, 2**64 - 1], np.uint64))
        assert client._y(np.array([0, 3], np.uint64)) == encode_tensor(np.array([0, 3]), "base64", np.int64)
        bf16 = client._x(torch.ones(2, 3, dtype=torch.bfloat16))  # (numpy has no bfloat16: sent as float32)
        assert bf16["dtype"] == "float32" and bf16["shape"] == [2, 3]
    with pytest.raises(ValueError, match="encoding must be 'base64' or 'json'"):
        Client("http://service", encoding="jsn")


def test_client_retry_waits_follow_retry_after_dates_with_jitter():
    import email.utils

    import httpx

    client = Client("http://service", retries=3, max_retry_wait=30)
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    waits = [client._retry_wait(httpx.Response(503, headers={"Retry-After": value}), 0) for value in ("4", in_ten) for _ in range(50)]
    assert all(2.0 <= w <= 4.0 for w in waits[:50]) and len({round(w, 3) for w in waits[:50]}) > 10  # (drawn, not lockstep)
    assert all(3.5 <= w <= 10.0 for w in waits[50:])  # an HTTP date: about 10 s from now, halved at most
    assert client._retry_wait(httpx.Response(500), 0) is None and client._retry_wait(httpx.Response(503), 3) is None
    client.close()


@pytest.fixture(scope="module")
def limited(served, tmp_path_factory):
    """The same models behind small limits: 16 queries a request, 40 kB a body (about 8 of the 28x28 images)."""
    _, model_dir = served
    proc = ServerProcess(model_dir, tmp_path_factory.mktemp("log") / "limited.log", api_keys="k1", max_query=16, max_body_bytes=40_000)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_client_sends_a_query_set_over_the_limits_in_parts(served, limited):
    """Refused whole (413 for its bytes, 422 for its count), a query set goes in parts that fit, and the joined
    answer is the offline computation's; not with transductive statistics, which need the whole batch."""
    _, model_dir = served
    task = image_tasks(tasks=1, queries=3, seed=8)
    sx, sy, qx = task.support_x[0], task.support_y[0], task.query_x[0]  # 15 images: over 40 kB as base64
    learner = load_checkpoint(model_dir / "conv_maml.safetensors").learner
    reference = torch.softmax(predict(learner, adapt(learner, sx, sy), qx), -1).numpy()
    sine = sine_tasks(tasks=1, queries=40, seed=3)
    sine_learner = load_checkpoint(model_dir / "sine.safetensors").learner
    sine_reference = predict(sine_learner, adapt(sine_learner, sine.support_x[0], sine.support_y[0]), sine.query_x[0]).squeeze(1).numpy()
    with Client(limited.url, api_key="k1") as client:
        session = client.adapt("conv_maml", sx, sy)
        with pytest.raises(ServiceError) as whole:
            client._request("POST", session.path + "/predict", {"x": client._x(qx)})
        assert whole.value.status == 413
        answer = session.predict_full(qx)
        assert answer.raw["requests"] > 1 and answer.predictions.tolist() == reference.argmax(-1).tolist()
        np.testing.assert_allclose(answer.probabilities, reference, atol=1e-5)
        assert len(answer.raw["probabilities"]) == 15 and answer.raw["model"] == "conv_maml"
        with pytest.warns(RuntimeWarning, match="adapting again"):
            stateless = client.predict("conv_maml", sx, sy, qx)  # the support set shares each part's body
        assert stateless.raw["requests"] > answer.raw["requests"]
        np.testing.assert_allclose(stateless.probabilities, reference, atol=1e-5)
        with pytest.raises(ServiceError) as refused:
            session.predict(qx, transductive=True)
        assert refused.value.code == "request-body-too-large"

        values = client.adapt("sine", sine.support_x[0], sine.support_y[0]).predict_full(sine.query_x[0])  # 40 > 16
        assert values.raw["requests"] == 3
        np.testing.assert_allclose(values.predictions, sine_reference, rtol=1e-5, atol=1e-5)

    async def main():
        async with AsyncClient(limited.url, api_key="k1") as client:
            session = await client.adapt("conv_maml", sx, sy)
            with pytest.warns(RuntimeWarning, match="adapting again"):
                return await session.predict_full(qx), await client.predict("conv_maml", sx, sy, qx)

    for answer in asyncio.run(main()):
        assert answer.raw["requests"] > 1
        np.testing.assert_allclose(answer.probabilities, reference, atol=1e-5)


def _fits(body: dict, count: int, limits: dict) -> bool:
    """Whether the service would take ``body`` of ``count`` queries as httpx sends it (compact JSON)."""
    text = json.dumps(body, separators=(",", ":"))
    return (count <= limits["max_query"] and len(text.encode()) <= limits["max_body_bytes"] and text.count(",") + 1 <= limits["max_list_values"]
            and text.count("[") <= limits["max_list_values"] // 16)


@pytest.mark.parametrize("encoding, binding, shape", [
    ("base64", "max_query", (1, 4, 4)), ("base64", "max_body_bytes", (1, 4, 4)), ("json", "max_query", (1, 4, 4)),
    ("json", "max_body_bytes", (1, 4, 4)), ("json", "max_list_values", (1, 4, 4)),  # (the lists bind: 6 a row of 16 values)
    ("json", "max_list_values", (64,)),  # (the values bind)
])
def test_query_parts_fit_every_limit_and_are_not_much_smaller(encoding, binding, shape):
    """Each part's request fits every limit the service counts, whichever binds, and holds at least 80% of the
    most that would fit; pictures of different sizes, each counted at its own size."""
    client = Client("http://service", encoding=encoding)
    x = np.random.default_rng(0).random((60, *shape))
    support = (np.zeros((5, *shape)), np.arange(5))
    limits = {"max_query": 1000, "max_body_bytes": 10**9, "max_list_values": 10**9}
    limits[binding] = {"max_query": 7, "max_body_bytes": 4000 if encoding == "json" else 1500, "max_list_values": 1024}[binding]

    def body_for(part):
        return client._predict_body(*support, part, None, None, False)

    assert not _fits(body_for(x), len(x), limits)
    parts = client._query_parts(x, limits, body_for)
    np.testing.assert_array_equal(np.concatenate(parts), x)
    most = max(k for k in range(1, 61) if _fits(body_for(x[:k]), k, limits))
    assert all(len(part) <= most and _fits(body_for(part), len(part), limits) for part in parts)
    assert len(parts[0]) >= 0.8 * most and len(parts) > 1
    assert client._query_parts(x[:len(parts[0])], limits, body_for) is None  # fits whole: the refusal was something else

    pictures = [bytes(range(256)) * n for n in (1, 5, 2, 5, 1, 3, 4, 1, 2, 5)]  # (the client sends bytes as they are)
    tight = {"max_query": 100, "max_body_bytes": 6000, "max_list_values": 10**9}
    parts = client._query_parts(pictures, tight, lambda part: {"x": client._x(part)})
    assert sum(parts, []) == pictures and len(parts) > 1 and all(_fits({"x": client._x(part)}, len(part), tight) for part in parts)
    assert client._query_parts(pictures, {**tight, "max_body_bytes": 1500}, lambda part: {"x": client._x(part)}) is None  # none fits


def test_a_refusal_stands_when_the_limits_cannot_be_read():
    """The client asks for the limits only to cut a refused query set; if that fails, the refusal is raised."""
    import httpx

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(500, json={"title": "Internal error", "detail": "boom", "status": 500})
        return httpx.Response(422, json={"type": "https://metalearn.dev/problems/too-many-examples", "title": "Too many examples",
                                         "detail": "x: 40 examples, the limit is 16", "status": 422})

    with Client("http://service", transport=httpx.MockTransport(handler)) as client, pytest.raises(ServiceError) as error:
        client.session("s").predict(np.zeros((40, 1)))
    assert error.value.code == "too-many-examples" and error.value.__suppress_context__


def test_client_settings_are_checked_and_a_bad_key_is_never_quoted():
    import httpx

    for bad in (dict(base_url="127.0.0.1:8000"), dict(retries=-1), dict(retries=1.5), dict(timeout=0)):
        with pytest.raises(ValueError):
            Client(**{"base_url": "http://service", **bad})
    with pytest.raises(ValueError) as refused:
        Client("http://service", api_key="cl\u00e9-secret")
    assert "secret" not in str(refused.value) and "header" in str(refused.value)
    seen = []

    def handler(request):
        seen.append(request.headers["Authorization"])
        return httpx.Response(200, json={"status": "ok"})

    with Client("http://service", api_key="key-1\n", transport=httpx.MockTransport(handler)) as client:  # (read from a file)
        client.health()
    assert seen == ["Bearer key-1"]


def test_leaving_a_session_block_keeps_the_block_s_own_exception():
    """The session's deletion on leaving a ``with`` block fails (the service went away): with an exception of the
    block in flight, that exception is the one raised; without, the deletion's failure is."""
    import httpx

    def handler(request):
        if request.method == "DELETE":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(201, json={"session_id": "s1", "model": "m"})

    with Client("http://service", retries=0, transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(KeyError, match="the application's"):
            with client.adapt("m", np.zeros((2, 3)), [0, 1]):
                raise KeyError("the application's own error")
        with pytest.raises(ServiceUnreachable):
            with client.adapt("m", np.zeros((2, 3)), [0, 1]):
                pass

    async def leave_async():
        async with AsyncClient("http://service", retries=0, transport=httpx.MockTransport(handler)) as client:
            async with await client.adapt("m", np.zeros((2, 3)), [0, 1]):
                raise KeyError("the application's own error")

    with pytest.raises(KeyError, match="the application's"):
        asyncio.run(leave_async())


def test_client_tells_a_lost_connection_a_foreign_answer_and_a_closed_client_apart():
    import httpx

    def lost(request):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)

    with Client("http://service", transport=httpx.MockTransport(lost)) as client, pytest.raises(ServiceUnreachable) as error:
        client.adapt("m", np.zeros((2, 3)), [0, 1])
    assert "may have been carried out" in str(error.value)

    def foreign(request):
        return httpx.Response(200, json={"hello": "world"})

    with Client("http://service", transport=httpx.MockTransport(foreign)) as client:
        for call in (lambda: client.adapt("m", np.zeros((2, 3)), [0, 1]), client.models, client.limits,
                     lambda: client.session("s1").predict(np.zeros((1, 3))), lambda: client.model("m"),
                     lambda: client.session("s1").describe(), client.health):
            with pytest.raises(ServiceError, match="Not the service's answer"):
                call()
    with pytest.raises(ClientError, match="closed"):
        client.health()


@pytest.mark.parametrize("answer", ["predictions null", "ragged predictions", "a number for a session id", "a redirect",
                                    "a body that does not decode"])
def test_answers_that_are_not_the_service_s_are_said_so(answer):
    """A review fed the client answers from something other than the service: a prediction of None came back
    as an array of None, ragged ones and a numeric session id raised numpy's and urllib's errors, a redirect
    was taken for a deletion done, and a body that does not decode raised httpx's own DecodingError."""
    import httpx

    answers = {
        "predictions null": httpx.Response(200, json={"predictions": None}),
        "ragged predictions": httpx.Response(200, json={"predictions": [[1], [1, 2]]}),
        "a number for a session id": httpx.Response(201, json={"session_id": 12345}),
        "a redirect": httpx.Response(307, headers={"Location": "http://elsewhere/"}),
        "a body that does not decode": httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")),
    }
    calls = {
        "predictions null": lambda client: client.session("s1").predict(np.zeros((1, 3))),
        "ragged predictions": lambda client: client.session("s1").predict(np.zeros((2, 3))),
        "a number for a session id": lambda client: client.adapt("m", np.zeros((2, 3)), [0, 1]),
        "a redirect": lambda client: client.session("s1").delete(),
        "a body that does not decode": lambda client: client.health(),
    }
    with Client("http://service", transport=httpx.MockTransport(lambda request: answers[answer])) as client:
        with pytest.raises(ServiceError, match="Not the service's answer"):
            calls[answer](client)


def test_timeout_bounds_the_whole_answer_and_a_timed_out_request_is_not_sent_again():
    """``timeout`` was httpx's, a bound on each read: an answer trickling in (a broken proxy or link) held the
    caller for as long as it trickled. And a 503 timed-out was retried like a full queue's: the request, which may
    still be computing in the service, was sent three times and its caller told after three timeouts."""
    import httpx

    class Trickle(httpx.SyncByteStream):
        def __iter__(self):
            for _ in range(40):
                time.sleep(0.05)
                yield b" "
            yield b'{"status": "ok"}'

    def trickling(request):
        return httpx.Response(200, headers={"Content-Type": "application/json"}, stream=Trickle())

    started = time.monotonic()
    with Client("http://service", timeout=0.5, transport=httpx.MockTransport(trickling)) as client, pytest.raises(ServiceUnreachable, match="in time"):
        client.health()
    assert time.monotonic() - started < 1.5

    class Late(httpx.SyncByteStream):
        def __iter__(self):
            yield b'{"status": '
            time.sleep(0.7)
            yield b'"ok"}'

    def late(request):  # (complete as its last bytes come, just past the deadline: kept)
        return httpx.Response(200, headers={"Content-Type": "application/json", "Content-Length": "16"}, stream=Late())

    with Client("http://service", timeout=0.5, transport=httpx.MockTransport(late)) as client:
        assert client.health() == {"status": "ok"}

    class AsyncTrickle(httpx.AsyncByteStream):
        async def __aiter__(self):
            for _ in range(40):
                await asyncio.sleep(0.05)
                yield b" "

    async def async_trickle():
        transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=AsyncTrickle()))
        async with AsyncClient("http://service", timeout=0.5, transport=transport) as client:
            await client.health()

    started = time.monotonic()
    with pytest.raises(ServiceUnreachable, match="in time"):
        asyncio.run(async_trickle())
    assert time.monotonic() - started < 1.5
    sent = []

    def timed_out(request):
        sent.append(request)
        return httpx.Response(503, headers={"Retry-After": "0"}, json={"type": "https://metalearn.dev/problems/timed-out", "title": "Timed out",
                                                                         "status": 503, "detail": "the request did not finish within 30 s"})

    with Client("http://service", transport=httpx.MockTransport(timed_out)) as client, pytest.raises(ServiceError) as error:
        client.adapt("m", np.zeros((2, 3)), [0, 1])
    assert error.value.code == "timed-out" and len(sent) == 1


def test_what_json_cannot_carry_and_single_numbers_are_refused_by_the_client():
    """NaN in x with encoding="json", a NaN inner_lr or an array for one raised json's own ValueError or TypeError
    (base64 takes NaN to the service, which answers non-finite-values); a 0-d x went as shape [1]; one PIL
    picture went as its pixels; a problem with a null title read "422 None"."""
    import httpx
    from PIL import Image

    bodies = []

    def answer(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(422, json={"type": 5, "title": None, "detail": {"a": 1}})

    with Client("http://service", encoding="json", transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(ValueError, match="JSON cannot carry"):
            client.adapt("m", np.array([[0.5], [np.nan]]), [0.0, 1.0])
        with pytest.raises(ValueError, match="inner_lr must be a finite number"):
            client.adapt("m", np.zeros((2, 1)), [0.0, 1.0], inner_lr=float("nan"))
        with pytest.raises(TypeError, match="inner_lr must be a number"):
            client.adapt("m", np.zeros((2, 1)), [0.0, 1.0], inner_lr=np.array([0.1]))
        with pytest.raises(ValueError, match="x is a single number"):
            client.session("s1").predict(np.float32(1.0))
        assert not bodies
        with pytest.raises(ServiceError, match=r'^422 Unprocessable Entity: \{"a": 1\}$') as error:
            client.session("s1").predict(Image.new("L", (4, 4)))
    assert error.value.code is None and list(bodies[0]["x"]) == ["images"] and len(bodies[0]["x"]["images"]) == 1


def test_regression_predictions_are_float32_and_handles_refuse_pickling():
    import pickle

    import httpx

    def handler(request):
        return httpx.Response(200, json={"predictions": [0.5, 1.25]})

    with Client("http://service", transport=httpx.MockTransport(handler)) as client:
        session = client.session("s1", "sine")
        assert session.predict(np.zeros((2, 1))).dtype == np.float32
        for thing in (client, session):
            with pytest.raises(TypeError, match="cannot be pickled"):
                pickle.dumps(thing)


def test_pictures_as_data_urls_go_as_they_are_and_a_path_must_be_a_regular_file(tmp_path):
    import os

    url = "data:image/png;base64,iVBORw0KGgo="
    assert encode_images([url]) == {"images": [url]}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        encode_images([str(fifo)])


def test_a_pil_picture_goes_as_the_training_loader_reads_its_file():
    """A PIL image was sent as a PNG of its pixels: without its EXIF orientation, which the training loader
    applies to the file (a phone photo went sideways: probabilities 0.96 against 0.88), and not at all for the
    modes PNG does not hold (CMYK, 32-bit integer: "cannot write mode CMYK as PNG"). Each now goes as the
    training loader reads the file it came from."""
    import base64
    import io

    from PIL import Image

    from metalearn.data.preprocess import image_preprocessing, preprocess_images

    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :, 0], pixels[:, :16, 1] = 255, 200
    files = []
    for orientation in (3, 6, 8):
        exif, buffer = Image.Exif(), io.BytesIO()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(buffer, "JPEG", quality=92, exif=exif)
        files.append(buffer.getvalue())
    for picture in (Image.fromarray(pixels).convert("CMYK"), Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 10).astype(np.int32))):
        buffer = io.BytesIO()
        picture.save(buffer, "JPEG" if picture.mode == "CMYK" else "TIFF")
        files.append(buffer.getvalue())
    sent = [base64.b64decode(text) for text in encode_images([Image.open(io.BytesIO(data)) for data in files])["images"]]
    for grayscale in (True, False):
        preprocessing = image_preprocessing(28, grayscale=grayscale)
        torch.testing.assert_close(preprocess_images(sent, preprocessing), preprocess_images(files, preprocessing), rtol=0, atol=0)
