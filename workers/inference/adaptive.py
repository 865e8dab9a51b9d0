"""Concurrency that follows the server: AIMD over one window shared through Redis.

A fixed number of requests in flight per chunk is wrong as soon as two chunks, two batches or
other clients share one vLLM: requests pile up in vLLM's queue and latency grows while
throughput does not. So every client (one per running chunk) that sends to one server shares
one *window* (the total requests in flight), kept in Redis (keys.ENDPOINT_WINDOW), and holds
an equal share of it.

Each client ticks every `interval_s` (0.25 s by default) and reads the server's load:

- vLLM's `/metrics` (Prometheus text, parsed by prometheus-client's parser):
  `vllm:num_requests_waiting` and `vllm:num_requests_running`, summed over models;
- without /metrics (another OpenAI-compatible server): the answers' latency, a queue being
  latency above 1.5 times the lowest seen;
- 429 and 503 answers since its last tick.

Then it proposes, and a Lua script applies at most one change per `interval_s` per server
(clients reading the same overload cut the window once, not once each):

- *multiplicative decrease* when 429/503 come back (x0.75) or requests have waited in the
  server for a round trip (a queue that a client left behind when its share shrank drains by
  itself within one): by the number waiting, at least 1 and at most a quarter, then held for
  8 steps (a step: the longer of the interval and the round trip);
- *additive increase* (+1 per step) while nothing waits and this client's requests found every slot
  of its share taken (there is demand: growing an unused window would only store up a
  later burst);
- no change otherwise.

The window starts at the spec's max_concurrency (the server's --max-num-seqs, if known) and
stays within [1, `ceiling`] (default 4x the start, at least 64). A client's share is the
window divided between the live clients (an expiring member each in keys.ENDPOINT_CLIENTS),
the remainder going to the first ones, so the shares add up to the window exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
import uuid
from dataclasses import dataclass

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from gpujobs import keys
from workers.inference.client import Slots

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
DECREASE = 0.75  # the multiplicative step
QUEUE_LATENCY = 1.5  # latency over the lowest seen that reads as a queue (no /metrics)
QUEUE_TOLERANCE = 0.0  # requests waiting, per request running, that are not cut back

# KEYS: window hash, clients zset. ARGV: action (inc|dec|keep), interval s, start, ceiling,
# client token, client ttl s, key ttl s, excess (requests waiting; 0: cut by DECREASE), the
# requests' latency s. The step is the longer of the interval and the latency (one change
# per round trip: the requests in flight when the window was cut still wait a round trip).
# A decrease applies unless another came less than a step ago (clients that see one overload
# cut once); an increase, unless the window changed less than a step ago or was cut less
# than 4 steps ago (server time). Registers the client and drops the clients
# that stopped ticking. Returns {window, clients, rank of this client}.
_TICK_LUA = """
local HOLD = 8
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(redis.call('HGET', KEYS[1], 'window') or ARGV[3])
local changed = tonumber(redis.call('HGET', KEYS[1], 'changed') or '0')
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut') or '0')
local interval = math.max(tonumber(ARGV[2]), tonumber(ARGV[9]))
local action = ARGV[1]
if action == 'dec' and now - cut >= interval then
  local target = math.floor(window * 0.75)
  local excess = tonumber(ARGV[8])
  if excess > 0 then target = math.max(target, window - math.ceil(excess)) end
  window = math.max(1, math.min(window - 1, target))
  changed = now
  cut = now
elseif action == 'inc' and now - changed >= interval and now - cut >= HOLD * interval then
  window = math.min(tonumber(ARGV[4]), window + 1)
  changed = now
end
redis.call('HSET', KEYS[1], 'window', window, 'changed', changed, 'cut', cut)
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local rank = 0
for i, member in ipairs(members) do
  if member == ARGV[5] then rank = i - 1 end
