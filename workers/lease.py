"""Leases: a running job is owned by one attempt, and stays owned only while its worker lives.

A worker claims a job atomically (the record moves to running, the attempt number goes up, the
lease key is set with an expiry), then the process's one renewer thread renews the leases of all
the jobs the process runs, every third of their lifetime, in one round trip. When the worker
dies the lease expires, and the watchdog (workers/recovery.py) requeues the job. A delivery of
a job that is finished, cancelled, or leased by a live attempt is not run. Times come from the
Redis server's clock, so nodes with skewed clocks agree on expiry.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from gpujobs import keys

log = logging.getLogger(__name__)

# KEYS: job hash, job channel, lease key, leases zset.
# ARGV: worker, token, lease ms, node, gpu, job id, keys.STATE_INDEX_PREFIX (the job moves from
# its state's index to the running one).
# Returns {outcome, attempt[, record]}: outcome is "claimed" (then the record as it now is, as
# JSON), "missing", "leased" or a terminal state.
_CLAIM_LUA = """
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
local state = record['state']
if not state then return {'missing', '0'} end
local attempt = tonumber(record['attempt'] or '0')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  return {state, tostring(attempt)}
end
if state == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'leased', tostring(attempt)}
end
attempt = attempt + 1
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local set = {state = 'running', attempt = tostring(attempt), worker = ARGV[1], node = ARGV[4],
             gpu = ARGV[5], started_at = tostring(now), updated_at = tostring(now),
             percent = '0.0'}
local flat = {}
for k, v in pairs(set) do record[k] = v; table.insert(flat, k); table.insert(flat, v) end
redis.call('HSET', KEYS[1], unpack(flat))
local gone = {}  -- what an earlier attempt left; a first attempt has none of it
for _, k in ipairs({'error', 'eta_s', 'fps', 'speed', 'finished_at'}) do
  if record[k] then table.insert(gone, k); record[k] = nil end
end
if #gone > 0 then redis.call('HDEL', KEYS[1], unpack(gone)) end
if state ~= 'running' then
  local kind = record['kind'] or ''
  redis.call('ZREM', ARGV[7] .. kind .. ':' .. state, ARGV[6])
  redis.call('ZADD', ARGV[7] .. kind .. ':running', tonumber(record['created_at']) or 0, ARGV[6])
end
local lease = cjson.encode({attempt = attempt, worker = ARGV[1], token = ARGV[2]})
redis.call('SET', KEYS[3], lease, 'PX', ARGV[3])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]) / 1000, ARGV[6])
local encoded = cjson.encode(record)
redis.call('PUBLISH', KEYS[2], encoded)
return {'claimed', tostring(attempt), encoded}
"""

# KEYS: lease key, leases zset. ARGV: token, lease ms, job id. 1 when renewed, 0 when lost.
_RENEW_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw or cjson.decode(raw)['token'] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]) / 1000, ARGV[3])
return 1
"""

