"""``JSONRoute``: how the ``/v1`` routes turn a request into their endpoint's arguments, without FastAPI's generic machinery.

The endpoints are ordinary FastAPI path operations; FastAPI still reads their
declarations for the OpenAPI document, so ``/docs`` is unchanged. Only the
request handling differs. FastAPI's generic handler does a lot per request:
content-type parsing through ``email.message``, solving the dependency tree,
``json.loads`` then validating the Python objects, and validating the returned
model once more. A MAML session predict spends 75 us in the app with this
class against 141 us with FastAPI's handler, in process with the engine
answering instantly (``bench/experiments/route_overhead.py``); over HTTP a lone
one took 1.39 against 1.55 ms at the client.

An endpoint of a ``JSONRoute`` is an ``async def`` taking only:

- ``request: Request``, and ``response: Response`` (headers and status it sets are kept);
- path parameters (``str``);
- one body parameter, a pydantic model, validated straight from the raw bytes by
  pydantic-core (``model_validate_json``);
- ``Depends(owner)``: the caller's API-key owner, checked by calling
  :func:`service.routes.deps.caller` (the same check, without the sub-dependencies
  that only declare the security schemes for the docs).

Anything else raises ``TypeError`` when the route is declared, so no parameter
is ever silently left unfilled (``app.dependency_overrides`` does not apply to
these routes either). The endpoint returns a ``Response`` (sent as is)
or its ``response_model`` (an instance, or data validated into one), written by
``model_dump_json`` with the route's ``response_model_exclude_none``. Errors
are FastAPI's: the caller is checked first (401), then a body that is not JSON
is a ``RequestValidationError`` of type ``json_invalid`` and a body that does
not fit the model one with pydantic's errors under ``body``; and two of this
route's own: a body that is not ``application/json`` or is compressed (415),
and one with more list values than the limit (413).
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.params import Depends
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from service.problems import Problem
from service.routes.deps import ClientGone, caller, owner
from service.tensors import TENSOR_FORMS

def _is_json(content_type: str | None) -> bool:
    """No content type (curl's ``--data-binary`` without a header) is read as JSON; a declared one must be JSON,
    in UTF-8 (RFC 8259; a ``charset`` of another name would be read as malformed JSON)."""
    if not content_type:
        return True
    media, *parameters = (part.strip().lower() for part in content_type.split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in parameters if p.startswith("charset=")]
    return (media == "application/json" or media.endswith("+json")) and all(c in ("utf-8", "utf8") for c in charsets)


UTF8_BOM = b"\xef\xbb\xbf"  # RFC 8259 lets a parser ignore it; some Windows tools write one


# nginx's status for a request whose client closed the connection before the answer: in the access log
# and /metrics, not counted as a server error (there is nobody to answer).
CLIENT_CLOSED = 499


async def _read_body(request: Request, model: type[BaseModel]) -> BaseModel:
    if not _is_json(request.headers.get("content-type")):
        raise Problem(415, "Unsupported media type", f"send the body as application/json in UTF-8, not {request.headers['content-type']!r}")
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":  # a compressed body would otherwise be read as malformed JSON
        raise Problem(415, "Unsupported media type", f"Content-Encoding {encoding!r} is not accepted: send the JSON body uncompressed")
    try:
        raw = await request.body()
    except ClientDisconnect:  # closed in the middle of sending its body
        raise ClientGone from None
    if not raw:  # as FastAPI answers a missing required body
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    _check_list_values(raw, request.app.state.settings.max_list_values)
    raw = raw.removeprefix(UTF8_BOM)
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        errors = [{**e, "loc": ("body", *_body_path(e["loc"]))} for e in error.errors(include_url=False)]
        raise RequestValidationError(errors, body=raw) from None


def _body_path(loc: tuple) -> tuple:
    """An error's location as a path in the body: without the tensor form pydantic names after a tensor field."""
    return tuple(part for i, part in enumerate(loc) if not (part in TENSOR_FORMS and i and loc[i - 1] in ("x", "y")))


def _check_list_values(raw: bytes, limit: int) -> None:
    """Refuse a body of more comma-separated values than ``limit``, or more JSON lists than ``limit // 16`` (a list
    costs as much to parse as a dozen numbers), before it is parsed. Parsing holds the GIL whichever thread does it
    (a 15 MB list of one-number rows: 3-5 s, the event loop and every other request waiting; within these limits at
    most about 60 ms); counting takes 0.5 ms a MB, and base64 tensors or pictures have almost no commas or lists."""
    if len(raw) <= 2 * (limit // 16):  # (a list takes 2 bytes at least, a value too: "[]", "0,")
        return
    values = raw.count(b",") + 1
    # Lists are counted only where there may be too many: n sibling lists need n - 1 commas, and nesting deeper than
    # pydantic's recursion limit is refused anyway, so a body of base64 tensors or pictures takes one pass.
    lists = raw.count(b"[") if values > limit // 32 else 0
    if values > limit or lists > limit // 16:
        raise Problem(413, "Request body too large", f"the body holds {values} or so values in {lists} JSON lists, over the limit "
                      f"of {limit} values in {limit // 16} lists (METALEARN_MAX_LIST_VALUES): send large tensors as "
                      "{dtype, shape, base64} (the Python client does by default)")


class JSONRoute(APIRoute):
    """An ``APIRoute`` whose requests skip FastAPI's dependency solving (see the module docstring)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            raise TypeError(f"{endpoint.__name__}: a JSONRoute endpoint must be 'async def'")
        self._arguments = _plan(endpoint, path)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], typing.Awaitable[Response]]:
        endpoint, arguments = self.endpoint, self._arguments
        model, exclude_none, default_status = self.response_model, self.response_model_exclude_none, self.status_code or 200

        async def handler(request: Request) -> Response:
            sub_response = None
            kwargs = {}
            try:
                for name, kind, body_model in arguments:
                    if kind == "caller":
                        kwargs[name] = caller(request)
                    elif kind == "path":
                        kwargs[name] = request.path_params[name]
                    elif kind == "body":
                        kwargs[name] = await _read_body(request, body_model)
                    elif kind == "request":
                        kwargs[name] = request
                    else:  # "response": FastAPI's temporal response, whose headers and status are merged into the answer
                        sub_response = kwargs[name] = Response()
                        del sub_response.headers["content-length"]
                        sub_response.status_code = None
                result = await endpoint(**kwargs)
            except ClientGone:  # while it sent its body, or while its job waited
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(result, Response):
                return result
            if model is None:
                raise TypeError(f"{endpoint.__name__} returned {type(result).__name__}: without a response_model it must return a Response")
            if not isinstance(result, model):
                result = model.model_validate(result)
            status = (sub_response.status_code if sub_response is not None else None) or default_status
            answer = Response(result.model_dump_json(exclude_none=exclude_none), status_code=status, media_type="application/json")
            if sub_response is not None:
                answer.raw_headers.extend(sub_response.headers.raw)
            return answer

        return handler


def _plan(endpoint: Callable[..., Any], path: str) -> list[tuple[str, str, type[BaseModel] | None]]:
    """``[(parameter, kind, body model)]``: where each argument of ``endpoint`` comes from, in the order they are filled
    (the caller first, so a request without a valid key gets 401 before its body is read)."""
    hints = typing.get_type_hints(endpoint)
    path_names = {part[1:-1].split(":")[0] for part in path.split("/") if part.startswith("{")}
    plan = []
    for name, parameter in inspect.signature(endpoint).parameters.items():
        annotation = hints.get(name)
        default = parameter.default
        if isinstance(default, Depends):
            if default.dependency is not owner:
                raise TypeError(f"{endpoint.__name__}({name}): a JSONRoute resolves only Depends(owner), not {default.dependency!r}")
            plan.append((name, "caller", None))
        elif annotation is Request:
            plan.append((name, "request", None))
        elif annotation is Response:
            plan.append((name, "response", None))
        elif name in path_names:
            if annotation is not str:
                raise TypeError(f"{endpoint.__name__}({name}): JSONRoute path parameters are str")
            plan.append((name, "path", None))
        elif inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            if any(kind == "body" for _, kind, _ in plan):
                raise TypeError(f"{endpoint.__name__}: a JSONRoute endpoint takes one body model")
            plan.append((name, "body", annotation))
        else:
            raise TypeError(f"{endpoint.__name__}({name}): a JSONRoute takes Request, Response, str path parameters, one body model and Depends(owner)")
    return sorted(plan, key=lambda step: step[1] != "caller")
