"""The API as a client generator and a non-Python client see it: /openapi.json's named schemas, problem
types, bounds and headers; the wire forms' leniencies and refusals (booleans, base64 variants,
compressed bodies, methods)."""

from __future__ import annotations

import ast
import base64
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.problems import PROBLEM_TYPES, Problem, _STATUS_TITLES, problem_type
from service.settings import Settings
from service.tensors import EncodedTensor, decode_inputs, decode_labels, decode_targets

ROOT = Path(__file__).resolve().parents[1]


def raised_titles() -> set[tuple[int | None, str]]:
    """(status, title) of every problem the service's code raises: ``Problem(status, "Title", ...)`` and
    ``invalid(..., title="Title")`` (422) calls with literal titles."""
    found = set()
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name == "Problem" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                status = node.args[0].value if isinstance(node.args[0], ast.Constant) else None
                found.add((status, node.args[1].value))
            elif name == "invalid":
                title = next((k.value.value for k in node.keywords if k.arg == "title" and isinstance(k.value, ast.Constant)), "Invalid tensor")
                found.add((422, title))
    return found


def test_every_problem_raised_is_catalogued_and_documented():
    titles = raised_titles()
    assert len(titles) >= 15, titles  # the scan finds the calls
    readme = (ROOT / "README.md").read_text()
    for status, title in titles | set(_STATUS_TITLES.items()):
        assert title in PROBLEM_TYPES, f"{title!r} is raised but not in service.problems.PROBLEM_TYPES"
        if status is not None:
            assert PROBLEM_TYPES[title][0] == status, (title, status)
    for title in PROBLEM_TYPES:
        slug = problem_type(title).rsplit("/", 1)[-1]
        assert f"`{slug}`" in readme, f"the README's list of problem types lacks {slug}"
    assert Problem(422, "Wrong tensor shape", "x").type.endswith("/wrong-tensor-shape")


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from service.app import create_app

    settings = Settings(model_dir=str(tmp_path_factory.mktemp("models")), max_inner_steps=40, max_session_ttl_s=7200)
    with TestClient(create_app(settings)) as client:
        yield client


