"""Leases: a running job is owned by one attempt, and stays owned only while its worker lives.

A worker claims a job atomically (the record moves to running, the attempt number goes up, the
lease key is set with an expiry), then a keeper thread renews the lease every third of its
lifetime. When the worker dies the lease expires, and the watchdog (workers/recovery.py) requeues
the job. A delivery of a job that is finished, cancelled, or leased by a live attempt is not run.
Times come from the Redis server's clock, so nodes with skewed clocks agree on expiry.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from gpujobs import keys

# KEYS: job hash, job channel, lease key, leases zset.
# ARGV: worker, token, lease ms, node, gpu, job id.
# Returns {outcome, attempt}: outcome is "claimed", "missing", "leased" or a terminal state.
_CLAIM_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', '0'} end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt') or '0')
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then
  return {state, tostring(attempt)}
end
if state == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'leased', tostring(attempt)}
end
attempt = attempt + 1
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], 'state', 'running', 'attempt', tostring(attempt),
           'worker', ARGV[1], 'node', ARGV[4], 'gpu', ARGV[5], 'started_at', tostring(now),
           'updated_at', tostring(now), 'percent', '0.0')
redis.call('HDEL', KEYS[1], 'error', 'eta_s', 'fps', 'speed', 'finished_at')
local lease = cjson.encode({attempt = attempt, worker = ARGV[1], token = ARGV[2]})
redis.call('SET', KEYS[3], lease, 'PX', ARGV[3])
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]) / 1000, ARGV[6])
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
redis.call('PUBLISH', KEYS[2], cjson.encode(record))
return {'claimed', tostring(attempt)}
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
        outcome, attempt = self._claim(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.lease(job_id), keys.LEASES],
            args=[worker, token, self.lease_ms, node, gpu, job_id],
        )
        return Claim(outcome=_text(outcome), attempt=int(attempt), token=token)

    def renew(self, job_id: str, token: str) -> bool:
        renewed = self._renew(
            keys=[keys.lease(job_id), keys.LEASES], args=[token, self.lease_ms, job_id]
        )
        return bool(renewed)

    def release(self, job_id: str, token: str) -> None:
        self._release(keys=[keys.lease(job_id), keys.LEASES], args=[token, job_id])

    def holder(self, job_id: str) -> dict[str, Any] | None:
        """The live lease of a job (attempt, worker, token), or None."""
        raw = self.redis.get(keys.lease(job_id))
        return json.loads(raw) if raw else None


class LeaseKeeper:
    """Renews one job's lease from a thread while the job runs; `lost` is set when it cannot.

    Use as a context manager around the work; the lease is released on exit.
    """

    def __init__(self, leases: Leases, job_id: str, token: str) -> None:
        self.leases = leases
        self.job_id = job_id
        self.token = token
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        interval_s = self.leases.lease_ms / 1000 / 3
        while not self._stop.wait(interval_s):
            try:
                renewed = self.leases.renew(self.job_id, self.token)
            except redis.RedisError:
                continue  # the broker dropped: try again next round, the lease has slack
            if not renewed:
                self.lost.set()
                return

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # if the broker is gone it expires by itself
            self.leases.release(self.job_id, self.token)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
