"""The app's OpenAPI document (``/openapi.json``, what ``/docs`` and ``/redoc`` show and client generators read).

FastAPI writes it from the routes' declarations; :func:`install_openapi` adds what
those cannot say:

* a working example request for every loaded model on every endpoint that takes a body;
* the named schemas a generated client wants: ``Tensor`` (the three wire forms of an
  input), ``Labels``, ``NestedNumbers`` and ``Problem`` (every error answer's body, its
  ``type`` values listed from ``service.problems.PROBLEM_TYPES``);
* this service's limits (its settings) as the bounds of ``inner_steps``, ``inner_lr`` and ``ttl_s``;
* the headers the answers carry (``X-Request-ID`` on every one, ``Retry-After`` on a
  ``503``, ``Location`` on a created session, ``WWW-Authenticate`` on a ``401``).

It is rebuilt when the loaded models change (their names are its examples).
"""

from __future__ import annotations

import base64
import math

import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.problems import PROBLEM_MEDIA_TYPE, PROBLEM_TYPES, TYPE_BASE, problem_type
from service.tensors import MAX_RANK

# Every answer has it (service.request_ids).
REQUEST_ID_HEADER = {
    "description": "The request's id: the caller's own X-Request-ID when it sends a valid one (1-128 of A-Z a-z 0-9 . _ : -), else a random one; in the service's logs too.",
    "schema": {"type": "string"},
}
RETRY_AFTER_HEADER = {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
LOCATION_HEADER = {"description": "The new session: /v1/sessions/{session_id}.", "schema": {"type": "string"}}
AUTHENTICATE_HEADER = {"description": "Bearer: send the API key as Authorization: Bearer KEY (or X-API-Key: KEY).", "schema": {"type": "string"}}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nested(rank: int) -> dict:
    return {"type": "array", "items": {"type": "number"} if rank == 1 else _nested(rank - 1)}


# The one problem type the service does not answer itself: the proxy's rate limit (deploy/nginx.conf).
PROXY_TYPE = TYPE_BASE + "too-many-requests"


def _problem_schema() -> dict:
    listed = "\n".join(f"* `{problem_type(title)}` ({status}): {when}" for title, (status, when) in PROBLEM_TYPES.items())
    return {
        "title": "Problem",
        "type": "object",
        "description": "An error answer (RFC 9457 problem details, application/problem+json).",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string", "format": "uri", "enum": [problem_type(title) for title in PROBLEM_TYPES] + [PROXY_TYPE],
                     "description": f"What went wrong, one of (status in brackets):\n\n{listed}\n* `{PROXY_TYPE}` (429): "
                                    "the proxy in front of the replicas (deploy/nginx.conf) limits this key's adaptations or this client's connections"},
            "title": {"type": "string", "description": "The type in words."},
            "status": {"type": "integer", "description": "The HTTP status."},
            "detail": {"type": "string", "description": "What is wrong in this request, naming the field (support.x, query.x, ...) and what was expected."},
            "instance": {"type": "string", "description": "The request's path."},
            "errors": {"type": "array", "items": _ref("ProblemFieldError"), "description": "invalid-request only: each field that does not match the schema."},
            "request_id": {"type": "string", "description": "internal-error only: the request's id, to quote when reporting it."},
        },
    }


COMPONENTS = {
    "ProblemFieldError": {
        "title": "ProblemFieldError",
        "type": "object",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {"type": "array", "items": {"type": "string"}, "description": "Where: body, then the field's path."},
            "msg": {"type": "string"},
            "type": {"type": "string", "description": "pydantic's error type (missing, extra_forbidden, int_type, ...)."},
        },
    },
    "NestedNumbers": {
        "title": "NestedNumbers",
        "description": f"A rectangular array of JSON numbers, nested to the tensor's rank (1 to {MAX_RANK}, as EncodedTensor's shape).",
        # Spelt out rank by rank, not as a schema that refers to itself: openapi-typescript writes a recursive
        # schema as a type TypeScript refuses (TS2502), and every tensor field became `any`.
        "anyOf": [_nested(rank) for rank in range(1, MAX_RANK + 1)],
    },
    "Tensor": {
        "title": "Tensor",
        "description": "Inputs [N, *input_shape] in one of three forms.",
        "oneOf": [_ref("NestedNumbers"), _ref("EncodedTensor"), _ref("ImageList")],
    },
    "Labels": {
        "title": "Labels",
        "description": "Class indices [N] (classification) or targets [N] / [N, outputs] (regression).",
        "oneOf": [_ref("NestedNumbers"), _ref("EncodedTensor")],
    },
}


