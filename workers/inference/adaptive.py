"""Concurrency that follows the server: AIMD over one window shared through Redis.

A fixed number of requests in flight per chunk is wrong as soon as two chunks, two batches or
other clients share one vLLM: requests pile up in vLLM's queue and latency grows while
throughput does not. So every client (one per running chunk) that sends to one server shares
one *window* (the total requests in flight), kept in Redis (keys.ENDPOINT_WINDOW), and holds
a share of it.

Each client ticks every `interval_s` (0.25 s by default; a quarter of that while the shares
move) and reads the server's load:

- vLLM's `/metrics` (Prometheus text, parsed by prometheus-client's parser):
  `vllm:num_requests_waiting` and `vllm:num_requests_running`, summed over models;
- without /metrics (another OpenAI-compatible server): the answers' latency, a queue being
  latency above 1.5 times the lowest seen;
- 429 and 503 answers since its last tick.

Then it proposes, and a Lua script applies (clients reading the same overload change the
window once, not once each; a step is the longer of the interval and the round trip):

- *set to what the server takes* when any request waits in it: the server then runs all it
  can, so it takes `running`; a larger window comes down to that at once, and that window is
  remembered as the server's size (the largest such reading: one taken as a request leaves
  and the next is not yet let in is one short). Nothing is left waiting on purpose: a request
  kept queued at the server would hide the clients' turnaround (0.978 of C/L instead of
  0.969) but adds its wait to every answer (p95 1.25 L instead of 1.00 L; docs/benchmarks.md);
- *multiplicative decrease* when 429/503 come back (x0.75), or when a queue lasts two steps
  after the window last came down (clients that are not ours fill it, or the server takes
  less than it did): by the number waiting, at least 1 and at most a quarter, the known size
  lowered with it;
- *additive increase* (+1 per step) while nothing waits and this client's requests found every
  slot of its share taken (there is demand: growing an unused window would only store up a
  later burst): up to the server's known size at once, above it one probe every 40 steps
  (the server may have grown; a probe that finds a queue is set back at the next tick);
  with no size known, not within 8 steps of a cut;
- no change otherwise.

The window starts at the spec's max_concurrency (the server's --max-num-seqs, if known) and
stays within [1, `ceiling`] (default 4x the start, at least 64). It is split between the live
clients (an expiring member each in keys.ENDPOINT_CLIENTS) by *water-filling on demand*: each
client reports on its tick the requests it could send now (in flight and waiting for a slot;
keys.ENDPOINT_DEMANDS) and, in order of demand, gets the least of its demand and an equal part
of what is left (`water_fill`), so a client alone, or one whose partner is in its last
requests, gets the whole window. A part grows only as far as the others have let theirs go
(each holds the larger of its share and its requests in flight, updated on its tick), so the
shares never add up to more than the window and a new client does not queue requests on top
of the running ones: it starts with one slot and takes its part over a tick or two.
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

import aiohttp
import redis
from prometheus_client.parser import text_string_to_metric_families

from gpujobs import keys
from workers.inference.client import Slots
from workers.inference.transport import TRANSPORT_ERRORS, fetch

log = logging.getLogger(__name__)

WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
DECREASE = 0.75  # the multiplicative step
QUEUE_LATENCY = 1.5  # latency over the lowest seen that reads as a queue (no /metrics)
PROBE_STEPS = 40  # steps between two probes above the window the server showed it takes
HOLD_STEPS = 8  # steps after a cut before the window grows again (the server's size unknown)

# KEYS: window hash, clients zset, demands hash. ARGV: 1 action (inc|dec|set|keep), 2 interval
# s, 3 start, 4 ceiling, 5 client token, 6 client ttl s, 7 key ttl s, 8 for dec the requests
# waiting in excess (0: cut by DECREASE), for set the window the server takes, 9 the requests'
# latency s, 10 this client's demand (-1: unknown, as much as it gets), 11 the requests it has
# in flight, 12 HOLD_STEPS, 13 PROBE_STEPS. The step is the longer of the interval and the
# latency (one change per round trip: the requests in flight when the window was cut still
# wait a round trip).
# - set: the given size is remembered as `known` unless a larger one is (a reading taken as
#   one request leaves and the next is not yet let in shows one slot too few: readings never
#   lower it), and the window becomes at most `known` at once (an absolute number: clients
#   that see one queue agree);
# - dec: a decrease applies unless another came less than a step ago; one by a queue's
#   excess also lowers `known` to the new window (the server takes less than it did);
# - inc: +1 unless the window changed less than a step ago; when `known`, at once below it and
#   once every PROBE steps at or above it; otherwise not within HOLD steps of a cut.
# Then the clients that stopped ticking are dropped, this one registered with its demand, and
# the window split by water-filling on the demands (sorted, a demand over the window counting
# as the window and ties going by token, each gets the least of its demand and an equal part
# of what is left). This client's share is its part, at most what the others' holds leave of
# the window (a part taken from another is handed over at its next tick, so the shares never
# add up to more than the window); it holds the larger of its share and its requests in
# flight. Returns {window, clients, share, part, settled: 1 when every client holds its part
# and wants more (nothing moves until the window or a demand changes)}.
_TICK_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(redis.call('HGET', KEYS[1], 'window') or ARGV[3])
local changed = tonumber(redis.call('HGET', KEYS[1], 'changed') or '0')
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut') or '0')
local known = tonumber(redis.call('HGET', KEYS[1], 'known') or '0')
local step = math.max(tonumber(ARGV[2]), tonumber(ARGV[9]))
local action = ARGV[1]
if action == 'dec' and now - cut >= step then
  local target = math.floor(window * 0.75)
  local excess = tonumber(ARGV[8])
  if excess > 0 then target = math.max(target, window - math.ceil(excess)) end
  window = math.max(1, math.min(window - 1, target))
  changed = now
  cut = now
  if excess > 0 and known > window then known = window end
elseif action == 'set' then
  known = math.max(known, math.floor(tonumber(ARGV[8])))
  if window > known then
    window = known
    changed = now
    cut = now
  end
elseif action == 'inc' and now - changed >= step then
  local grow = now - cut >= tonumber(ARGV[12]) * step
  if known > 0 and window < known then grow = true
  elseif known > 0 then grow = now - changed >= tonumber(ARGV[13]) * step end
  if grow then
    window = math.min(tonumber(ARGV[4]), window + 1)
    changed = now
  end
end
redis.call('HSET', KEYS[1], 'window', window, 'changed', changed, 'cut', cut, 'known', known)
redis.call('EXPIRE', KEYS[1], ARGV[7])
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[3], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
local demand = tonumber(ARGV[10])
if demand < 0 then demand = window end
local members = redis.call('ZRANGE', KEYS[2], 0, -1)
local clients = {}
for _, member in ipairs(members) do
  local d, h = demand, 0
  if member ~= ARGV[5] then
    local row = redis.call('HGET', KEYS[3], member)
    d, h = window, 0
    if row then
      local sep = string.find(row, ' ')
      d, h = tonumber(string.sub(row, 1, sep - 1)), tonumber(string.sub(row, sep + 1))
    end
  end
  table.insert(clients, {member = member, demand = math.min(d, window), held = h})
end
table.sort(clients, function(a, b)
  if a.demand ~= b.demand then return a.demand < b.demand end
  return a.member < b.member
end)
local left = window
local part, others, settled = 0, 0, 1
for i, client in ipairs(clients) do
  local give = math.min(client.demand, math.floor(left / (#clients - i + 1)))
  left = left - give
  -- one that wants less than the window and gets all it wants is in its last requests
  if client.demand < window and client.demand <= give then settled = 0 end
  if client.member == ARGV[5] then
    part = give
  else
    others = others + client.held
    if client.held ~= give then settled = 0 end
  end
end
local share = math.max(0, math.min(part, window - others))
local held = math.max(share, tonumber(ARGV[11]))
if share ~= part or held ~= share then settled = 0 end
redis.call('HSET', KEYS[3], ARGV[5], demand .. ' ' .. held)
redis.call('EXPIRE', KEYS[3], ARGV[7])
return {window, #members, share, part, settled}
"""


