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
``x`` may be a list of encoded files (``bytes``), data URLs
(``data:image/png;base64,...``, passed on as they are), paths to files or PIL
images, which the service preprocesses as the training data was. Any other
string is a path that the client reads and uploads: pass pictures that come
from your own users as ``bytes`` or data URLs, never as strings that might
name a file on your machine. Pixels are scaled only
when they are uint8: an int32 or int64 array of 0-255 goes as those numbers.

Every error answer raises :class:`ServiceError` carrying the RFC 9457 problem
document (``code`` names its type, e.g. ``unknown-session``); a service that
cannot be reached or does not answer in ``timeout`` seconds (the whole answer)
raises :class:`ServiceUnreachable`; both are :class:`ClientError`. A ``503`` (queue
full, session store down; not ``timed-out``: that request may still be computing) or a
``429`` (a proxy's rate limit, ``deploy/nginx.conf``) is retried up to ``retries`` times after the ``Retry-After`` the answer gives
(capped at ``max_retry_wait`` seconds, with jitter), and so is a connection that
could not be opened (nothing was sent), unless TLS refused it (an untrusted
certificate, or https:// to a plain-HTTP service: trying again mends neither).
A session lives on the service: keep its ``id`` (and model) and reattach with
``client.session(session_id, model)``.

A query set the service refuses as too large (more than its ``max_query``
examples, a body over its byte or value limits) is sent again in parts that
fit (the limits read from ``GET /v1/models``), and the answers are joined in
order: every query's prediction depends on it alone. Not with
``transductive=True`` (statistics of the whole query batch: the refusal is
raised), nor for ``x`` already encoded as a dict, nor for a list of pictures
over the service's ``max_list_pixels`` (an ``invalid-tensor`` refusal). A
stateless ``predict`` in parts adapts once per part: for many queries, adapt
a session.

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
import email.utils
import io
import itertools
import json
import math
import os
import random
import ssl
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
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


def _type_name(kind: Any) -> str | None:
    """A problem type's name: ``unknown-session`` for ``https://metalearn.dev/problems/unknown-session``."""
    return kind.rstrip("/").rsplit("/", 1)[-1] if isinstance(kind, str) and kind != "about:blank" else None


class ClientError(Exception):
    """What a call to the service raises: :class:`ServiceError` (it answered with an error) or
    :class:`ServiceUnreachable` (it did not answer)."""


class ServiceError(ClientError):
    """An error answer: ``status``, ``title``, ``detail``, ``code`` (the problem type's name, e.g.
    ``unknown-session``, ``invalid-tensor``: what to branch on), the whole ``problem`` document, and the
    ``request_id`` the service gave the request (quote it to the service's operators: it is in their logs)::

        try:
            labels = session.predict(x)
        except ServiceError as error:
            if error.code != "unknown-session":   # expired, evicted, or the service restarted: adapt again
                raise
            session = client.adapt(model, support_x, support_y)
    """

    def __init__(self, status: int, problem: dict, request_id: str | None = None, retry_after: str | None = None):
        self.status = status
        self.problem = problem
        self.title = problem.get("title", "")
        self.detail = problem.get("detail", "")
        self.code = _type_name(problem.get("type"))
        self.request_id = request_id
        self.retry_after = retry_after
        where = f" (request id {request_id})" if request_id and status >= 500 else ""
        super().__init__(f"{status} {self.title}: {self.detail}{where}")

    def __reduce__(self):  # (raised in a process pool's worker, it reaches the parent as itself)
        return type(self), (self.status, self.problem, self.request_id, self.retry_after)


class ServiceUnreachable(ClientError):
    """No answer: the service could not be connected to (down, restarting, a wrong address) or did not
    answer within the client's ``timeout``. ``__cause__`` is the ``httpx`` error."""


def _not_the_service(status: int, detail: str, request_id: str | None = None) -> ServiceError:
    """What a successful answer that is not the service's raises (a proxy's page, another server at that address)."""
    return ServiceError(status, {"title": "Not the service's answer", "detail": detail}, request_id)


def _whole(response: httpx.Response, raw: bytes) -> httpx.Response:
    """The answer with its body, decoded as its headers say; :class:`ServiceError` where it does not decode (a
    proxy's or another server's answer claiming gzip, say: httpx's own error named no status)."""
    try:
        return httpx.Response(response.status_code, headers=response.headers, content=raw, request=response.request)
    except httpx.DecodingError as error:
        raise _not_the_service(response.status_code, f"the answer's body does not decode as its Content-Encoding "
                               f"{response.headers.get('Content-Encoding')!r} says ({error})", response.headers.get("X-Request-ID")) from None


def _past(deadline: float, response: httpx.Response, timeout: float, received: int) -> None:
    """Raise a timeout once ``deadline`` has passed and more of the answer is to come (an answer whose last
    bytes came just after it is kept: for an adaptation, its session exists)."""
    if time.monotonic() > deadline and str(received) != response.headers.get("Content-Length"):
        raise httpx.ReadTimeout(f"no whole answer within {timeout:g} s (it kept arriving, slowly)", request=response.request)


def _as_numpy(value: Any, dtype=None) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()  # (numpy has no bfloat16)
    array = np.asarray(value)
    if array.dtype.kind in "bcOUS":  # (cast, true/false would be 1/0 and complex numbers would lose their imaginary part)
        raise TypeError(f"expected numbers (an int or float array), got an array of {array.dtype}" +
                        (": send labels as class indices" if array.dtype.kind == "b" else ""))
    return array.astype(dtype) if dtype is not None else array


def encode_tensor(value: Any, encoding: str = "base64", dtype=np.float32) -> Any:
    """``value`` (numpy, torch, nested lists) as the service's wire form: ``{dtype, shape, base64}``, or nested lists."""
    array = np.ascontiguousarray(_as_numpy(value, dtype))
    if encoding == "json":
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # (json.dumps would refuse them, in other words)
            raise ValueError(f"NaN or infinite values (or beyond {np.dtype(dtype).name}'s range), which JSON cannot carry "
                             "and the service refuses (non-finite-values)")
        return array.tolist()
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return {"dtype": np.dtype(dtype).name, "shape": list(array.shape), "base64": base64.b64encode(little.tobytes()).decode("ascii")}


# The modes PNG holds; a PIL image of another (CMYK, 32-bit integer I) goes as TIFF, lossless too.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16"})


def _pil_bytes(image) -> bytes:
    """A PIL image as a lossless file the service reads as the training data's loader would read the file it came
    from: turned as its EXIF orientation says first (the training loader turns files so; a PNG written from the
    image would carry no orientation, and a phone photo went sideways)."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # (a copy without the orientation tag: turned once, however often called)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode in _PNG_MODES else "TIFF")
    return buffer.getvalue()


def encode_images(images: list) -> dict:
    """``x`` for image models from pictures: encoded files (PNG, JPEG, ...) as ``bytes``, data URLs (sent as
    they are), paths to regular files, or PIL images (sent as PNG, or TIFF for modes PNG does not hold,
    turned as their EXIF orientation says)."""
    encoded = []
    for image in images:
        if isinstance(image, str) and image.startswith("data:"):  # (the service reads data URLs itself)
            encoded.append(image)
            continue
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            if path.exists() and not path.is_file():  # (a FIFO or /dev/zero would never finish reading)
                raise ValueError(f"picture {str(path)[:200]!r} is not a regular file")
            image = path.read_bytes()
        elif _is_pil(image):
            image = _pil_bytes(image)
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


# The refusals a query set too large for one request gets (see _Calls._query_parts).
_SIZE_PROBLEMS = ("too-many-examples", "request-body-too-large")


def _body_measures(body: str) -> tuple[int, int, int]:
    """What the service's size limits count in a JSON body: bytes (as ``json.dumps`` writes them, with spaces: at
    least what httpx sends), comma-separated values, lists."""
    return len(body.encode()), body.count(",") + 1, body.count("[")


def _tls_refused(error: BaseException) -> bool:
    """Whether a connection failed in its TLS handshake (httpx keeps ssl's own error in the chain)."""
    while error is not None:
        if isinstance(error, ssl.SSLError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _problem_code(response: httpx.Response) -> str | None:
    """The problem type's name of an error answer (``timed-out``), or None."""
    try:
        return _type_name(response.json().get("type"))
    except (ValueError, AttributeError):
        return None


def _seconds(retry_after: str | None, default: float) -> float:
    """A ``Retry-After`` value (seconds, or an HTTP date) as seconds from now; ``default`` when absent or unreadable."""
    try:
        return max(0.0, float(retry_after))
    except (TypeError, ValueError):
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return default


@dataclass
class Prediction:
    """``predictions``: class indices ``[N]`` for classification, values ``[N]`` (one output) or ``[N, outputs]``
    for regression; ``probabilities`` ``[N, n_way]`` (classification); ``raw``: the whole answer (losses, timing; for
    a query set sent in parts, the first part's answer with every part's predictions, and ``requests``: how many)."""

    predictions: np.ndarray
    probabilities: np.ndarray | None
    raw: dict = field(repr=False)


class _Calls:
    """What both clients share: their settings, how each call's body is written, when a 503 or 429 is retried, how an
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
        headers: dict[str, str] | None = None,
        verify: Any = True,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
    ):
        """``base_url`` of the service; ``api_key``: one of the service's ``METALEARN_API_KEYS``; ``encoding``: ``base64`` or ``json`` (nested lists); ``headers`` sent with every call (a proxy's, say);
        ``verify``: TLS verification as httpx takes it (a CA bundle's path for a company CA)."""
        if encoding not in ("base64", "json"):
            raise ValueError(f"encoding must be 'base64' or 'json', got {encoding!r}")
        if not isinstance(base_url, str) or not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not (max_retry_wait >= 0 and timeout > 0):
            raise ValueError(f"timeout must be > 0 and max_retry_wait >= 0, got {timeout!r} and {max_retry_wait!r}")
        if api_key is not None:
            api_key = api_key.strip()  # (read from a file or a secret store, a key often ends in a newline)
            if not all("!" <= c <= "~" for c in api_key):  # (the message leaves the key out: it would end up in logs)
                raise ValueError("api_key holds a character an HTTP header cannot carry (a space, a control or a non-ASCII character)")
        self.encoding = encoding
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        self.base_url = base_url.rstrip("/")
        headers = {**({"Authorization": f"Bearer {api_key}"} if api_key else {}), **(headers or {})}
        self._http = self._http_class(base_url=self.base_url, headers=headers, timeout=timeout, verify=verify, transport=transport)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_url!r})"

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled: make one in each process")

    def _x(self, x: Any) -> Any:
        if isinstance(x, dict):  # already encoded, e.g. encode_images(...)
            return x
        if _is_pil(x):  # (one picture: a batch of one, not its pixels as a tensor)
            x = [x]
        if _pictures(x):
            return encode_images(x)
        array = _as_numpy(x)
        if array.ndim == 0:  # (sent as [1], the service's refusal would speak of a rank-1 tensor)
            raise ValueError(f"x is a single number ({array}): inputs go as a batch, [N, *input_shape]")
        if array.dtype == np.uint8:  # raw pixels or bytes: the service maps them as the training data's
            return encode_tensor(array, "base64", np.uint8)
        return encode_tensor(array, self.encoding)

    def _y(self, y: Any) -> Any:
        array = _as_numpy(y)
        if array.ndim == 0:
            raise ValueError(f"y is a single number ({array}): labels or targets go as one per example, [N] or [N, outputs]")
        if array.dtype == np.uint64 and array.size and array.max() > np.uint64(np.iinfo(np.int64).max):  # (the cast below would wrap it)
            raise ValueError(f"label {array.max()} is beyond any class index")
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
                value = _json_number(value, kind)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{key} must be a finite number, got {value}")
                if not isinstance(value, (bool, int, float, str)):  # (the service refuses what is not a number, with its detail)
                    raise TypeError(f"{key} must be a number, got {type(value).__name__} {value!r}")
                body[key] = value
        return body

    def _predict_body(self, support_x: Any, support_y: Any, query_x: Any, inner_steps: int | None, inner_lr: float | None, transductive: bool) -> dict:
        body = self._adapt_body(support_x, support_y, inner_steps, inner_lr, None)
        body.update(query={"x": self._x(query_x)}, transductive=transductive)
        return body

    def _retry_wait(self, answer: httpx.Response | httpx.TransportError, attempt: int) -> float | None:
        """Seconds to wait before sending the request again, or None: the answer (or the error) stands.

        A 503 means "not now" (queue full, session store down), a 429 "not so fast" (a proxy's rate limit in
        front of the service): wait as the answer says; not a 503 ``timed-out``. A connection that
        could not be opened sent nothing: tried again after 1, 2, ... s, unless TLS refused it (a certificate
        or a scheme that trying again does not mend). Each wait is drawn from its upper
        half, so that clients turned away together do not come back together."""
        if attempt >= self.retries:
            return None
        if isinstance(answer, httpx.Response):
            if answer.status_code not in (429, 503) or _problem_code(answer) == "timed-out":
                # (a request that timed out in the service may still be computing there: sent again, it would be
                # computed twice, and its caller would learn of the timeout after several)
                return None
            wait = _seconds(answer.headers.get("Retry-After"), default=2.0**attempt)
        elif isinstance(answer, httpx.ConnectError) and not _tls_refused(answer):
            wait = 2.0**attempt
        else:
            return None
        wait = min(wait, self.max_retry_wait)
        return wait * random.uniform(0.5, 1.0)

    def _settle(self, answer: httpx.Response | httpx.TransportError, attempt: int) -> tuple[float | None, Any]:
        """``(seconds to wait before trying again, None)``, or ``(None, the answer's JSON)``; what both clients' calls
        do with an answer or a transport error (raised as :class:`ServiceUnreachable` when not tried again)."""
        wait = self._retry_wait(answer, attempt)
        if wait is not None:
            return wait, None
        if isinstance(answer, httpx.TransportError):
            if isinstance(answer, httpx.TimeoutException):
                what = "did not answer in time"
            elif _tls_refused(answer):
                what = ("refused the TLS handshake: is it served over https (an http:// address for a plain service), and "
                        "is its certificate one this machine trusts (verify= takes a CA bundle's path)?")
            elif isinstance(answer, (httpx.ConnectError, httpx.UnsupportedProtocol)):
                what = "cannot be reached"
            else:  # (the request went out: the service may have carried it out, a session been adapted, say)
                what = "lost the connection before answering (the request was sent and may have been carried out)"
            raise ServiceUnreachable(f"the service at {self.base_url} {what} ({type(answer).__name__}: {answer})") from answer
        return None, self._answer(answer)

    def _answer(self, response: httpx.Response) -> Any:
        """The answer's JSON (None for a 204), or :class:`ServiceError` raised for an error answer."""
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            problem = problem if isinstance(problem, dict) else {"detail": str(problem)}
            if not isinstance(problem.get("title"), str):  # (missing, or not a problem document's: null, a number)
                problem["title"] = response.reason_phrase
            if not isinstance(problem.get("detail", ""), str):
                problem["detail"] = json.dumps(problem["detail"])[:500]
            raise ServiceError(response.status_code, problem, response.headers.get("X-Request-ID"), response.headers.get("Retry-After"))
        if 300 <= response.status_code < 400:  # (httpx follows no redirect; the service sends none but the trailing slash's)
            raise _not_the_service(response.status_code, f"a redirect to {response.headers.get('Location')!r}: is "
                                   f"{self.base_url} the service's own address?", response.headers.get("X-Request-ID"))
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:  # (a proxy's or another server's page at that address)
            raise _not_the_service(response.status_code, response.text[:200], response.headers.get("X-Request-ID")) from None

    def _closed(self) -> ClientError:
        return ClientError(f"this {type(self).__name__} is closed: make a new one")

    def _expect(self, body: Any, key: str, kind: type | tuple[type, ...] = object) -> Any:
        """``body[key]`` of a successful answer, of type ``kind``, or :class:`ServiceError` where the answer is
        not the service's (another server at that address answering 200 with JSON of its own)."""
        if not isinstance(body, dict) or key not in body or not isinstance(body[key], kind):
            what = f"no {key!r}" if not isinstance(body, dict) or key not in body else f"a {key!r} that is no {getattr(kind, '__name__', kind)}"
            raise _not_the_service(200, f"the answer has {what}: is {self.base_url} the metalearn service?")
        return body[key]

    def _described(self, body: Any, key: str) -> dict:
        """A description the service answers (a model's, a session's, its health), checked by one of its fields."""
        self._expect(body, key, str)
        return body

    def _prediction(self, body: dict) -> Prediction:
        try:
            predictions = np.asarray(self._expect(body, "predictions", list))
            probabilities = body.get("probabilities")
            probabilities = None if probabilities is None else np.asarray(probabilities, dtype=np.float32)
            if predictions.dtype.kind not in "iuf" or (probabilities is not None and probabilities.shape[:1] != predictions.shape[:1]):
                raise ValueError(f"predictions of {predictions.dtype}, probabilities of shape {getattr(probabilities, 'shape', None)}")
        except (ValueError, TypeError) as error:  # (ragged, or not numbers)
            raise _not_the_service(200, f"the answer's predictions are not numbers ({error}): is {self.base_url} the metalearn service?") from None
        return Prediction(
            predictions=predictions.astype(np.float32) if predictions.dtype.kind == "f" else predictions,  # (as the model computed them)
            probabilities=probabilities,
            raw=body,
        )

    @staticmethod
    def _splittable(error: ServiceError, x: Any, transductive: bool) -> bool:
        """Whether a prediction refused for its size may be sent again in parts: the service counted too many
        examples or too large a body, and each query's prediction is its own (not ``transductive``, whose
        statistics come from the whole query batch), and ``x`` is not already encoded."""
        return error.code in _SIZE_PROBLEMS and not transductive and not isinstance(x, dict)

    def _query_parts(self, x: Any, limits: dict, body_for: Callable[[Any], dict], adapts: bool = False) -> list | None:
        """``x`` cut, in order, into parts whose requests (``body_for(part)``) fit the service's ``limits``: at
        most ``max_query`` examples, ``max_body_bytes``, ``max_list_values`` comma-separated values and a
        sixteenth of that in lists, counted on each example's own encoding (pictures differ in size) and on
        the rest of the body (a stateless prediction's support set). None when no cut helps: one example
        alone is too large, or ``x`` fits whole (the refusal was about something else, the support set say).
        ``adapts``: each part's request adapts again (a stateless prediction): a warning says so."""
        pictures = _pictures(x)
        examples = list(x) if pictures else _as_numpy(x)
        if len(examples) == 0:
            return None
        alone = [_body_measures(json.dumps(self._x(examples[i : i + 1]))) for i in range(len(examples))]
        empty = _body_measures(json.dumps(encode_images([]) if pictures else self._x(examples[:0])))
        rest = [whole - own for whole, own in zip(_body_measures(json.dumps(body_for(examples[:1]))), alone[0])]
        # an example's share of a part's encoding, and its separator (", ": 2 bytes, a value)
        shares = [[own - none + separator for own, none, separator in zip(measures, empty, (2, 1, 0))] for measures in alone]
        room = (limits["max_body_bytes"] - 64, limits["max_list_values"] - 1, limits["max_list_values"] // 16)  # (64: a part's shape digits, base64's padding)
        nothing = [r + e for r, e in zip(rest, empty)]  # a part's body with no example in it
        parts, start, used = [], 0, nothing
        for index, share in enumerate(shares):
            full = index - start >= limits["max_query"] or any(u + s > r for u, s, r in zip(used, share, room))
            if full and index > start:
                parts.append(examples[start:index])
                start, used = index, nothing
            used = [u + s for u, s in zip(used, share)]
            if any(u > r for u, r in zip(used, room)):
                return None
        parts.append(examples[start:])
        if len(parts) == 1:
            return None
        if adapts:
            warnings.warn(f"the query set goes in {len(parts)} requests, each sending the support set and adapting again: "
                          "for many queries, adapt a session once (client.adapt) and predict from it", RuntimeWarning, stacklevel=4)
        return parts

    @staticmethod
    def _joined(parts: list[Prediction]) -> Prediction:
        """One :class:`Prediction` from the answers to a query set's parts, in order: ``raw`` is the first
        answer with every part's predictions and probabilities, and ``requests``: how many were sent."""
        predictions = np.concatenate([part.predictions for part in parts])
        probabilities = None if parts[0].probabilities is None else np.concatenate([part.probabilities for part in parts])
        raw = {**parts[0].raw, "predictions": predictions.tolist(), "requests": len(parts)}
        if probabilities is not None:
            raw["probabilities"] = probabilities.tolist()
        return Prediction(predictions=predictions, probabilities=probabilities, raw=raw)


class _SessionHandle:
    def __init__(self, client: "Client | AsyncClient", info: dict):
        self.client = client
        self.info = info
        self.id: str = client._expect(info, "session_id", str)
        self.model: str = info.get("model", "")
        self.path = f"/v1/sessions/{quote(self.id, safe='')}"  # (a stored id with / or # would reach another URL)
        self.probabilities: np.ndarray | None = None

    def _predict_body(self, x: Any, transductive: bool) -> dict:
        return {"x": self.client._x(x), "transductive": transductive}

    def _keep(self, prediction: Prediction) -> np.ndarray:
        self.probabilities = prediction.probabilities
        return prediction.predictions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id[:8]}..., model={self.model!r})"

    def __reduce__(self):
        raise TypeError(f"a {type(self).__name__} cannot be pickled: keep its id (and model) and reattach with client.session(id, model)")

    def _left(self, exc_type, error: ClientError) -> None:
        """What leaving a ``with`` block does with the deletion's ``error``: a 404 is fine (already gone); with an
        exception of the block's own in flight, any error is dropped (the session expires with its TTL) so that
        the block's exception is the one raised; else it is raised."""
        if exc_type is None and not (isinstance(error, ServiceError) and error.status == 404):
            raise error


