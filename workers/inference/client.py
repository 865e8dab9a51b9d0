"""The batch client: sends requests to an OpenAI-compatible server (vLLM) with aiohttp
(workers/inference/transport.py says why not httpx).

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
import collections
import datetime
import email.utils
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ConfigDict, Field
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential_jitter,
)

from gpujobs.batch import image_urls, local_image_path
from workers.inference.slots import Slots
from workers.inference.transport import (
    TRANSPORT_ERRORS,
    Answer,
    closed_early,
    fetch,
    no_connection,
    open_session,
    os_reason,
)
from workers.inference.wire import (
    BadBody,
    ImageError,
    encode_body,
    error_from_body,
    failure_line,
    inline_images,
    output_line,
    parse_answer,
    safe_line,
    usage_of,
)

__all__ = ["Slots", "error_from_body", "failure_line", "output_line", "safe_line"]

log = logging.getLogger(__name__)
# Statuses worth another try: overload (429), a request timeout (408), and server-side errors.
RETRY_STATUSES = frozenset({408, 429})
PROBE_TIMEOUT_S = 5.0  # one /health or /v1/models probe
OUTAGE_POLL_S = 0.5  # how often a paused client asks a server that went away whether it is back


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


class _Retryable(Exception):
    """An attempt that may succeed if tried again: a retryable status, or no response.

    down: no connection could be made at all (refused, unreachable): the server is away, and
    the client pauses until it answers again rather than spending the request's retries.
    """

    def __init__(
        self,
        response: Answer | None = None,
        error: BaseException | None = None,
        down: bool = False,
    ) -> None:
        super().__init__(str(error) if error else f"HTTP {response and response.status}")
        self.response = response
        self.error = error
        self.down = down


class _Timeout(Exception):
    """A request that got no whole answer within the request timeout."""


class ModelLookupFailed(Exception):
    """The server's /v1/models could not be read (to find the model a body leaves out)."""


