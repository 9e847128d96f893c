"""A small HTTP client for the adaptation service.

    from metalearn.client import Client

    client = Client("http://127.0.0.1:8000", api_key="secret")
    session = client.adapt("omniglot", support_x, support_y)     # numpy or torch
    labels = session.predict(query_x)                             # numpy class indices
    session.probabilities                                          # of the last predict (classification)
    out = client.predict("omniglot", support_x, support_y, query_x)   # stateless; a Prediction
    session.delete()                                              # or: with client.adapt(...) as session:

Tensors travel as ``{"dtype", "shape", "base64"}`` (raw little-endian float32)
by default, ``encoding="json"`` sends nested lists. uint8 arrays travel as
uint8 whatever the encoding: the service maps them to 0-1 as the model's
training data was mapped (pixels, a uint8 .npz). Pictures go as themselves:
``x`` may be a list of encoded files (``bytes``), paths to them or PIL images,
which the service preprocesses as the training data was. Every error answer raises
:class:`ServiceError` carrying the RFC 9457 problem document. A ``503`` (queue
full, session store down) is retried up to ``retries`` times after the
``Retry-After`` the service sends (capped at ``max_retry_wait`` seconds).

In an asyncio application (a FastAPI or aiohttp backend, say), :class:`AsyncClient`
has the same calls, awaited, so that waiting for the service never blocks the event loop:

    async with AsyncClient("http://127.0.0.1:8000", api_key="secret") as client:
        async with await client.adapt("omniglot", support_x, support_y) as session:   # deleted at the end
            labels = await session.predict(query_x)
            many = await asyncio.gather(*(session.predict_full(x) for x in batches))   # one connection pool
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np


def _json_number(value: Any, kind: type) -> Any:
    """A numpy or torch scalar (``np.int64(3)``, ``torch.tensor(0.1)``) as the JSON number it holds; anything
    else as given, for the service to refuse with its problem detail."""
    if isinstance(value, np.generic) or hasattr(value, "detach"):
        array = _as_numpy(value)
        if array.ndim == 0 and array.dtype.kind in ("i", "u", "f") and (kind is float or float(array).is_integer()):
            return kind(array)
    return value


class ServiceError(Exception):
    """An error answer: ``status``, ``title``, ``detail``, the whole ``problem`` document, and the
    ``request_id`` the service gave the request (quote it to the service's operators: it is in their logs)."""

    def __init__(self, status: int, problem: dict, request_id: str | None = None):
        self.status = status
        self.problem = problem
        self.title = problem.get("title", "")
        self.detail = problem.get("detail", "")
        self.request_id = request_id
        self.retry_after = None
        where = f" (request id {request_id})" if request_id and status >= 500 else ""
        super().__init__(f"{status} {self.title}: {self.detail}{where}")


def _as_numpy(value: Any, dtype=None) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(dtype) if dtype is not None else array


def encode_tensor(value: Any, encoding: str = "base64", dtype=np.float32) -> Any:
    array = np.ascontiguousarray(_as_numpy(value, dtype))
    if encoding == "json":
        return array.tolist()
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": np.dtype(dtype).name, "shape": list(array.shape), "base64": base64.b64encode(little.tobytes()).decode("ascii")}


def encode_images(images: list) -> dict:
    """``x`` for image models from pictures: encoded files (PNG, JPEG, ...) as ``bytes``, paths to them, or
    PIL images (sent as PNG)."""
    encoded = []
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            image = Path(image).read_bytes()
        elif _is_pil(image):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            image = buffer.getvalue()
        encoded.append(base64.b64encode(bytes(image)).decode("ascii"))
    return {"images": encoded}


def _is_pil(value: Any) -> bool:
    """A PIL image, told without importing PIL."""
    return hasattr(value, "save") and hasattr(value, "mode")


def _pictures(x: Any) -> bool:
    """Whether ``x`` is a list of pictures (file bytes, paths, PIL images) rather than numbers."""
    if not isinstance(x, (list, tuple)) or not x:
        return False
    return isinstance(x[0], (bytes, bytearray, memoryview, str, os.PathLike)) or _is_pil(x[0])


def _seconds(retry_after: str | None, default: float) -> float:
    try:
        return max(0.0, float(retry_after))
    except (TypeError, ValueError):  # absent, or an HTTP date
        return default


@dataclass
class Prediction:
    predictions: np.ndarray
    probabilities: np.ndarray | None
    raw: dict = field(repr=False)


class _Calls:
    """What both clients share: their settings, how each call's body is written, when a 503 is retried, how an
    answer is read. A subclass names its ``httpx`` client class and sends the requests (blocking or awaited)."""

    _http_class: type[httpx.Client] | type[httpx.AsyncClient]

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        encoding: str = "base64",
        retries: int = 2,
        max_retry_wait: float = 10.0,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        self.encoding = encoding
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = self._http_class(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def _x(self, x: Any) -> Any:
        if isinstance(x, dict):  # already encoded, e.g. encode_images(...)
            return x
        if _pictures(x):
            return encode_images(x)
        array = _as_numpy(x)
        if array.dtype == np.uint8:  # raw pixels or bytes: the service maps them as the training data's
            return encode_tensor(array, "base64", np.uint8)
        return encode_tensor(array, self.encoding)

    def _y(self, y: Any) -> Any:
        array = _as_numpy(y)
        if np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int64).tolist() if self.encoding == "json" else encode_tensor(array, self.encoding, np.int64)
        return encode_tensor(array, self.encoding, np.float32)

    @staticmethod
    def _model_path(name: str, action: str = "") -> str:
        """``/v1/models/{name}[/action]``, the name quoted: a model is named after its file, which may hold
        ``#``, ``?``, ``%`` or spaces (unquoted, ``a#b`` asked for model ``a``)."""
        return f"/v1/models/{quote(name, safe='')}" + (f"/{action}" if action else "")

    def _adapt_body(self, x: Any, y: Any, inner_steps: int | None, inner_lr: float | None, ttl_s: int | None) -> dict:
        body: dict = {"support": {"x": self._x(x), "y": self._y(y)}}
        for key, value, kind in (("inner_steps", inner_steps, int), ("inner_lr", inner_lr, float), ("ttl_s", ttl_s, int)):
            if value is not None:
                body[key] = _json_number(value, kind)
        return body

    def _predict_body(self, support_x: Any, support_y: Any, query_x: Any, inner_steps: int | None, inner_lr: float | None, transductive: bool) -> dict:
        body = self._adapt_body(support_x, support_y, inner_steps, inner_lr, None)
        body.update(query={"x": self._x(query_x)}, transductive=transductive)
        return body

    def _retry_wait(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before sending the request again, or None: the answer stands.

        A 503 means "not now" (queue full, session store down): wait as the service says."""
        if response.status_code != 503 or attempt >= self.retries:
            return None
        return min(_seconds(response.headers.get("Retry-After"), default=2.0**attempt), self.max_retry_wait)

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        """The answer's JSON (None for a 204), or :class:`ServiceError` raised for an error answer."""
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"title": response.reason_phrase, "detail": response.text[:500]}
            problem = problem if isinstance(problem, dict) else {"detail": str(problem)}
            error = ServiceError(response.status_code, problem, response.headers.get("X-Request-ID"))
            error.retry_after = response.headers.get("Retry-After")
            raise error
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    @staticmethod
    def _prediction(body: dict) -> Prediction:
        probabilities = body.get("probabilities")
        return Prediction(
            predictions=np.asarray(body["predictions"]),
            probabilities=None if probabilities is None else np.asarray(probabilities, dtype=np.float32),
            raw=body,
        )


class _SessionHandle:
    def __init__(self, client: "Client | AsyncClient", info: dict):
        self.client = client
        self.info = info
        self.id: str = info["session_id"]
        self.model: str = info["model"]
        self.path = f"/v1/sessions/{self.id}"
        self.probabilities: np.ndarray | None = None

    def _predict_body(self, x: Any, transductive: bool) -> dict:
        return {"x": self.client._x(x), "transductive": transductive}

    def _keep(self, prediction: Prediction) -> np.ndarray:
        self.probabilities = prediction.probabilities
        return prediction.predictions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id[:8]}..., model={self.model!r})"