end
return {window, #members, rank}
"""


def endpoint_id(endpoint: str) -> str:
    """A short stable id of a server's base URL (the /v1 and a trailing slash ignored)."""
    base = endpoint.rstrip("/").removesuffix("/v1")
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def share_of(window: int, clients: int, rank: int) -> int:
    """Client `rank`'s part of `window` split between `clients` (the remainder to the first)."""
    clients = max(1, clients)
    return max(1, window // clients + (1 if rank < window % clients else 0))


@dataclass(frozen=True)
class ServerLoad:
    """What the server reports: requests running and waiting (None: no /metrics)."""

    running: float | None
    waiting: float | None


def parse_vllm_metrics(text: str) -> ServerLoad:
    """Running and waiting requests from vLLM's /metrics, summed over its models."""
    running = waiting = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == RUNNING:
                running = (running or 0.0) + sample.value
            elif sample.name == WAITING:
                waiting = (waiting or 0.0) + sample.value
    return ServerLoad(running, waiting)


class AdaptiveConcurrency:
    """One client's side of a server's shared window. `run(slots)` ticks until cancelled,
    setting the client's slots to its share; `answered()` hears every answer (its status,
    None for no answer, and its latency in seconds).

    redis_client: where the window lives. endpoint: the server's base URL. start: the window
    the first client starts (the spec's max_concurrency). ceiling: the largest window (default
    4x start, at least 64). interval_s: seconds between ticks, also the least time between two
    changes.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        http: httpx.AsyncClient,
        endpoint: str,
        start: int,
        ceiling: int | None = None,
        interval_s: float = 0.25,
        api_key: str | None = None,
    ) -> None:
        self.redis = redis_client
        self.http = http
        self.metrics_url = endpoint.rstrip("/").removesuffix("/v1") + "/metrics"
        self.id = endpoint_id(endpoint)
        self.start = max(1, start)
        self.ceiling = max(self.start, ceiling or max(64, 4 * self.start))
        self.interval_s = interval_s
        self.token = uuid.uuid4().hex
        self.share = self.start
        self.window = self.start
        self._overloaded = False  # a 429/503 since the last tick
        self._latencies: list[float] = []
        self._lowest = math.inf
        self.latency_s = math.inf  # a moving average of the answers' latency (the round trip)
        self._waiting_since: float | None = None  # when the server's queue was first seen
        self._has_metrics = True
        self._tick = redis_client.register_script(_TICK_LUA)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else None

    def answered(self, status: int | None, latency_s: float) -> None:
        if status in (429, 503):
            self._overloaded = True
        elif status is not None and status < 500:
            self._latencies.append(latency_s)
            if math.isinf(self.latency_s):
                self.latency_s = latency_s
            self.latency_s += 0.1 * (latency_s - self.latency_s)

    async def load(self) -> ServerLoad:
        """The server's /metrics, read; ServerLoad(None, None) when it has none."""
        if not self._has_metrics:
            return ServerLoad(None, None)
        try:
            answer = await self.http.get(self.metrics_url, timeout=2.0, headers=self._headers)
        except httpx.HTTPError:
            return ServerLoad(None, None)
        if answer.status_code == 404:
            self._has_metrics = False  # not vLLM: latency alone tells
            log.info("%s has no /metrics: concurrency follows latency", self.metrics_url)
        if answer.status_code != 200:
            return ServerLoad(None, None)
        try:
            return parse_vllm_metrics(answer.text)
        except ValueError:
            return ServerLoad(None, None)

    @property
    def step_s(self) -> float:
        """The least time between two changes: the longer of the interval and a round trip."""
        rtt = 0.0 if math.isinf(self.latency_s) else min(self.latency_s, 30.0)
        return max(self.interval_s, rtt)

    def decide(self, load: ServerLoad, saturated: bool) -> tuple[str, float]:
        """(inc, dec or keep; the requests in excess, 0 when unknown) from the server's load
        and what this client saw (`saturated`: one of its requests found every slot taken
        since the last tick)."""
        overloaded, self._overloaded = self._overloaded, False
        latencies, self._latencies = self._latencies, []
        if latencies:
            self._lowest = min(self._lowest, min(latencies))
        if overloaded:
            return "dec", 0.0
        if load.waiting is not None:
            # A queue of a tenth of what runs (at least 1) costs each waiting request only a
            # fraction of a round trip and covers the clients' own gaps; more is cut back.
            tolerated = QUEUE_TOLERANCE * (load.running or 0.0)
            if load.waiting > tolerated:
                # Cut only a queue that lasts a round trip: one a client left behind when its
                # share shrank (another joined) drains by itself within one.
                now = time.monotonic()
                if self._waiting_since is None:
                    self._waiting_since = now
                if now - self._waiting_since >= self.step_s:
                    self._waiting_since = None
                    return "dec", load.waiting - tolerated
                return "keep", 0.0
            self._waiting_since = None
            if load.waiting >= 1:
                return "keep", 0.0
        elif latencies:  # no metrics: latency well over the lowest seen is a queue
            typical = sorted(latencies)[len(latencies) // 2]
            if typical > QUEUE_LATENCY * self._lowest:
                return "dec", 0.0
        # Nothing waits: grow while this client uses its whole share (there is demand).
        return ("inc" if saturated else "keep"), 0.0

    def tick(self, action: str, excess: float = 0.0) -> int:
        """Apply `action` to the shared window (at most one change per interval for all
        clients; a decrease by the `excess` waiting, at most by DECREASE); this client's share
        of the window."""
        ttl = max(5, int(self.interval_s * 20))
        rtt = 0.0 if math.isinf(self.latency_s) else min(self.latency_s, 30.0)
        window, clients, rank = self._tick(
            keys=[keys.endpoint_window(self.id), keys.endpoint_clients(self.id)],
            args=[action, self.interval_s, self.start, self.ceiling, self.token, ttl, 3600,
                  excess, rtt],
        )  # fmt: skip
        self.window = int(window)
        self.share = share_of(self.window, int(clients), int(rank))
        return self.share

    def leave(self) -> None:
        """This client stops sending: its share goes back to the others at their next tick."""
        with contextlib.suppress(redis.RedisError):
            self.redis.zrem(keys.endpoint_clients(self.id), self.token)

    async def join(self, slots: Slots) -> None:
        """Register with the server's window and set `slots` to this client's share."""
        await slots.set_limit(await asyncio.to_thread(self.tick, "keep"))

    async def run(self, slots: Slots) -> None:
        """Tick until cancelled, setting `slots` to this client's share after each tick."""
        try:
            await self.join(slots)
            while True:
                await asyncio.sleep(self.interval_s)
                load = await self.load()
                saturated, slots.saturated = slots.saturated, False
                action, excess = self.decide(load, saturated)
                try:
                    share = await asyncio.to_thread(self.tick, action, excess)
                except redis.RedisError as exc:  # keep the last share; the next tick retries
                    log.warning("adaptive concurrency: %s", exc)
                    continue
                await slots.set_limit(share)
        finally:
            self.leave()