def test_openapi_names_what_generators_need(app_client):
    doc = app_client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    operations = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert {op["operationId"] for op in operations.values()} >= {"adapt_model", "predict_stateless", "predict_session", "describe_session", "delete_session", "list_models", "describe_model", "healthz", "readyz"}
    problem_types = schemas["Problem"]["properties"]["type"]["description"]
    for title in PROBLEM_TYPES:
        assert problem_type(title) in problem_types
    for (path, method), op in operations.items():
        assert "security" in op, (path, method)
        for status, response in op["responses"].items():
            if status.startswith(("4", "5")):
                assert response["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}, (path, status)
            if status == "503":
                assert "Retry-After" in response["headers"], path
    adapt = operations[("/v1/models/{name}/adapt", "post")]
    assert "Location" in adapt["responses"]["201"]["headers"]
    assert "WWW-Authenticate" in adapt["responses"]["401"]["headers"]
    for request in ("Support", "Query", "SessionPredictRequest"):
        assert schemas[request]["properties"]["x"]["$ref"] == "#/components/schemas/Tensor"
    assert schemas["Support"]["properties"]["y"]["$ref"] == "#/components/schemas/Labels"
    assert "EncodedTensor" in str(schemas["Tensor"]) and "ImageList" in str(schemas["Tensor"])
    assert schemas["PredictResponse"]["properties"]["predictions"]["items"] != {}
    steps = schemas["AdaptRequest"]["properties"]["inner_steps"]["anyOf"][0]
    assert (steps["minimum"], steps["maximum"]) == (0, 40)  # the settings' limits
    ttl = schemas["AdaptRequest"]["properties"]["ttl_s"]["anyOf"][0]
    assert (ttl["minimum"], ttl["maximum"]) == (1, 7200)
    # What generators turn into usable types: no schema that refers to itself (openapi-typescript wrote one as a
    # type TypeScript refuses, and every tensor became `any`), the problem types as an enum, request fields
    # without a default (typed as always present), each operation's own error statuses.
    assert "NestedNumbers" not in str(schemas["NestedNumbers"]["anyOf"])
    assert [str(branch).count("array") for branch in schemas["NestedNumbers"]["anyOf"]] == list(range(1, 9))
    assert set(schemas["Problem"]["properties"]["type"]["enum"]) == {problem_type(t) for t in PROBLEM_TYPES} | {problem_type("Too many requests")}
    for request in ("AdaptRequest", "PredictRequest", "SessionPredictRequest"):
        assert not any("default" in field for field in schemas[request]["properties"].values()), request
    for (path, method), op in operations.items():
        if path.startswith("/v1"):
            assert ("422" in op["responses"]) == ("requestBody" in op) and "500" in op["responses"], (path, method)
            assert ("408" in op["responses"]) == ("413" in op["responses"]) == ("requestBody" in op), (path, method)
    assert operations[("/v1/sessions/{session_id}/predict", "post")]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/SessionPredictResponse")
    assert set(schemas["SessionMeta"]["properties"]) >= {"model_version", "inner_steps", "inner_lr", "support_size"}
    assert schemas["SessionInfo"]["properties"]["expires_at"]["format"] == "date-time"
    assert {"accepts_images", "preprocessing", "output_size", "training"} <= set(schemas["ModelInfo"]["properties"])
    assert schemas["ModelInfo"].get("additionalProperties") is False
    assert "limits" in schemas["ModelList"]["properties"]


@pytest.fixture(scope="module")
def trained_app(tmp_path_factory):
    from metalearn import MLP, MetaConfig, MetaLearner
    from metalearn.checkpoint import save_checkpoint
    from service.app import create_app

    directory = tmp_path_factory.mktemp("models")
    learner = MetaLearner(MLP(1, (8,), 1), MetaConfig("maml", task_type="regression"))
    training = {"config": {"out": "/home/trainer/runs/sine", "task": "/data/private/waves.npz"}, "iterations_done": 1,
                "data": {"examples": 40, "classes": {"train": ["acme-secret-sku-1", "sku-2"], "val": ["sku-3"]}}}
    save_checkpoint(directory / "sine.safetensors", learner, input_shape=(1,), training=training)
    with TestClient(create_app(Settings(model_dir=str(directory)))) as client:
        yield client


def test_model_names_are_examples_not_an_enum(trained_app):
    doc = trained_app.get("/openapi.json").json()
    parameter = next(p for p in doc["paths"]["/v1/models/{name}/adapt"]["post"]["parameters"] if p["name"] == "name")
    assert "enum" not in parameter["schema"] and parameter["example"] == "sine"
    listing = trained_app.get("/v1/models").json()
    assert listing["limits"]["max_inner_steps"] == 100 and listing["limits"]["max_support"] == 512
    info = trained_app.get("/v1/models/sine").json()
    assert info["training"]["config"] == {"task": "waves.npz"}  # not the trainer machine's paths
    assert info["training"]["data"] == {"examples": 40, "classes": {"train": 2, "val": 1}}  # counts, not the names


def test_methods_and_encodings_a_route_refuses_are_named(app_client):
    answer = app_client.put("/v1/sessions/abc")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, HEAD, DELETE", answer.headers
    assert "allowed: GET, HEAD, DELETE" in answer.json()["detail"]
    assert app_client.post("/v1/models").headers["allow"] == "GET, HEAD"
    assert app_client.post("/static/swagger-ui.css").headers["allow"] == "GET, HEAD"  # a mount matches any method: not asked
    gzipped = app_client.post("/v1/models/any/predict", content=b"\x1f\x8b\x08", headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert gzipped.status_code == 415 and "Content-Encoding 'gzip'" in gzipped.json()["detail"], gzipped.text
    assert gzipped.headers["content-type"] == "application/problem+json"
    # JSON is UTF-8 (RFC 8259): another charset is refused as such (it was read as malformed JSON), a byte order mark ignored
    utf16 = app_client.post("/v1/models/any/predict", content="{}".encode("utf-16"), headers={"Content-Type": "application/json; charset=utf-16"})
    assert utf16.status_code == 415 and "application/json in UTF-8" in utf16.json()["detail"]
    marked = app_client.post("/v1/models/any/predict", content=b"\xef\xbb\xbf{}", headers={"Content-Type": "application/json; charset=UTF-8"})
    assert marked.status_code == 422 and marked.json()["detail"] == "support: Field required; query: Field required", marked.text


def encoded(array: np.ndarray, encode=base64.b64encode) -> EncodedTensor:
    return EncodedTensor(dtype="float32", shape=list(array.shape), base64=encode(array.astype(np.float32).tobytes()).decode())


def test_base64_as_other_languages_write_it():
    array = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    for encode in (base64.b64encode, base64.urlsafe_b64encode, base64.encodebytes, lambda b: base64.b64encode(b).rstrip(b"=")):
        assert np.array_equal(decode_inputs(encoded(array, encode), "x", (2,), None, 10).numpy(), array)
    bad = EncodedTensor(dtype="float32", shape=[1, 1], base64="AA*A")
    with pytest.raises(Problem, match=r"x: malformed base64 data: character '\*' at position 2"):
        decode_inputs(bad, "x", (1,), None, 10)


def test_booleans_are_not_labels_or_targets():
    with pytest.raises(Problem, match="support.y: true/false is not a class index"):
        decode_labels([False, True, 2], "support.y", 3, 3)
    with pytest.raises(Problem, match="support.y: true/false is not a target"):
        decode_targets([[True], [0.5]], "support.y", 2, 1)
    assert decode_labels([0, 1.0, 2], "support.y", 3, 3).tolist() == [0, 1, 2]  # integral floats are indices


def test_errors_speak_json_not_python():
    with pytest.raises(Problem, match=re.escape('x: not a rectangular array of numbers (a string where a number belongs (send 1.5, not "1.5"))')):
        decode_inputs([["1.0"]], "x", (1,), None, 10)
    with pytest.raises(Problem, match=r"null where a number belongs"):
        decode_inputs([[None]], "x", (1,), None, 10)
    with pytest.raises(Problem, match=r"beyond float32's range"):
        decode_inputs([[1e39]], "x", (1,), None, 10)
    with pytest.raises(Problem, match=re.escape("expected targets of shape [2, 1] or [2] for 2 inputs, got [1]")):
        decode_targets([1.0], "support.y", 2, 1)


def test_a_wrong_tensor_is_reported_against_its_own_form(app_client):
    body = {"support": {"x": {"dtype": "float16", "shape": [1, 1], "base64": "AAA="}, "y": [0]}, "query": {"x": [[1.0]]}}
    answer = app_client.post("/v1/models/any/predict", json=body)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["errors"]
    assert len(errors) == 1 and errors[0]["loc"] == ["body", "support", "x", "dtype"], errors  # not also the other two forms' complaints
    assert answer.json()["detail"].startswith("support.x.dtype: Input should be 'float32'")  # (a path in the body: no form's name)
    labels = app_client.post("/v1/models/any/predict", json={**body, "support": {"x": [[1.0]], "y": {"dtype": "float16", "shape": [1], "base64": ""}}})
    assert [e["loc"] for e in labels.json()["errors"]] == [["body", "support", "y", "dtype"]], labels.text  # labels too
    answer = app_client.post("/v1/models/any/predict", json={**body, "support": {"x": 5, "y": [0]}})
    assert "expected a tensor: nested lists of numbers, {dtype, shape, base64}, or {images: [...]}" in answer.json()["detail"]


def test_uint8_tensors_are_mapped_as_the_training_data_was():
    """A uint8 tensor is raw data: pixels of an image model (scaled and inverted as its pictures were, so
    they predict like the same pictures sent as PNG) or a uint8 .npz's bytes (divided by 255, as training
    sampled them). Other numbers, and uint8 for a model trained on floats, go to the model as they are."""
    import io

    from PIL import Image

    from metalearn.data.preprocess import OMNIGLOT_PREPROCESSING, preprocess_images

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    raw = EncodedTensor(dtype="uint8", shape=list(pixels.shape), base64=base64.b64encode(pixels.tobytes()).decode())
    pngs = []
    for picture in pixels[:, 0]:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    as_pictures = preprocess_images(pngs, OMNIGLOT_PREPROCESSING)
    assert np.allclose(decode_inputs(raw, "x", (1, 28, 28), OMNIGLOT_PREPROCESSING, 10).numpy(), as_pictures.numpy(), atol=1e-6)
    npz = {"kind": "array", "dtype": "uint8", "scale": "divide_255"}
    assert np.allclose(decode_inputs(raw, "x", (1, 28, 28), npz, 10).numpy(), pixels / 255.0, atol=1e-7)
    floats = {"kind": "array", "dtype": "float32", "scale": "none"}
    for preprocessing in (floats, None):
        assert np.array_equal(decode_inputs(raw, "x", (1, 28, 28), preprocessing, 10).numpy(), pixels.astype(np.float32))
    as_lists = decode_inputs(pixels.tolist(), "x", (1, 28, 28), npz, 10)  # JSON numbers: the model's input as they are
    assert np.array_equal(as_lists.numpy(), pixels.astype(np.float32))


def test_the_client_sends_uint8_as_uint8_and_pictures_as_pictures(tmp_path):
    import io

    from PIL import Image

    from metalearn.client import Client

    client = Client("http://127.0.0.1:9", encoding="json")
    pixels = np.zeros((2, 1, 4, 4), np.uint8)
    sent = client._x(pixels)
    assert sent["dtype"] == "uint8" and sent["shape"] == [2, 1, 4, 4]  # even with encoding="json"
    assert isinstance(client._x(pixels.astype(np.float32)), list)
    picture = Image.fromarray(np.full((5, 5), 200, np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    (tmp_path / "a.png").write_bytes(buffer.getvalue())
    for pictures in ([buffer.getvalue()], [tmp_path / "a.png"], [str(tmp_path / "a.png")], [picture]):
        sent = client._x(pictures)
        decoded = Image.open(io.BytesIO(base64.b64decode(sent["images"][0])))
        assert np.array_equal(np.asarray(decoded), np.asarray(picture)), pictures


def test_the_docs_work_under_a_path_prefix(tmp_path):
    """Behind a proxy that serves the app under /api, the docs pages find their assets and the document
    under /api too (relative addresses), and "Try it out" calls the service there (servers: ./)."""
    import re as regex

    from starlette.applications import Starlette
    from starlette.routing import Mount

    from service.app import create_app

    app = create_app(Settings(model_dir=str(tmp_path)))
    with TestClient(Starlette(routes=[Mount("/api", app=app)])) as client:
        for page in ("/api/docs", "/api/redoc"):
            html = client.get(page).text
            addresses = regex.findall(r"""(?:src|href|url|spec-url)\s*[:=]\s*['"]([^'"]+)['"]""", html)
            local = [a for a in addresses if not a.startswith(("http", "data:", "#"))]
            assert local and all(not a.startswith("/") for a in local), (page, local)
            for address in local:
                assert client.get("/api/" + address).status_code == 200, (page, address)
        servers = client.get("/api/openapi.json").json()["servers"]
        assert servers[0] == {"url": "/api"} and {"url": "./"} in servers  # (FastAPI adds the mount's root path)
    with TestClient(app) as client:  # served at the root, as behind a proxy that strips the prefix
        assert client.get("/openapi.json").json()["servers"] == [{"url": "./"}]