class RemoteSession(_SessionHandle):
    """An adapted session on the service."""

    def predict(self, x: Any, transductive: bool = False) -> np.ndarray:
        """Predictions (class indices or values) for ``x``; class probabilities land in ``self.probabilities``."""
        return self._keep(self.predict_full(x, transductive))

    def predict_full(self, x: Any, transductive: bool = False) -> Prediction:
        return self.client._prediction(self.client._request("POST", self.path + "/predict", self._predict_body(x, transductive)))

    def describe(self) -> dict:
        return self.client._request("GET", self.path)

    def delete(self) -> None:
        self.client._request("DELETE", self.path)

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, *exc) -> None:
        """Deleted on leaving a ``with`` block (already gone, expired or evicted: fine)."""
        try:
            self.delete()
        except ServiceError as error:
            if error.status != 404:
                raise


class AsyncRemoteSession(_SessionHandle):
    """:class:`RemoteSession` for :class:`AsyncClient`: the same methods, awaited."""

    async def predict(self, x: Any, transductive: bool = False) -> np.ndarray:
        return self._keep(await self.predict_full(x, transductive))

    async def predict_full(self, x: Any, transductive: bool = False) -> Prediction:
        return self.client._prediction(await self.client._request("POST", self.path + "/predict", self._predict_body(x, transductive)))

    async def describe(self) -> dict:
        return await self.client._request("GET", self.path)

    async def delete(self) -> None:
        await self.client._request("DELETE", self.path)

    async def __aenter__(self) -> "AsyncRemoteSession":
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.delete()
        except ServiceError as error:
            if error.status != 404:
                raise


