"""The batch client: sends requests to an OpenAI-compatible server (vLLM) with httpx.

- At most `concurrency` requests are in flight (the server's --max-num-seqs): more would only
  queue inside the server and, on a server that refuses the excess, turn into 429s.
- 429, 408, 5xx and connection errors are retried (tenacity) with exponential backoff plus
  jitter; a Retry-After header wins. A retry waits outside the concurrency limit, so one
  request backing off does not idle a slot.
- A request that still fails becomes that request's error line; the others go on.
- Each finished request is handed to `on_outcome` as it finishes (the caller checkpoints it),
  and `should_stop` is asked about twice a second so a cancel stops sending at once.

The output line of a request is the OpenAI Batch API's (and vllm run-batch's):
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import itertools
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from gpujobs.batch import image_mime, image_urls, local_image_path

# Statuses worth another try: overload (429), a request timeout (408), and server-side errors.
RETRY_STATUSES = frozenset({408, 429})
PROBE_TIMEOUT_S = 5.0  # one /health or /v1/models probe


class RetryPolicy(BaseModel):
    """max_retries: tries after the first (default 5); backoff_s: first delay in seconds,
    doubling per retry plus up to as much again of jitter; backoff_max_s: longest delay."""

    model_config = ConfigDict(frozen=True)

    max_retries: int = Field(default=5, ge=0)
    backoff_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=30.0, gt=0)


@dataclass(frozen=True)
class BatchRequest:
    """One request of a batch: its position in the batch (0-based), id, route and body."""

    index: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """A finished request: its output line, whether it failed, and the tokens it used."""

    index: int
    custom_id: str
    line: dict[str, Any]
    failed: bool
    usage: dict[str, int] = field(default_factory=dict)


class ServerUnavailable(Exception):
    """The server did not answer its health check within the wait."""


class ImageError(ValueError):
    """A local image of a request cannot be read or is no image: that request fails alone."""


class _Retryable(Exception):
    """An attempt that may succeed if tried again: a retryable status, or no response."""

    def __init__(self, response: httpx.Response | None = None, error: Exception | None = None):
        super().__init__(str(error) if error else f"HTTP {response and response.status_code}")
        self.response = response
        self.error = error


def server_root(endpoint: str) -> str:
    """The server's root URL from its OpenAI base URL (`http://h:9999/v1` -> `http://h:9999`)."""
    endpoint = endpoint.rstrip("/")
    return endpoint.removesuffix("/v1")


def shown_url(url: str) -> str:
    """A URL fit for a message or a log: credentials in it (`user:password@`) left out."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def output_line(
    custom_id: str,
    response: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One output line in the OpenAI Batch / vLLM run-batch shape."""
    return {"id": new_line_id(), "custom_id": custom_id, "response": response, "error": error}


def failure_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """The line of a request that got no usable response (no connection, bad image, deadline)."""
    return output_line(custom_id, error={"code": code, "message": message})


def error_from_body(status: int, body: Any) -> dict[str, Any]:
    """`{"code", "message"}` from an error body.

    Takes the OpenAI/vLLM shape `{"error": {"message", "type", "code"}}`, older vLLM's flat
    `{"object": "error", "message", "type", "code"}`, and anything else as text.
    """
    detail: Any = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = body if isinstance(body, dict) and "message" in body else None
    if detail is None:
        text = body if isinstance(body, str) else ""
        return {"code": str(status), "message": text.strip()[:500] or f"HTTP {status}"}
    code = detail.get("code") or detail.get("type") or status
    message = detail.get("message") or f"HTTP {status}"
    return {"code": str(code), "message": str(message)}


def retry_after_s(headers: httpx.Headers) -> float | None:
    """Seconds a Retry-After header asks for (a number, or an HTTP date); None if absent."""
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": still GMT, but Python leaves it naive (local time)
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


