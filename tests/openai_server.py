"""A real HTTP server that speaks the OpenAI routes vLLM serves, for tests and the benchmark.

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, /v1/completions, /v1/embeddings;
GET /metrics (vllm:num_requests_running and vllm:num_requests_waiting, in vLLM's Prometheus
text); GET /_stats (requests, peak, violations, rejected, latencies) for a client in another
process.
Knobs, settable while it runs:

- latency_s: seconds each successful request takes (a sleep in its own thread);
- capacity: requests it serves at once (vLLM's --max-num-seqs); one more waits for a place
  when `queue` is set (vLLM's scheduler: latency grows, throughput does not), else is answered
  429 when `enforce` is set, else served and counted in `violations` (`peak` keeps the
  highest);
- faults: per request key, what successive attempts get before one succeeds: an HTTP status
  (429 carries Retry-After: `retry_after_s`) or a misbehaviour (MISBEHAVIOURS: "disconnect"
  closes the socket with no answer, "hang" never answers, "trickle" sends headers then a byte
  a second forever, "truncate" closes halfway through the body, "garbage" answers 200 with
  bytes that are not JSON, "surrogate" answers JSON whose text holds an escape that is no
  Unicode character, "nan" answers with NaN in the JSON, "sse" answers as a stream);
  permanent: per key, what every attempt gets;
- healthy: False answers /health with 503 (a server still loading its model);
- go_away() closes the listening socket and every open connection (a server that stopped),
  come_back() listens again on the same port.

Errors have vLLM's shape: `{"error": {"message", "type", "code"}}`. A request's key is its text:
the last chat message's text, the prompt, or the embedding input. Every request is logged
(`log`) with its key, status and outcome, so a test can count what was sent.

Run standalone for the benchmark: `python -m tests.openai_server --latency 0.05 --capacity 10`
prints `listening <base url>` and serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Fault = int | str  # an HTTP status, or one of MISBEHAVIOURS
MISBEHAVIOURS = ("disconnect", "hang", "trickle", "truncate", "garbage", "surrogate", "nan", "sse")
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class LogEntry:
    """One request as the server saw it. outcome: ok, error, rejected (over capacity), one of
    MISBEHAVIOURS, or dropped (answered, but the connection was gone: the server went away).
    images: the image urls of a chat request."""

    path: str
    key: str
    model: str | None
    status: int | None
    outcome: str
    started: float
    images: list[str] = field(default_factory=list)
    finished: float = 0.0  # when it was logged; finished - started includes any queueing


def request_key(path: str, body: dict[str, Any]) -> str:
    """The text that names a request: last chat message's text, prompt, or embedding input."""
    if path == "/v1/chat/completions":
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        return str(content)
    value = body.get("prompt") if path == "/v1/completions" else body.get("input")
    if isinstance(value, list):
        value = value[0] if value else ""
    return str(value)


def _image_urls(body: dict[str, Any]) -> list[str]:
    urls = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image_url":
                    urls.append(part["image_url"]["url"])
    return urls


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog, read when the socket starts listening: the default 5 drops the SYNs
    # of clients that open 10 connections at once, and each dropped one costs a 1 s resend.
    request_queue_size = 256