class Client(_Calls):
    """The service's API as blocking calls (see the module docstring); ``transport`` is an ``httpx.BaseTransport``."""

    _http_class = httpx.Client

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        for attempt in itertools.count():
            response = self._http.request(method, path, json=body)
            wait = self._retry_wait(response, attempt)
            if wait is None:
                return self._answer(response)
            time.sleep(wait)

    def health(self) -> dict:
        return self._request("GET", "/healthz")

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models")["models"]

    def model(self, name: str) -> dict:
        return self._request("GET", self._model_path(name))

    def adapt(self, model: str, x: Any, y: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, ttl_s: int | None = None) -> RemoteSession:
        return RemoteSession(self, self._request("POST", self._model_path(model, "adapt"), self._adapt_body(x, y, inner_steps, inner_lr, ttl_s)))

    def session(self, session_id: str, model: str = "") -> RemoteSession:
        return RemoteSession(self, {"session_id": session_id, "model": model})

    def predict(self, model: str, support_x: Any, support_y: Any, query_x: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, transductive: bool = False) -> Prediction:
        """Stateless adapt-and-predict: nothing is kept on the service."""
        body = self._predict_body(support_x, support_y, query_x, inner_steps, inner_lr, transductive)
        return self._prediction(self._request("POST", self._model_path(model, "predict"), body))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Calls):
    """:class:`Client` for asyncio applications: the same methods and arguments, awaited, on an ``httpx.AsyncClient``
    (one connection pool for all the coroutines that share it); ``transport`` is an ``httpx.AsyncBaseTransport``."""

    _http_class = httpx.AsyncClient

    async def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        for attempt in itertools.count():
            response = await self._http.request(method, path, json=body)
            wait = self._retry_wait(response, attempt)
            if wait is None:
                return self._answer(response)
            await asyncio.sleep(wait)

    async def health(self) -> dict:
        return await self._request("GET", "/healthz")

    async def models(self) -> list[dict]:
        return (await self._request("GET", "/v1/models"))["models"]

    async def model(self, name: str) -> dict:
        return await self._request("GET", self._model_path(name))

    async def adapt(self, model: str, x: Any, y: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, ttl_s: int | None = None) -> AsyncRemoteSession:
        return AsyncRemoteSession(self, await self._request("POST", self._model_path(model, "adapt"), self._adapt_body(x, y, inner_steps, inner_lr, ttl_s)))

    def session(self, session_id: str, model: str = "") -> AsyncRemoteSession:
        return AsyncRemoteSession(self, {"session_id": session_id, "model": model})

    async def predict(self, model: str, support_x: Any, support_y: Any, query_x: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, transductive: bool = False) -> Prediction:
        """Stateless adapt-and-predict: nothing is kept on the service."""
        body = self._predict_body(support_x, support_y, query_x, inner_steps, inner_lr, transductive)
        return self._prediction(await self._request("POST", self._model_path(model, "predict"), body))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