# KEYS: lease key, leases zset. ARGV: token, job id. Drops the lease if this token holds it.
_RELEASE_LUA = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['token'] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: "claimed" (run it, as `attempt`), or why not to run it."""

    outcome: str
    attempt: int
    token: str
    record: dict[str, str] | None = None  # the claimed record's fields, as the claim left it

    @property
    def claimed(self) -> bool:
        return self.outcome == "claimed"


class Leases:
    """The lease scripts on one Redis connection. lease_s: seconds a lease lasts (default 30)."""

    def __init__(self, client: redis.Redis, lease_s: float = 30.0) -> None:
        self.redis = client
        self.lease_ms = int(lease_s * 1000)
        self._claim = client.register_script(_CLAIM_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def claim(self, job_id: str, worker: str, node: str, gpu: str) -> Claim:
        token = uuid.uuid4().hex
        outcome, attempt, *rest = self._claim(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.lease(job_id), keys.LEASES],
            args=[worker, token, self.lease_ms, node, gpu, job_id, keys.STATE_INDEX_PREFIX],
        )
        record = json.loads(_text(rest[0])) if rest else None
        return Claim(outcome=_text(outcome), attempt=int(attempt), token=token, record=record)

    def renew(self, job_id: str, token: str) -> bool:
        renewed = self._renew(
            keys=[keys.lease(job_id), keys.LEASES], args=[token, self.lease_ms, job_id]
        )
        return bool(renewed)

    def renew_many(self, held: list[tuple[str, str]]) -> list[bool]:
        """Renew each (job id, token) lease in one pipelined round trip; which were renewed."""
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id, token in held:
                self._renew(
                    keys=[keys.lease(job_id), keys.LEASES],
                    args=[token, self.lease_ms, job_id],
                    client=pipe,
                )
            return [bool(result) for result in pipe.execute()]

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[keys.lease(job_id), keys.LEASES], args=[token, job_id])

    def holder(self, job_id: str) -> dict[str, Any] | None:
        """The live lease of a job (attempt, worker, token), or None."""
        raw = self.redis.get(keys.lease(job_id))
        return json.loads(raw) if raw else None


class LeaseRenewer:
    """One thread per worker process that renews the lease of every job the process runs.

    Every `lease_s / 3` seconds it renews all held leases in one pipelined round trip, so a
    process running N jobs costs one thread and N script calls per round, not N threads.
    A lease it cannot renew (the token is gone: the watchdog requeued the job, or another
    attempt owns it) has its `lost` event set and is dropped. The thread starts with the first
    lease held and lives as long as the process (a daemon); it is made anew after a fork.
    """

    def __init__(self, leases: Leases) -> None:
        self.leases = leases
        self.interval_s = leases.lease_ms / 1000 / 3
        self._held: dict[str, tuple[str, threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def hold(self, job_id: str, token: str) -> threading.Event:
        """Keep renewing `job_id`'s lease (claimed with `token`); the event is set if it is lost."""
        lost = threading.Event()
        with self._lock:
            self._held[job_id] = (token, lost)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="gpujobs-leases", daemon=True
                )
                self._thread.start()
        return lost

    def drop(self, job_id: str, token: str, release: bool = True) -> None:
        """Stop renewing `job_id`'s lease and release it (if this token still holds it);
        release=False when the job's final write dropped it already."""
        with self._lock:
            if self._held.get(job_id, ("",))[0] == token:
                del self._held[job_id]
        if not release:
            return
        with contextlib.suppress(redis.RedisError):  # if the broker is gone it expires by itself
            self.leases.release(job_id, token)

    def renew_all(self) -> None:
        """One round: renew every held lease in one round trip; flag and drop the lost ones."""
        with self._lock:
            held = list(self._held.items())
        if not held:
            return
        renewed = self.leases.renew_many([(job_id, token) for job_id, (token, _) in held])
        with self._lock:
            for (job_id, (token, lost)), ok in zip(held, renewed, strict=True):
                if not ok:
                    lost.set()
                    if self._held.get(job_id, ("",))[0] == token:
                        del self._held[job_id]

    def _run(self) -> None:
        stop = threading.Event()  # never set: the thread lives as long as the process
        while not stop.wait(self.interval_s):
            try:
                self.renew_all()
            except redis.RedisError:
                continue  # the broker dropped: try again next round, the lease has slack
            except Exception:  # a renewer that dies would let every lease of the process lapse
                log.exception("lease renewal round failed")


class LeaseKeeper:
    """Holds one job's lease while the job runs; `lost` is set when it cannot be renewed.

    Use as a context manager around the work; the lease is released on exit. The renewing is
    done by the process's one `LeaseRenewer` (made on first use), not by a thread per job.
    """

    def __init__(self, leases: Leases, job_id: str, token: str) -> None:
        self.renewer = renewer_for(leases)
        self.job_id = job_id
        self.token = token
        self.lost = threading.Event()
        # Set by the owner when its own final write (JobStore.update with its attempt) dropped
        # the lease already: leaving the block then costs no round trip.
        self.released = False

    def __enter__(self) -> LeaseKeeper:
        self.lost = self.renewer.hold(self.job_id, self.token)
        return self

    def __exit__(self, *exc: object) -> None:
        self.renewer.drop(self.job_id, self.token, release=not self.released)


_renewers: dict[tuple[int, int], LeaseRenewer] = {}
_renewers_lock = threading.Lock()


def renewer_for(leases: Leases) -> LeaseRenewer:
    """The renewer of this process for `leases` (one per process and Leases object)."""
    key = (os.getpid(), id(leases))
    with _renewers_lock:
        renewer = _renewers.get(key)
        if renewer is None or renewer.leases is not leases:
            renewer = _renewers[key] = LeaseRenewer(leases)
        return renewer


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
