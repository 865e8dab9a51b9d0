"""A batch's state in Redis: per-chunk checkpoints, the batch's counters and chunk leases.

Each change is one Lua script, so a checkpoint and the counters it moves are written together:
a restarted chunk resends nothing that finished and counts nothing twice, and a chunk lease is
taken, renewed and released only by its holder (a token).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from gpujobs import keys
from workers.inference.client import Outcome
from workers.inference.wire import safe_line

LEASE_POLL_S = 0.5  # how often a redelivered chunk looks whether the live holder let go

# KEYS: checkpoint hash, stats hash. ARGV: ttl seconds, then per request six: index, line,
# "completed"|"failed", prompt tokens, completion tokens, total tokens. Returns how many were
# new; one already checkpointed counts nothing (a request counts once however often its chunk
# runs). Both keys live ttl seconds from the latest checkpoint (a counter re-made by HINCRBY
# would never expire).
_CHECKPOINT_LUA = """
local added = 0
for i = 2, #ARGV, 6 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + 1
    redis.call('HINCRBY', KEYS[2], ARGV[i + 2], 1)
    redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[i + 3])
    redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[i + 4])
    redis.call('HINCRBY', KEYS[2], 'total_tokens', ARGV[i + 5])
  end
end
if added > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return added
"""

# KEYS: done set, stats hash. ARGV: chunk, ttl seconds. Returns {added, chunks done, chunks}.
_MARK_DONE_LUA = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
local total = tonumber(redis.call('HGET', KEYS[2], 'chunks') or '0')
return {added, redis.call('SCARD', KEYS[1]), total}
"""

# Chunk leases are also kept in keys.CHUNK_LEASES (member: the chunk's task arguments as JSON,
# score: expiry by the server's clock), so the watchdog can resend a dead worker's chunk.
# KEYS: lease, chunk leases. ARGV: token, lease ms, member. Takes a free lease (1), else 0.
_TAKE_LUA = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + ARGV[2] / 1000, ARGV[3])
return 1
"""

# KEYS: lease, chunk leases. ARGV: token, lease ms, member. Renews if `token` holds it (1), else 0.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + ARGV[2] / 1000, ARGV[3])
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

# KEYS: lease, chunk leases. ARGV: token, member. Drops the lease if `token` holds it.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class ChunkFailed(Exception):
    """Raised after the job's failure is recorded, so Celery (and Flower) show the reason."""


@dataclass(frozen=True)
class ChunkRef:
    """Chunk `index` of job `job_id`: `count` requests from `start`, at byte `offset`."""

    job_id: str
    index: int
    start: int
    count: int
    offset: int

    def task_args(self) -> list[Any]:
        """The arguments of the chunk's Celery task (gpujobs.inference_chunk)."""
        return [self.job_id, self.index, self.start, self.count, self.offset]

    @property
    def lease_member(self) -> str:
        """The chunk as a member of keys.CHUNK_LEASES: its task arguments as JSON."""
        return json.dumps(self.task_args(), separators=(",", ":"))


class BatchState:
    """A batch's Redis state: checkpoints, counters, finished chunks, chunk leases.

    ttl_s: seconds every key lives (the record's TTL), so an abandoned batch leaves nothing.
    """

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: int) -> None:
        self.redis = client
        self.job_id = job_id
        self.ttl_s = ttl_s
        self._checkpoint = client.register_script(_CHECKPOINT_LUA)
        self._mark_done = client.register_script(_MARK_DONE_LUA)
        self._take = client.register_script(_TAKE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    def checkpoint(self, chunk: int, outcome: Outcome) -> bool:
        """Record a finished request and count it; False when it was recorded before."""
        return self.checkpoint_many(chunk, [outcome]) == 1

    def checkpoint_many(self, chunk: int, outcomes: list[Outcome]) -> int:
        """Record finished requests and count them, all in one script (one round trip, all
        or none); how many were new (one recorded before counts nothing)."""
        if not outcomes:
            return 0
        args: list[Any] = [self.ttl_s]
        for outcome in outcomes:
            usage = outcome.usage
            args += [outcome.index, safe_line(outcome.line),  # standard JSON in UTF-8
                     "failed" if outcome.failed else "completed",
                     usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                     usage.get("total_tokens", 0)]  # fmt: skip
        keys_ = [keys.batch_checkpoint(self.job_id, chunk), keys.batch_stats(self.job_id)]
        return int(self._checkpoint(keys=keys_, args=args))

    def finished(self, chunk: int) -> dict[int, str]:
        """Request index -> output line of the chunk's checkpointed requests."""
        raw: dict[str, str] = self.redis.hgetall(keys.batch_checkpoint(self.job_id, chunk))  # type: ignore[assignment,unused-ignore]
        return {int(index): line for index, line in raw.items()}

    def finished_indexes(self, chunk: int) -> set[int]:
        raw: list[str] = self.redis.hkeys(keys.batch_checkpoint(self.job_id, chunk))  # type: ignore[assignment,unused-ignore]
        return {int(index) for index in raw}

    def drop_checkpoint(self, chunk: int) -> None:
        self.redis.delete(keys.batch_checkpoint(self.job_id, chunk))

    def stats(self) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(keys.batch_stats(self.job_id))  # type: ignore[assignment,unused-ignore]
        return {name: int(value) for name, value in raw.items()}

    def done_chunks(self) -> set[int]:
        raw: set[str] = self.redis.smembers(keys.batch_done(self.job_id))  # type: ignore[assignment,unused-ignore]
        return {int(chunk) for chunk in raw}

    def mark_done(self, chunk: int) -> tuple[bool, int, int]:
        """Mark a chunk's part file written: (newly marked, chunks done, chunks in all)."""
        added, done, total = self._mark_done(
            keys=[keys.batch_done(self.job_id), keys.batch_stats(self.job_id)],
            args=[chunk, self.ttl_s],
        )
        return bool(added), int(done), int(total)

    def take_lease(self, ref: ChunkRef, token: str, lease_s: float) -> bool:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        return bool(
            self._take(keys=lease_keys, args=[token, int(lease_s * 1000), ref.lease_member])
        )

    def renew_lease(self, ref: ChunkRef, token: str, lease_s: float) -> bool:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        return bool(
            self._renew(keys=lease_keys, args=[token, int(lease_s * 1000), ref.lease_member])
        )

    def release_lease(self, ref: ChunkRef, token: str) -> None:
        lease_keys = [keys.batch_lease(self.job_id, ref.index), keys.CHUNK_LEASES]
        self._release(keys=lease_keys, args=[token, ref.lease_member])


class ChunkLease:
    """Holds one chunk's lease while the chunk runs, renewing it every third of `lease_s` from
    a thread; `lost` is set when another holder took it (ours expired while we stalled)."""

    def __init__(self, state: BatchState, ref: ChunkRef, lease_s: float) -> None:
        self.state = state
        self.ref = ref
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="chunk-lease", daemon=True)

    def acquire(self, give_up: Any) -> bool:
        """Take the lease, waiting while a live holder has it; False when `give_up()` says so
        first (the chunk got done, the job ended)."""
        while not self.state.take_lease(self.ref, self.token, self.lease_s):
            if give_up():
                return False
            # A holder renews its lease while it lives; no event marks its death, so we look.
            time.sleep(LEASE_POLL_S)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.state.renew_lease(self.ref, self.token, self.lease_s):
                    self.lost.set()
                    return
            except redis.RedisError:
                continue  # the broker dropped for a moment; the lease has slack for a retry

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):  # else it expires by itself
            self.state.release_lease(self.ref, self.token)