class FakeOpenAI:
    """The server; `start()` binds a free port on 127.0.0.1 and serves from a thread."""

    def __init__(
        self,
        latency_s: float = 0.0,
        capacity: int | None = None,
        enforce: bool = True,
        models: tuple[str, ...] = ("fake-model",),
        retry_after_s: float | None = 0.05,
        embedding_dim: int = 8,
        api_key: str | None = None,
        queue: bool = False,
    ) -> None:
        # Like vLLM's --api-key: every /v1 route wants `Authorization: Bearer <key>`.
        self.api_key = api_key
        self.latency_s = latency_s
        self.capacity = capacity
        self.enforce = enforce
        self.models = models
        self.retry_after_s = retry_after_s
        self.embedding_dim = embedding_dim
        self.queue = queue
        self.waiting = 0
        self.peak_waiting = 0  # the most requests that waited at once (with `queue`)
        self.healthy = True
        self.faults: dict[str, list[Fault]] = {}
        self.permanent: dict[str, Fault] = {}
        self.log: list[LogEntry] = []
        self.in_flight = 0
        self.peak = 0
        self.violations = 0
        self._lock = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.on_request: Callable[[LogEntry], None] | None = None
        self._port = 0
        self._connections: set[socket.socket] = set()
        self.stopping = threading.Event()  # set by stop(): hanging handlers give up

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", port or self._port), handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.go_away()

    def go_away(self) -> None:
        """Stop listening and cut every open connection, as a server that stopped does: a
        request in flight is never answered, a new one is refused."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def come_back(self) -> None:
        """Listen again on the same port (a restarted server)."""
        self.start(self._port)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root(self) -> str:
        assert self._port, "start() the server first"
        return f"http://127.0.0.1:{self._port}"  # the same while away (go_away) and after

    @property
    def url(self) -> str:
        """The OpenAI base URL (`http://127.0.0.1:PORT/v1`)."""
        return f"{self.root}/v1"

    # --- what tests read ----------------------------------------------------------------------

    def entries(self, outcome: str | None = None) -> list[LogEntry]:
        with self._lock:
            return [e for e in self.log if outcome is None or e.outcome == outcome]

    def served(self) -> dict[str, int]:
        """Key -> how many times it was answered 200."""
        counts: dict[str, int] = {}
        for entry in self.entries("ok"):
            counts[entry.key] = counts.get(entry.key, 0) + 1
        return counts

    def wait_for(self, predicate: Callable[[FakeOpenAI], bool], timeout_s: float = 30.0) -> None:
        """Block until `predicate(self)` holds (checked on every logged request)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"server condition not met in {timeout_s} s")
                self._lock.wait(left)

    # --- serving ------------------------------------------------------------------------------

    def latencies(self) -> list[float]:
        """Seconds from arrival to answer of every request answered 200 (queueing included)."""
        return [e.finished - e.started for e in self.entries("ok")]

    def metrics(self) -> str:
        """Requests running and waiting, as vLLM's /metrics writes them (Prometheus text)."""
        with self._lock:
            running, waiting = self.in_flight, self.waiting
        labels = '{engine="0",model_name="' + self.models[0] + '"}'
        return (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
        )

    def _record(self, entry: LogEntry) -> None:
        entry.finished = time.time()
        with self._lock:
            self.log.append(entry)
            self._lock.notify_all()
        if self.on_request is not None:
            self.on_request(entry)

    def _enter(self) -> bool:
        """Count a request in; False when it is over capacity and must be refused. With
        `queue`, one over capacity waits for a place instead, as in vLLM's scheduler."""
        with self._lock:
            if self.queue and self.capacity is not None:
                self.waiting += 1
                self.peak_waiting = max(self.peak_waiting, self.waiting)
                while self.in_flight >= self.capacity:
                    self._lock.wait()
                self.waiting -= 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            if self.capacity is not None and self.in_flight > self.capacity:
                self.violations += 1
                if self.enforce:
                    self.in_flight -= 1
                    return False
            return True

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._lock.notify_all()

    def _next_fault(self, key: str) -> Fault | None:
        with self._lock:
            if key in self.permanent:
                return self.permanent[key]
            planned = self.faults.get(key)
            if planned:
                return planned.pop(0)
            return None


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    """An error as vLLM's OpenAI server writes it."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


ERROR_KINDS = {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequests",
               500: "InternalServerError", 503: "ServiceUnavailable"}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"  # keep-alive, as vLLM (uvicorn) serves
    # One segment per answer, sent at once: headers and body written separately, with Nagle on,
    # meet the client's delayed ACK and stall each answer ~40 ms (uvicorn does neither).
    wbufsize = 1 << 16
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # a client or go_away() cut the connection
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `fake.log`

    def _misbehave(self, fault: str, entry: LogEntry, key: str) -> None:
        """Answer as a broken server does (see MISBEHAVIOURS)."""
        fake = self.fake
        self.close_connection = True
        if fault == "disconnect":
            return  # the socket closes with no answer
        if fault == "hang":  # accept, read, never answer
            fake.stopping.wait()
            return
        chat = {"id": "chatcmpl-bad", "object": "chat.completion", "model": "fake-model",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "TEXT"}}]}  # fmt: skip
        text = json.dumps(chat)
        bodies = {
            "garbage": (b'{"id": "x", "choices": [\xff\xfe <html>', "application/json"),
            "surrogate": (text.replace("TEXT", "half an emoji \\ud83d").encode(),
                          "application/json"),
            "nan": (text.replace('"index": 0', '"index": 0, "logprob": NaN').encode(),
                    "application/json"),
            "sse": (b"data: " + text.encode() + b"\n\ndata: [DONE]\n\n", "text/event-stream"),
            "truncate": (text.encode(), "application/json"),
            "trickle": (text.encode(), "application/json"),
        }  # fmt: skip
        data, kind = bodies[fault]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "truncate":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return
        if fault == "trickle":  # a byte a second: each read is quick, the whole never comes
            for byte in data:
                if fake.stopping.wait(1.0):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        entry.status = 200
        self.wfile.write(data)
        self.wfile.flush()

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req-{uuid.uuid4().hex[:16]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)  # sent by the flush after the request is logged

    def _refused(self) -> bool:
        """Answer 401 as vLLM does when a key is set and this request lacks it."""
        key = self.fake.api_key
        if key is None or not self.path.startswith("/v1"):
            return False
        if self.headers.get("Authorization") == f"Bearer {key}":
            return False
        self._send(401, {"error": "Unauthorized"})
        return True

    def do_GET(self) -> None:
        if self._refused():
            return
        if self.path == "/health":
            self._send(200 if self.fake.healthy else 503, None)
        elif self.path == "/_stats":  # for a client in another process (the benchmark)
            fake = self.fake
            rejected = len(fake.entries("rejected"))
            self._send(200, {"requests": len(fake.log), "peak": fake.peak,
                             "violations": fake.violations, "rejected": rejected,
                             "latencies": fake.latencies()})  # fmt: skip
        elif self.path == "/metrics":
            data = self.fake.metrics().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        elif self.path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "vllm"} for m in self.fake.models]
            self._send(200, {"object": "list", "data": data})
        else:
            self._send(404, error_body(f"no route {self.path}", "NotFoundError", 404))

    def do_POST(self) -> None:
        fake = self.fake
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if self._refused():
            return
        started = time.time()
        if self.path not in ROUTES:
            self._send(404, error_body(f"no route {self.path}", "NotFoundError", 404))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self._send(400, error_body("body is not JSON", "BadRequestError", 400))
            return
        key = request_key(self.path, body)
        entry = LogEntry(self.path, key, body.get("model"), None, "", started,
                         _image_urls(body))  # fmt: skip
        if not fake._enter():
            entry.status, entry.outcome = 429, "rejected"
            fake._record(entry)
            self._send(429, error_body("too many concurrent requests", "TooManyRequests", 429))
            return
        try:
            fault = fake._next_fault(key)
            if isinstance(fault, str):
                fake._leave()
                entry.outcome = fault
                fake._record(entry)  # now: a hanging answer may never end
                with contextlib.suppress(OSError):
                    self._misbehave(fault, entry, key)
                return
            if isinstance(fault, int):
                entry.status, entry.outcome = fault, "error"
                headers = {}
                if fault == 429 and fake.retry_after_s is not None:
                    headers["Retry-After"] = f"{fake.retry_after_s:g}"
                kind = ERROR_KINDS.get(fault, "Error")
                status_body = error_body(f"injected {fault} for {key}", kind, fault)
                fake._leave()
                self._send(fault, status_body, headers)
                return
            if body.get("model") not in fake.models:
                entry.status, entry.outcome = 404, "error"
                fake._leave()
                message = f"The model `{body.get('model')}` does not exist."
                self._send(404, error_body(message, "NotFoundError", 404))
                return
            if fake.latency_s:
                time.sleep(fake.latency_s)
            entry.status, entry.outcome = 200, "ok"
            # Out of the count before the answer leaves: a client that sends its next request
            # on receipt must never be seen as one over capacity.
            fake._leave()
            self._send(200, self._answer(key, body))
        finally:
            if entry.outcome not in MISBEHAVIOURS:
                # Logged before the answer leaves, so that a client that has its answer finds
                # its request in the log.
                fake._record(entry)
                try:
                    self.wfile.flush()
                except OSError:  # the server went away (go_away) before the answer left
                    if entry.outcome == "ok":
                        entry.outcome = "dropped"
                    self.close_connection = True

    def _answer(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        created = int(time.time())
        model = body["model"]
        prompt_tokens = max(1, len(key.split()))
        if self.path == "/v1/embeddings":
            vector = [float((hash(key) >> i) & 0xFF) / 255 for i in range(self.fake.embedding_dim)]
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
            data = [{"object": "embedding", "index": 0, "embedding": vector}]
            return {"object": "list", "model": model, "data": data, "usage": usage}
        text = f"echo: {key}"
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 5,
                 "total_tokens": prompt_tokens + 5}  # fmt: skip
        if self.path == "/v1/completions":
            return {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "object": "text_completion",
                    "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                    "usage": usage}  # fmt: skip
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "object": "chat.completion",
                "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": usage}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per request")
    parser.add_argument("--capacity", type=int, default=10, help="requests served at once")
    parser.add_argument("--count-only", action="store_true", help="count, do not refuse, excess")
    parser.add_argument("--queue", action="store_true", help="queue the excess, as vLLM does")
    args = parser.parse_args()
    fake = FakeOpenAI(latency_s=args.latency, capacity=args.capacity,
                      enforce=not args.count_only, queue=args.queue)  # fmt: skip
    fake.start(args.port)
    print(f"listening {fake.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        print(json.dumps({"peak": fake.peak, "violations": fake.violations,
                          "requests": len(fake.log)}), flush=True)  # fmt: skip
        fake.stop()


if __name__ == "__main__":
    main()