def _example_tensor(shape: list[int], seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    data = torch.rand(shape, generator=generator, dtype=torch.float32)
    return {"dtype": "float32", "shape": list(shape), "base64": base64.b64encode(data.numpy().tobytes()).decode()}


def model_examples(model) -> dict:
    """A working support set, query and session-predict body for ``model``."""
    shape = list(model.input_shape)
    if model.task_type == "classification":
        n = model.n_way
        support = {"x": _example_tensor([n, *shape], 0), "y": list(range(n))}
        query = {"x": _example_tensor([2, *shape], 1)}
    else:
        if shape == [1]:
            xs = [-4.0, -2.0, 0.0, 2.0, 4.0]
            support = {"x": [[v] for v in xs], "y": [round(math.sin(v), 4) for v in xs]}
            query = {"x": [[-1.0], [1.0], [3.0]]}
        else:
            support = {"x": _example_tensor([5, *shape], 0), "y": [[0.0] * model.out_features for _ in range(5)]}
            query = {"x": _example_tensor([2, *shape], 1)}
    return {"support": support, "query": query}


def _named_tensors(schemas: dict) -> None:
    """Each tensor field as a reference to ``Tensor`` or ``Labels`` (pydantic writes the union inline in every
    model, which generators turn into as many wrapper types), ``predictions`` with its item types."""
    for model in schemas.values():
        for name, field in model.get("properties", {}).items():
            branches = field.get("oneOf") or field.get("anyOf") or []
            refs = {b.get("$ref", "").rsplit("/", 1)[-1] for b in branches}
            if "EncodedTensor" in refs:
                field.pop("oneOf", None)
                field.pop("anyOf", None)
                field["$ref"] = "#/components/schemas/" + ("Tensor" if "ImageList" in refs else "Labels")
    for response in ("PredictResponse", "SessionPredictResponse"):
        predictions = schemas[response]["properties"]["predictions"]
        predictions["items"] = {"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]}


# The request bodies' schemas (service/routes/schemas.py), which the helpers below amend.
REQUEST_SCHEMAS = ("AdaptRequest", "PredictRequest", "SessionPredictRequest")


def _bounds(schemas: dict, settings) -> None:
    """The service's limits as the request fields' bounds (the integer or number branch of an optional field)."""
    bounds = {
        "inner_steps": {"minimum": 0, "maximum": settings.max_inner_steps},
        "inner_lr": {"minimum": settings.min_inner_lr, "maximum": settings.max_inner_lr},
        "ttl_s": {"minimum": 1, "maximum": settings.max_session_ttl_s},
    }
    for request in REQUEST_SCHEMAS:
        for name, field in schemas[request]["properties"].items():
            if name in bounds:
                for branch in field.get("anyOf", [field]):
                    if branch.get("type") in ("integer", "number"):
                        branch.update(bounds[name])


def _no_request_defaults(schemas: dict) -> None:
    """Request fields without ``default``: their descriptions give it. openapi-typescript (7, by default) types a
    field that has a default as always present, so generated clients had to send ``transductive``."""
    for request in REQUEST_SCHEMAS:
        for field in schemas[request]["properties"].values():
            field.pop("default", None)


def _answers(operation: dict, path: str) -> None:
    for status, response in operation.get("responses", {}).items():
        headers = response.setdefault("headers", {})
        headers["X-Request-ID"] = REQUEST_ID_HEADER
        if PROBLEM_MEDIA_TYPE in response.get("content", {}):
            response["content"][PROBLEM_MEDIA_TYPE] = {"schema": _ref("Problem")}
        if status == "503":
            headers["Retry-After"] = RETRY_AFTER_HEADER
        elif status == "401":
            headers["WWW-Authenticate"] = AUTHENTICATE_HEADER
        elif status == "201" and path.endswith("/adapt"):
            headers["Location"] = LOCATION_HEADER


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        registry = getattr(app.state, "registry", None)
        loaded = [registry.get(n) for n in registry.names()] if registry else []
        bodies = {model.name: model_examples(model) for model in loaded}  # (one of each per model, for every endpoint)
        schemas = schema["components"]["schemas"]
        schemas.update(COMPONENTS, Problem=_problem_schema())
        _named_tensors(schemas)
        _bounds(schemas, app.state.settings)
        _no_request_defaults(schemas)
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                if "requestBody" not in operation:  # (FastAPI declares a 422 for any parameters; a path's strings always fit)
                    operation.get("responses", {}).pop("422", None)
                _answers(operation, path)
                operation.setdefault("security", [])  # open endpoints say so (the /v1 ones list the key schemes)
                for parameter in operation.get("parameters", []):
                    if parameter.get("name") == "name" and loaded:
                        # Examples, not an enum: a generated client should not need regenerating when a model is added.
                        parameter["example"] = loaded[0].name
                        parameter["description"] = "A loaded model (GET /v1/models lists them): " + ", ".join(m.name for m in loaded)
                    elif parameter.get("name") == "session_id":
                        parameter["example"] = "use-the-session_id-returned-by-adapt"
                body = operation.get("requestBody", {}).get("content", {}).get("application/json")
                if body is None or not loaded:
                    continue
                examples = {}
                for model in loaded:
                    ex = bodies[model.name]
                    if path.endswith("/adapt"):
                        value = {"support": ex["support"], "ttl_s": min(600, app.state.settings.max_session_ttl_s)}
                    elif path.startswith("/v1/models") and path.endswith("/predict"):
                        value = {"support": ex["support"], "query": ex["query"]}
                    else:
                        value = {"x": ex["query"]["x"]}
                    target = f"POST {path.replace('{name}', model.name)}"
                    examples[model.name] = {"summary": f"{model.name} ({model.task_type}, input {list(model.input_shape)}): {target}", "value": value}
                body["examples"] = examples
        # Relative to the document: "Try it out" calls the service where the page found the document,
        # under a proxy's path prefix too.
        schema.setdefault("servers", [{"url": "./"}])
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