def endpoint_id(endpoint: str) -> str:
    """A short stable id of a server's base URL (the /v1 and a trailing slash ignored)."""
    base = endpoint.rstrip("/").removesuffix("/v1")
    return hashlib.sha256(base.encode()).hexdigest()[:16]


def water_fill(window: int, demands: list[int]) -> list[int]:
    """The window split by demand, as the tick script splits it: in order of demand, each
    client gets the least of its demand and an equal part of what is left (the first ones get
    the smaller parts when it does not divide), so a client that wants less than an equal part
    leaves the rest to the others. Parts in the order of `demands`; they add up to at most the
    window, to all of it when the demands do."""
    demands = [min(demand, window) for demand in demands]  # more than all: ties keep order
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    parts = [0] * len(demands)
    left = window
    for done, index in enumerate(order):
        parts[index] = min(demands[index], left // (len(demands) - done))
        left -= parts[index]
    return parts


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
        http: aiohttp.ClientSession,
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
        self.share = self.part = self.start
        self.window = self.start
        self.clients = 1
        self.settled = True  # every client holds its part (else it ticks four times as often)
        self._overloaded = False  # a 429/503 since the last tick
        self._latencies: list[float] = []
        self._lowest = math.inf
        self.latency_s = math.inf  # a moving average of the answers' latency (the round trip)
        self._waiting_since: float | None = None  # when the server's queue was first seen
        self._came_down = -math.inf  # when this client last saw the window come down
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
            answer = await fetch(
                self.http, "GET", self.metrics_url, headers=self._headers, timeout_s=2.0
            )
        except TRANSPORT_ERRORS:
            return ServerLoad(None, None)
        if answer.status == 404:
            self._has_metrics = False  # not vLLM: latency alone tells
            log.info("%s has no /metrics: concurrency follows latency", self.metrics_url)
        if answer.status != 200:
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
        """(inc, dec, set or keep; for dec the requests in excess, 0 when unknown, for set the
        window the server takes) from the server's load and what this client saw
        (`saturated`: one of its requests found every slot taken since the last tick)."""
        overloaded, self._overloaded = self._overloaded, False
        latencies, self._latencies = self._latencies, []
        if latencies:
            self._lowest = min(self._lowest, min(latencies))
        if overloaded:
            return "dec", 0.0
        if load.waiting is not None:
            if load.waiting > 0:
                # Requests wait: the server runs all it can take, and takes what runs. A
                # window above that comes down to it at once; a queue that lasts two steps
                # after that (other clients of the server, not ours, fill it, or the server
                # takes less) is cut by its excess.
                now = time.monotonic()
                if self._waiting_since is None:
                    self._waiting_since = now
                # Counted from when the window last came down: its excess drains in a trip.
                if now - max(self._waiting_since, self._came_down) >= 2 * self.step_s:
                    self._waiting_since = None
                    return "dec", load.waiting
                takes = math.floor(load.running or 0.0)
                return ("set", float(takes)) if takes >= 1 else ("keep", 0.0)
            self._waiting_since = None
        elif latencies:  # no metrics: latency well over the lowest seen is a queue
            typical = sorted(latencies)[len(latencies) // 2]
            if typical > QUEUE_LATENCY * self._lowest:
                return "dec", 0.0
        # Nothing waits: grow while this client uses its whole share (there is demand).
        return ("inc" if saturated else "keep"), 0.0

    def tick(self, action: str, value: float = 0.0, demand: int = -1, active: int = 0) -> int:
        """Apply `action` to the shared window (at most one change per step for all clients;
        `value`: for dec the excess waiting, for set the window the server takes), register
        this client's `demand` (the requests it could send now; -1: unknown, as many as it
        gets) and `active` requests in flight; this client's share of the window (0 while
        the others still hold it all)."""
        ttl = max(5, int(self.interval_s * 20))
        rtt = 0.0 if math.isinf(self.latency_s) else min(self.latency_s, 30.0)
        window, clients, share, part, settled = self._tick(
            keys=[keys.endpoint_window(self.id), keys.endpoint_clients(self.id),
                  keys.endpoint_demands(self.id)],
            args=[action, self.interval_s, self.start, self.ceiling, self.token, ttl, 3600,
                  value, rtt, demand, active, HOLD_STEPS, PROBE_STEPS],
        )  # fmt: skip
        if int(window) < self.window:
            self._came_down = time.monotonic()
        self.window, self.clients = int(window), int(clients)
        self.share, self.part, self.settled = int(share), int(part), bool(settled)
        return self.share

    def leave(self) -> None:
        """This client stops sending: its share goes back to the others at their next tick."""
        with contextlib.suppress(redis.RedisError):
            pipe = self.redis.pipeline()
            pipe.zrem(keys.endpoint_clients(self.id), self.token)
            pipe.hdel(keys.endpoint_demands(self.id), self.token)
            pipe.execute()

    async def join(self, slots: Slots) -> None:
        """Register with the server's window and set `slots` to this client's share."""
        await slots.set_limit(await asyncio.to_thread(self.tick, "keep"))

    async def run(self, slots: Slots) -> None:
        """Tick until cancelled, setting `slots` to this client's share after each tick; every
        quarter interval while the shares move (a client joined, left or wants less than its
        part, or a share waits for another to let go)."""
        try:
            await self.join(slots)
            while True:
                await asyncio.sleep(self.interval_s if self.settled else self.interval_s / 4)
                load = await self.load()
                saturated, slots.saturated = slots.saturated, False
                action, value = self.decide(load, saturated)
                try:
                    share = await asyncio.to_thread(
                        self.tick, action, value, slots.demand, slots.active
                    )
                except redis.RedisError as exc:  # keep the last share; the next tick retries
                    log.warning("adaptive concurrency: %s", exc)
                    continue
                await slots.set_limit(share)
        finally:
            self.leave()
