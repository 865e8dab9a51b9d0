"""HTTP for the batch client: one aiohttp session per chunk, and each answer read whole.

Why aiohttp and not httpx (which the producer side uses): the sender shares its node's cores
with the inference server, and every millisecond of CPU it spends per request is taken from
the server. Measured on this project's 2-core machine against the real vLLM CPU server
(scripts/bench_http_clients.py; docs/benchmarks.md, "Where issue 11 stands"): aiohttp spends
0.84 ms of CPU per chat request, httpx 4.0 ms and the `openai` package's default client
(httpx2) 2.2 ms, and aiohttp got the most requests/s out of the same server. The `openai`
package ships aiohttp as its own faster backend (`DefaultAioHttpClient`) for the same reason.

Everything aiohttp-specific stays here: the rest of the batch client sees an `Answer` (status,
headers, body read whole) and the two kinds of failure it sorts errors into.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

# A connection that could not be made at all (refused, unreachable, connect timed out): the
# server is away. ClientConnectorError covers refusals and name lookups; ConnectionTimeoutError
# a connect that got no answer.
NO_CONNECTION = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# What the transport may raise at all: aiohttp's own errors, and a timeout.
TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, read whole: status code, headers (case-insensitive), body (bytes), and
    the charset its Content-Type names (None: none named)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    charset: str | None = None

    @property
    def ok(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body as text: in its charset (UTF-8 when none is named, or one Python does not
        know), undecodable bytes replaced with U+FFFD."""
        try:
            return self.body.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


def open_session(
    concurrency: int, timeout_s: float, api_key: str | None = None
) -> aiohttp.ClientSession:
    """A session for one chunk, made inside the running event loop.

    concurrency: connections kept alive for reuse (the requests in flight). timeout_s: the most
    seconds a connect may take is the lesser of 10 and this; the whole answer's limit is the
    caller's (asyncio.timeout), since aiohttp's read timeout is per read. api_key: sent as
    `Authorization: Bearer` on every request.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return aiohttp.ClientSession(
        # No cap on connections: the caller's slots bound the requests in flight, and the
        # pool never makes one wait on top.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, timeout_s)),
        headers=headers,
        raise_for_status=False,
    )


async def fetch(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> Answer:
    """One request, its answer read whole. timeout_s: seconds for the whole answer (None: the
    session's limits only). Raises aiohttp.ClientError or TimeoutError (TRANSPORT_ERRORS)."""
    if timeout_s is None:
        request = session.request(method, url, data=content, headers=headers)
    else:
        limit = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(10.0, timeout_s))
        request = session.request(method, url, data=content, headers=headers, timeout=limit)
    async with request as response:
        body = await response.read()
        return Answer(response.status, response.headers, body, response.charset)


def no_connection(exc: BaseException) -> bool:
    """The request could not reach the server at all (refused, unreachable, connect timed out)."""
    return isinstance(exc, NO_CONNECTION)


def closed_early(exc: BaseException) -> bool:
    """The server dropped the connection before its whole answer."""
    return isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError)


def os_reason(exc: BaseException) -> str | None:
    """The operating system's reason for a failed connection, in words (`connection refused`),
    from the first OSError in the exception's chain; None when there is none."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()
        if isinstance(seen, OSError) and seen.strerror:
            return str(seen.strerror).lower()
        seen = seen.__cause__ or seen.__context__
    return None


__all__ = [
    "NO_CONNECTION",
    "TRANSPORT_ERRORS",
    "Answer",
    "closed_early",
    "fetch",
    "no_connection",
    "open_session",
    "os_reason",
]