class RemoteSession(_SessionHandle):
    """An adapted session on the service."""

    def predict(self, x: Any, transductive: bool = False) -> np.ndarray:
        """Predictions (class indices or values) for ``x``; class probabilities land in ``self.probabilities``."""
        return self._keep(self.predict_full(x, transductive))

    def predict_full(self, x: Any, transductive: bool = False) -> Prediction:
        """The whole answer for ``x``: predictions, probabilities (classification) and ``raw`` (safer than
        ``predict`` with one session shared by threads: nothing is kept on the handle). A query set over the
        service's limits goes in several requests (see :class:`Client`)."""
        return self.client._predict(self.path + "/predict", lambda part: self._predict_body(part, transductive), x, transductive)

    def describe(self) -> dict:
        """The session as the service has it: model, created, expires, size in bytes (a 404 ServiceError once gone)."""
        return self.client._described(self.client._request("GET", self.path), "session_id")

    def delete(self) -> None:
        """Remove the session from the service (a 404 ServiceError if it is already gone)."""
        self.client._request("DELETE", self.path)

    def __enter__(self) -> "RemoteSession":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        """Deleted on leaving a ``with`` block (already gone, expired or evicted: fine; see ``_left``)."""
        try:
            self.delete()
        except ClientError as error:
            self._left(exc_type, error)