def transport_reason(exc: BaseException) -> str:
    """Why a connection failed, in words: the OS's reason when one is in the chain
    (`connection refused`), rather than anyio's "All connection attempts failed"."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, OSError) and seen.strerror:
            return str(seen.strerror).lower()
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _usage(body: Any) -> dict[str, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return {}
    counts = {}
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if isinstance(value, int):
            counts[name] = value
    return counts


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def inline_images(body: dict[str, Any], resolve: Callable[[str], Path]) -> dict[str, Any]:
    """A copy of `body` whose local images (media-relative paths, `file://`) are `data:` URLs.

    resolve: turns a media-relative or absolute path into the file to read, raising ValueError
    or OSError for a path outside the media root or unreadable: that becomes ImageError, and
    the request fails alone. http(s) and data: urls pass through untouched.
    """
    urls = [image for image in image_urls(body) if local_image_path(image["url"]) is not None]
    if not urls:
        return body
    copy: dict[str, Any] = _deep_copy(body)
    for image in image_urls(copy):
        local = local_image_path(image["url"])
        if local is None:
            continue
        try:
            path = resolve(local)
            mime = image_mime(path)
            if mime is None:
                raise ImageError(f"image {local} is missing or not an image")
            data = base64.b64encode(path.read_bytes()).decode("ascii")
        except (OSError, ValueError) as exc:
            raise ImageError(str(exc)) from None
        image["url"] = f"data:{mime};base64,{data}"
    return copy


def _deep_copy(value: Any) -> Any:
    """A copy of a JSON value (dicts and lists copied, scalars shared)."""
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


class InferenceClient:
    """Sends batch requests to one OpenAI-compatible server. Use as an async context manager.

    endpoint: the server's base URL (`http://localhost:9999/v1`; the /v1 may be left out).
    concurrency: requests in flight at most (default 10). timeout_s: seconds per request.
    model: overrides every body's model; None keeps it, and a body without one gets the
    server's only model. resolve_image: media path -> file, for local images (None: refused).
    api_key: sent as `Authorization: Bearer <key>` with every request (vLLM's --api-key);
    None sends no header.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        concurrency: int = 10,
        timeout_s: float = 600.0,
        retry: RetryPolicy | None = None,
        model: str | None = None,
        resolve_image: Callable[[str], Path] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.root = server_root(endpoint)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.model = model
        self.resolve_image = resolve_image
        self._http: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._default_model: str | None = None
        self._model_lock = asyncio.Lock()
        self._backoff = wait_exponential_jitter(
            multiplier=self.retry.backoff_s,
            max=self.retry.backoff_max_s,
            jitter=self.retry.backoff_s,
        )

    async def __aenter__(self) -> InferenceClient:
        self._http = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=self.concurrency, max_keepalive_connections=self.concurrency
            ),
            # The semaphore bounds the requests; the pool never makes one wait on top.
            timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s), pool=None),
            headers=self._headers,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("use InferenceClient as `async with`")
        return self._http

    # --- the server ------------------------------------------------------------------------

    async def probe(self) -> str | None:
        """None when the server answers /health (else /v1/models) with 200; why not, if not."""
        try:
            health = await self.http.get(f"{self.root}/health", timeout=PROBE_TIMEOUT_S)
            if health.status_code == 200:
                return None
            if health.status_code != 404:
                return f"/health answered HTTP {health.status_code}"
            # No /health (not vLLM): an OpenAI-compatible server that lists models is up.
            models = await self.http.get(f"{self.endpoint}/models", timeout=PROBE_TIMEOUT_S)
            if models.status_code == 200:
                return None
            return f"/v1/models answered HTTP {models.status_code}"
        except httpx.TransportError as exc:
            return transport_reason(exc)

    async def wait_for_server(self, wait_s: float, poll_s: float = 0.5) -> None:
        """Return once the server answers; ServerUnavailable after `wait_s` seconds of trying."""
        deadline = time.monotonic() + wait_s
        while True:
            problem = await self.probe()
            if problem is None:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerUnavailable(
                    f"inference server {shown_url(self.endpoint)} did not come up in "
                    f"{wait_s:g} s: {problem}"
                )
            await asyncio.sleep(min(poll_s, left))

    async def served_models(self) -> list[str]:
        """The model ids the server lists at /v1/models."""
        response = await self.http.get(f"{self.endpoint}/models", timeout=PROBE_TIMEOUT_S)
        response.raise_for_status()
        data = response.json().get("data", [])
        return [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]

    async def default_model(self) -> str:
        """The server's only model (asked once); ValueError when it serves none or several."""
        async with self._model_lock:
            if self._default_model is None:
                models = await self.served_models()
                if len(models) != 1:
                    listed = ", ".join(models) or "none"
                    raise ValueError(
                        f"the request names no model and the server serves {listed}: "
                        "name one in the body or with --model"
                    )
                self._default_model = models[0]
            return self._default_model

    # --- requests --------------------------------------------------------------------------

    async def run(
        self,
        requests: Iterable[BatchRequest],
        on_outcome: Callable[[Outcome], None],
        should_stop: Callable[[], str | None] | None = None,
        stop_poll_s: float = 0.5,
    ) -> str | None:
        """Send every request, calling `on_outcome` for each as it finishes (in any order).

        should_stop: asked every `stop_poll_s` seconds; when it returns a reason, requests still
        in flight are abandoned (not reported) and run() returns that reason. None: all done.
        Requests are taken in order and at most twice `concurrency` are under way at once (in
        flight, backing off, or with their images read and waiting for a slot), so memory stays
        bounded however many are given.
        """
        queued = iter(requests)
        window = 2 * self.concurrency
        pending: set[asyncio.Task[Outcome]] = set()

        def top_up() -> None:
            for request in itertools.islice(queued, max(0, window - len(pending))):
                pending.add(asyncio.create_task(self.send(request)))

        last_check = time.monotonic()
        try:
            top_up()
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=stop_poll_s, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    on_outcome(task.result())
                top_up()
                if should_stop is not None and time.monotonic() - last_check >= stop_poll_s:
                    last_check = time.monotonic()
                    reason = should_stop()
                    if reason:
                        return reason
            return None
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def send(self, request: BatchRequest) -> Outcome:
        """One request, retried as the policy says; always an Outcome, never an exception."""
        try:
            body = await self._body(request)
        except ImageError as exc:
            return self._failure(request, "invalid_image", str(exc))
        except httpx.HTTPError as exc:  # asking /v1/models for the default model
            return self._failure(request, "model_lookup_failed", str(exc) or type(exc).__name__)
        except ValueError as exc:
            return self._failure(request, "model_required", str(exc))
        url = f"{self.root}{request.url}"
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.retry.max_retries + 1),
                wait=self._wait,
                retry=retry_if_exception_type(_Retryable),
                reraise=True,
            ):
                with attempt:
                    response = await self._post(url, body)
            return self._answered(request, response)
        except _Retryable as exc:
            if exc.response is not None:
                return self._answered(request, exc.response)
            assert exc.error is not None
            return self._failure(request, "connection_error", transport_reason(exc.error))
        except httpx.HTTPError as exc:  # not worth a retry (an undecodable body, say)
            return self._failure(request, "http_error", str(exc) or type(exc).__name__)

    async def _post(self, url: str, body: dict[str, Any]) -> httpx.Response:
        async with self._slots:
            try:
                response = await self.http.post(url, json=body)
            except httpx.TransportError as exc:
                raise _Retryable(error=exc) from exc
        if response.status_code in RETRY_STATUSES or response.status_code >= 500:
            raise _Retryable(response=response)
        return response

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the server sent one (at most backoff_max_s), else backoff + jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.response is not None:
            asked = retry_after_s(exc.response.headers)
            if asked is not None:
                return min(asked, self.retry.backoff_max_s)
        return float(self._backoff(state))

    async def _body(self, request: BatchRequest) -> dict[str, Any]:
        body = request.body
        if self.resolve_image is not None:
            body = inline_images(body, self.resolve_image)
        elif any(local_image_path(i["url"]) is not None for i in image_urls(body)):
            raise ImageError("local image paths need a media root to read them from")
        if self.model is not None:
            body = {**body, "model": self.model}
        elif not body.get("model"):
            body = {**body, "model": await self.default_model()}
        return body

    def _answered(self, request: BatchRequest, response: httpx.Response) -> Outcome:
        payload = _json_or_text(response)
        request_id = response.headers.get("x-request-id")
        if request_id is None and isinstance(payload, dict) and isinstance(payload.get("id"), str):
            request_id = payload["id"]
        data = {
            "status_code": response.status_code,
            "request_id": request_id or f"req_{uuid.uuid4().hex[:24]}",
            "body": payload,
        }
        if response.is_success and isinstance(payload, dict):
            line = output_line(request.custom_id, response=data)
            return Outcome(request.index, request.custom_id, line, False, _usage(payload))
        if response.is_success:
            error = {"code": "invalid_response", "message": "the server answered with no JSON"}
        else:
            error = error_from_body(response.status_code, payload)
        line = output_line(request.custom_id, response=data, error=error)
        return Outcome(request.index, request.custom_id, line, True)

    def _failure(self, request: BatchRequest, code: str, message: str) -> Outcome:
        line = failure_line(request.custom_id, code, message)
        return Outcome(request.index, request.custom_id, line, True)