_JSON = {"Content-Type": "application/json"}


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


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds a Retry-After header asks for (a number, or an HTTP date); None if absent.
    headers: case-insensitive (an answer's)."""
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
    """Why a request got no answer, in words: the OS's reason when one is in the chain
    (`connection refused`), rather than the HTTP library's own wording."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "connect timed out"
    if isinstance(exc, TimeoutError | _Timeout):
        return "no answer in time"
    if closed_early(exc):
        return "the server closed the connection without a whole answer"
    return os_reason(exc) or str(exc) or type(exc).__name__


class InferenceClient:
    """Sends batch requests to one OpenAI-compatible server. Use as an async context manager.

    endpoint: the server's base URL (`http://localhost:9999/v1`; the /v1 may be left out).
    concurrency: requests in flight at most (default 10). timeout_s: seconds one request may
    take, its whole answer included (default 600). model: overrides every body's model; None
    keeps it, and a body without one gets the server's only model. resolve_image: media path
    -> file, for local images (None: refused). server_wait_s: seconds the client waits for a
    server that went away mid-batch to answer again before ServerUnavailable (default 120);
    meanwhile requests pause without spending their retries. on_waiting: told, about twice a
    second while the server is away, "waiting for URL: why, N s left" (None once it is back).
    api_key: sent as `Authorization: Bearer` (vLLM's --api-key).
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
        server_wait_s: float = 120.0,
        on_waiting: Callable[[str | None], None] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.root = server_root(endpoint)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.model = model
        self.resolve_image = resolve_image
        self.server_wait_s = server_wait_s
        self.on_waiting = on_waiting
        self.api_key = api_key
        # Told of every answer: its status (None: no answer) and latency in seconds (the
        # adaptive concurrency listens here).
        self.on_answer: Callable[[int | None, float], None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._slots = Slots(concurrency)
        self._default_model: str | None = None
        self._model_lock = asyncio.Lock()
        self._up = asyncio.Event()
        self._up.set()
        self._outage: asyncio.Task[None] | None = None
        self._gone: str | None = None  # why the server is given up on, once it is
        self.outages = 0  # times the server went away during run()
        self._backoff = wait_exponential_jitter(
            multiplier=self.retry.backoff_s,
            max=self.retry.backoff_max_s,
            jitter=self.retry.backoff_s,
        )

    async def __aenter__(self) -> InferenceClient:
        self._http = open_session(self.concurrency, self.timeout_s, self.api_key)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._outage is not None:
            self._outage.cancel()
            await asyncio.gather(self._outage, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("use InferenceClient as `async with`")
        return self._http

    # --- the server ------------------------------------------------------------------------

    async def probe(self) -> str | None:
        """None when the server answers /health (else /v1/models) with 200; why not, if not,
        naming the URL tried (`http://h:9999/v1/models answered HTTP 404`)."""
        health = f"{self.root}/health"
        try:
            answer = await fetch(self.http, "GET", health, timeout_s=PROBE_TIMEOUT_S)
            if answer.status == 200:
                return None
            if answer.status != 404:
                return f"{shown_url(health)} answered HTTP {answer.status}"
            # No /health (not vLLM): an OpenAI-compatible server that lists models is up.
            models = f"{self.endpoint}/models"
            answer = await fetch(self.http, "GET", models, timeout_s=PROBE_TIMEOUT_S)
            if answer.status == 200:
                return None
            return f"{shown_url(models)} answered HTTP {answer.status}"
        except TRANSPORT_ERRORS as exc:
            return transport_reason(exc)

    async def wait_for_server(self, wait_s: float, poll_s: float = 0.5) -> None:
        """Return once the server answers; ServerUnavailable after `wait_s` seconds of trying.
        Meanwhile `on_waiting` hears why it waits and for how much longer."""
        problem = await self._wait_until_up(wait_s, poll_s)
        if problem is not None:
            raise ServerUnavailable(
                f"inference server {shown_url(self.endpoint)} did not come up in "
                f"{wait_s:g} s: {problem}"
            )

    async def _wait_until_up(self, wait_s: float, poll_s: float) -> str | None:
        """Probe until the server answers (None) or `wait_s` passes (the last problem)."""
        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            problem = await self.probe()
            if problem is None:
                if waiting and self.on_waiting is not None:
                    self.on_waiting(None)
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return problem
            waiting = True
            if self.on_waiting is not None:
                self.on_waiting(
                    f"waiting for {shown_url(self.endpoint)}: {problem}, {max(0, left):.0f} s left"
                )
            await asyncio.sleep(min(poll_s, left))

    def _server_away(self) -> None:
        """A request found no server: pause every request until it answers again."""
        if self._up.is_set() and self._gone is None:
            self._up.clear()
            self.outages += 1
            log.warning("inference server %s went away; requests pause until it is back",
                        shown_url(self.endpoint))  # fmt: skip
            self._outage = asyncio.create_task(self._await_return())

    async def _await_return(self) -> None:
        problem = await self._wait_until_up(self.server_wait_s, OUTAGE_POLL_S)
        if problem is not None:
            self._gone = (
                f"inference server {shown_url(self.endpoint)} went away and did not come back "
                f"in {self.server_wait_s:g} s: {problem}"
            )
        else:
            log.warning("inference server %s is back", shown_url(self.endpoint))
        self._up.set()

    async def _server_here(self) -> None:
        """Wait while the server is away; ServerUnavailable once it is given up on."""
        await self._up.wait()
        if self._gone is not None:
            raise ServerUnavailable(self._gone)

    async def served_models(self) -> list[str]:
        """The model ids the server lists at /v1/models. ModelLookupFailed when it cannot be
        asked or does not answer 200; ValueError when the answer is not JSON."""
        url = f"{self.endpoint}/models"
        try:
            answer = await fetch(self.http, "GET", url, timeout_s=PROBE_TIMEOUT_S)
        except TRANSPORT_ERRORS as exc:
            raise ModelLookupFailed(f"{shown_url(url)}: {transport_reason(exc)}") from None
        if answer.status != 200:
            raise ModelLookupFailed(f"{shown_url(url)} answered HTTP {answer.status}")
        data = json.loads(answer.body).get("data", [])
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
        on_settled: Callable[[], None] | None = None,
    ) -> str | None:
        """Send every request, calling `on_outcome` for each as it finishes (in any order).

        should_stop: asked every `stop_poll_s` seconds; when it returns a reason, requests still
        in flight are abandoned (not reported) and run() returns that reason. None: all done.
        Requests are taken in order and at most twice `concurrency` are under way at once (in
        flight, backing off, or with their images read and waiting for a slot), so memory stays
        bounded however many are given. ServerUnavailable when the server went away for longer
        than `server_wait_s`.

        on_settled: called after each group of `on_outcome` calls that finished together
        (before run() awaits anything again, also when one of them raised), so that a caller
        may buffer outcomes and checkpoint each group in one write.
        """
        queued = iter(requests)
        pending: set[asyncio.Task[Outcome]] = set()
        # Finished tasks land here from their done callback: one wakeup per batch of finished
        # requests, not asyncio.wait's callbacks added to and removed from every pending task.
        finished: collections.deque[asyncio.Task[Outcome]] = collections.deque()
        wake = asyncio.Event()

        def landed(task: asyncio.Task[Outcome]) -> None:
            finished.append(task)
            wake.set()

        def top_up() -> None:
            window = 2 * max(self.concurrency, self._slots.limit)
            for request in itertools.islice(queued, max(0, window - len(pending))):
                task = asyncio.create_task(self.send(request))
                task.add_done_callback(landed)
                pending.add(task)

        last_check = time.monotonic()
        try:
            top_up()
            while pending:
                if not finished:
                    try:
                        async with asyncio.timeout(stop_poll_s):
                            await wake.wait()
                    except TimeoutError:
                        pass
                wake.clear()
                try:
                    while finished:
                        task = finished.popleft()
                        pending.discard(task)
                        on_outcome(task.result())
                finally:
                    if on_settled is not None:
                        on_settled()
                top_up()
                if should_stop is not None and time.monotonic() - last_check >= stop_poll_s:
                    last_check = time.monotonic()
                    reason = should_stop()
                    if reason:
                        return reason
            return None
        finally:
            for task in pending:
                task.remove_done_callback(landed)
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def send(self, request: BatchRequest) -> Outcome:
        """One request, retried as the policy says; an Outcome, never an exception but
        ServerUnavailable (the server went away for longer than `server_wait_s`).

        While the server is away (no connection can be made) the request pauses and its
        retries are not spent; a timeout, a dropped connection, 408, 429 and 5xx spend one.
        """
        try:
            body = await self._body(request)
            content = encode_body(body)
        except ImageError as exc:
            return self._failure(request, "invalid_image", str(exc))
        except ModelLookupFailed as exc:  # asking /v1/models for the default model
            return self._failure(request, "model_lookup_failed", str(exc))
        except BadBody as exc:
            return self._failure(request, "invalid_request", str(exc))
        except ValueError as exc:
            return self._failure(request, "model_required", str(exc))
        url = f"{self.root}{request.url}"
        tries = 0  # attempts that got an answer, a timeout or a dropped connection

        def spent(state: RetryCallState) -> bool:
            return tries > self.retry.max_retries

        try:
            async for attempt in AsyncRetrying(
                stop=spent,
                wait=self._wait,
                retry=retry_if_exception_type((_Retryable, _Timeout)),
                reraise=True,
            ):
                with attempt:
                    await self._server_here()
                    try:
                        response = await self._post(url, content)
                    except _Retryable as exc:
                        if exc.down:
                            self._server_away()
                        else:
                            tries += 1
                        raise
                    except _Timeout:
                        tries += 1
                        raise
            return self._answered(request, response)
        except _Timeout:
            return self._failure(
                request, "timeout", f"no answer within the request timeout "
                f"({self.timeout_s:g} s), {_tries(tries)}",
            )  # fmt: skip
        except _Retryable as exc:
            if exc.response is not None:
                return self._answered(request, exc.response)
            assert exc.error is not None
            reason = transport_reason(exc.error)
            return self._failure(request, "connection_error", f"{reason}, {_tries(tries)}")
        except aiohttp.ClientError as exc:  # not worth a retry (an undecodable body, say)
            return self._failure(request, "http_error", str(exc) or type(exc).__name__)

    @property
    def slots(self) -> Slots:
        """The bound on requests in flight (its limit may be moved while requests run)."""
        return self._slots

    async def _post(self, url: str, content: bytes) -> Answer:
        async with self._slots:
            started = time.monotonic()
            status: int | None = None
            try:
                response = await self._post_once(url, content)
                status = response.status
            finally:
                if self.on_answer is not None:
                    self.on_answer(status, time.monotonic() - started)
        if response.status in RETRY_STATUSES or response.status >= 500:
            raise _Retryable(response=response)
        return response

    async def _post_once(self, url: str, content: bytes) -> Answer:
        """One attempt; its failures sorted into the kinds that are retried."""
        try:
            # The whole answer within the timeout, however slowly the server trickles it.
            async with asyncio.timeout(self.timeout_s):
                return await fetch(self.http, "POST", url, content=content, headers=_JSON)
        except TRANSPORT_ERRORS as exc:
            if no_connection(exc):
                raise _Retryable(error=exc, down=True) from exc
            if isinstance(exc, TimeoutError):
                raise _Timeout() from exc
            raise _Retryable(error=exc) from exc

    def _wait(self, state: RetryCallState) -> float:
        """No wait after a server that went away (the pause is the wait); Retry-After when the
        server sent one (at most backoff_max_s); else backoff + jitter."""
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Retryable) and exc.down:
            return 0.0
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

    def _answered(self, request: BatchRequest, response: Answer) -> Outcome:
        payload, problem = parse_answer(response)
        request_id = response.headers.get("x-request-id")
        if request_id is None and isinstance(payload, dict) and isinstance(payload.get("id"), str):
            request_id = payload["id"]
        data = {
            "status_code": response.status,
            "request_id": request_id or f"req_{uuid.uuid4().hex[:24]}",
            "body": payload,
        }
        if response.ok and problem is None and isinstance(payload, dict):
            line = output_line(request.custom_id, response=data)
            return Outcome(request.index, request.custom_id, line, False, usage_of(payload))
        if response.ok:
            message = problem or "the server's answer is not a JSON object"
            error = {"code": "invalid_response", "message": message}
        else:
            error = error_from_body(response.status, payload)
        line = output_line(request.custom_id, response=data, error=error)
        return Outcome(request.index, request.custom_id, line, True)

    def _failure(self, request: BatchRequest, code: str, message: str) -> Outcome:
        line = failure_line(request.custom_id, code, message)
        return Outcome(request.index, request.custom_id, line, True)


def _tries(count: int) -> str:
    return f"{count} {'try' if count == 1 else 'tries'}"