class AsyncRemoteSession(_SessionHandle):
    """:class:`RemoteSession` for :class:`AsyncClient`: the same methods, awaited."""

    async def predict(self, x: Any, transductive: bool = False) -> np.ndarray:
        return self._keep(await self.predict_full(x, transductive))

    async def predict_full(self, x: Any, transductive: bool = False) -> Prediction:
        """:meth:`RemoteSession.predict_full`, awaited (a query set over the service's limits in parts, one after another)."""
        return await self.client._predict(self.path + "/predict", lambda part: self._predict_body(part, transductive), x, transductive)

    async def describe(self) -> dict:
        return self.client._described(await self.client._request("GET", self.path), "session_id")

    async def delete(self) -> None:
        await self.client._request("DELETE", self.path)

    async def __aenter__(self) -> "AsyncRemoteSession":
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        try:
            await self.delete()
        except ClientError as error:
            self._left(exc_type, error)


class Client(_Calls):
    """The service's API as blocking calls (see the module docstring); ``transport`` is an ``httpx.BaseTransport``."""

    _http_class = httpx.Client

    def _exchange(self, method: str, path: str, body: dict | None) -> httpx.Response:
        """The whole answer within ``timeout`` seconds: httpx's timeout bounds each read, so an answer that
        trickled in (a broken proxy or link) held the caller for as long as it trickled. (Connecting, sending
        and the wait for the answer's headers are each bounded by ``timeout`` as httpx bounds them.)"""
        deadline = time.monotonic() + self.timeout
        with self._http.stream(method, path, json=body) as response:
            if response.is_stream_consumed:  # (read already: a test's mock transport answers so)
                return response
            raw, received = [], 0
            for chunk in response.iter_raw():
                raw.append(chunk)
                received += len(chunk)
                _past(deadline, response, self.timeout, received)
        return _whole(response, b"".join(raw))

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        if self._http.is_closed:
            raise self._closed()
        for attempt in itertools.count():
            try:
                answer = self._exchange(method, path, body)
            except httpx.TransportError as error:
                answer = error
            wait, value = self._settle(answer, attempt)
            if wait is None:
                return value
            time.sleep(wait)

    def _predict(self, path: str, body_for: Callable[[Any], dict], x: Any, transductive: bool, adapts: bool = False) -> Prediction:
        """One prediction request for the queries ``x``; or, where the service refuses it as too large, one per
        part of ``x`` that fits its limits (``_query_parts``), the answers joined."""
        try:
            return self._prediction(self._request("POST", path, body_for(x)))
        except ServiceError as error:
            if not self._splittable(error, x, transductive):
                raise
            try:
                limits = self.limits()
            except ClientError:  # (the refusal is what the caller needs to see)
                raise error from None
            parts = self._query_parts(x, limits, body_for, adapts)
            if parts is None:
                raise
        return self._joined([self._prediction(self._request("POST", path, body_for(part))) for part in parts])

    def health(self) -> dict:
        """``{"status": "ok"}`` when the service's process answers."""
        return self._described(self._request("GET", "/healthz"), "status")

    def models(self) -> list[dict]:
        """What ``model`` says, for every model served."""
        return self._expect(self._request("GET", "/v1/models"), "models", list)

    def limits(self) -> dict:
        """The service's limits: examples per request (``max_support``, ``max_query``), inner steps and learning
        rate, session lifetime, body and picture sizes."""
        return self._expect(self._request("GET", "/v1/models"), "limits", dict)

    def model(self, name: str) -> dict:
        """A model's description: input shape, task type, n_way, loss, default inner steps and lr, metrics, ..."""
        return self._described(self._request("GET", self._model_path(name)), "name")

    def adapt(self, model: str, x: Any, y: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, ttl_s: int | None = None) -> RemoteSession:
        """Adapt ``model`` to the support set ``x`` ``[N, *input_shape]`` (or pictures) and ``y`` (class indices
        ``[N]``, or targets ``[N]``/``[N, outputs]``); the session that keeps the adapted parameters for
        ``ttl_s`` seconds (the service's default when None). ``session.info`` holds the service's answer
        (expiry, support loss before and after, timing)."""
        return RemoteSession(self, self._request("POST", self._model_path(model, "adapt"), self._adapt_body(x, y, inner_steps, inner_lr, ttl_s)))

    def session(self, session_id: str, model: str = "") -> RemoteSession:
        """A handle on a session adapted before (its id kept in a database or a cookie, say); nothing is asked of the
        service until it is used. ``model`` only names it in the handle's repr."""
        return RemoteSession(self, {"session_id": session_id, "model": model})

    def predict(self, model: str, support_x: Any, support_y: Any, query_x: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, transductive: bool = False) -> Prediction:
        """Stateless adapt-and-predict: nothing is kept on the service. A query set over the service's limits
        goes in several requests, each adapting again: for many queries, adapt a session once."""
        def body_for(part: Any) -> dict:
            return self._predict_body(support_x, support_y, part, inner_steps, inner_lr, transductive)

        return self._predict(self._model_path(model, "predict"), body_for, query_x, transductive, adapts=True)

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

    async def _exchange(self, method: str, path: str, body: dict | None) -> httpx.Response:
        """:meth:`Client._exchange`, awaited."""
        deadline = time.monotonic() + self.timeout
        async with self._http.stream(method, path, json=body) as response:
            if response.is_stream_consumed:
                return response
            raw, received = [], 0
            async for chunk in response.aiter_raw():
                raw.append(chunk)
                received += len(chunk)
                _past(deadline, response, self.timeout, received)
        return _whole(response, b"".join(raw))

    async def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        if self._http.is_closed:
            raise self._closed()
        for attempt in itertools.count():
            try:
                answer = await self._exchange(method, path, body)
            except httpx.TransportError as error:
                answer = error
            wait, value = self._settle(answer, attempt)
            if wait is None:
                return value
            await asyncio.sleep(wait)

    async def _predict(self, path: str, body_for: Callable[[Any], dict], x: Any, transductive: bool, adapts: bool = False) -> Prediction:
        try:
            return self._prediction(await self._request("POST", path, body_for(x)))
        except ServiceError as error:
            if not self._splittable(error, x, transductive):
                raise
            try:
                limits = await self.limits()
            except ClientError:
                raise error from None
            parts = self._query_parts(x, limits, body_for, adapts)
            if parts is None:
                raise
        return self._joined([self._prediction(await self._request("POST", path, body_for(part))) for part in parts])

    async def health(self) -> dict:
        return self._described(await self._request("GET", "/healthz"), "status")

    async def models(self) -> list[dict]:
        return self._expect(await self._request("GET", "/v1/models"), "models", list)

    async def limits(self) -> dict:
        return self._expect(await self._request("GET", "/v1/models"), "limits", dict)

    async def model(self, name: str) -> dict:
        return self._described(await self._request("GET", self._model_path(name)), "name")

    async def adapt(self, model: str, x: Any, y: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, ttl_s: int | None = None) -> AsyncRemoteSession:
        return AsyncRemoteSession(self, await self._request("POST", self._model_path(model, "adapt"), self._adapt_body(x, y, inner_steps, inner_lr, ttl_s)))

    def session(self, session_id: str, model: str = "") -> AsyncRemoteSession:
        return AsyncRemoteSession(self, {"session_id": session_id, "model": model})

    async def predict(self, model: str, support_x: Any, support_y: Any, query_x: Any, *, inner_steps: int | None = None, inner_lr: float | None = None, transductive: bool = False) -> Prediction:
        """Stateless adapt-and-predict: nothing is kept on the service (a query set over the service's limits in
        parts, one after another, each adapting again)."""
        def body_for(part: Any) -> dict:
            return self._predict_body(support_x, support_y, part, inner_steps, inner_lr, transductive)

        return await self._predict(self._model_path(model, "predict"), body_for, query_x, transductive, adapts=True)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
