"""The NVENC session budget: a per-node semaphore in Redis, held with a lease.

GeForce drivers allow a fixed number of concurrent NVENC sessions per system (8 on current
drivers), shared by every GPU and every process on the node; the encode that opens one too many
fails. A sorted set per node (keys.NVENC_SLOTS) maps each holder to its lease expiry; a Lua script
drops expired holders and takes a slot atomically, so a worker that died holding a slot gives it
back when its lease runs out. The holder renews the lease from a thread while its encode runs.

Only the NVENC path takes a slot: NVDEC and scale_cuda have no such limit. Datacenter cards
(L20 and the like) have none either: a limit of 0 or None turns the semaphore off.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import redis
from pydantic import ValidationError

from gpujobs import keys
from gpujobs.specs import TranscodeSpec
from workers.runtime import WorkerRuntime
from workers.transcode.command import EncodePath, NoGpuPath, choose_path

log = logging.getLogger(__name__)

# KEYS[1] = the node's slot set. ARGV[1] = holder, ARGV[2] = limit, ARGV[3] = lease in seconds.
# The server's clock decides expiry, so holders on machines with skewed clocks still agree.
# Returns 1 when the holder has a slot (new or renewed), 0 when all `limit` slots are taken.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local lease = tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
-- An idle node's set disappears on its own once the last lease could have run out.
redis.call('EXPIRE', KEYS[1], math.ceil(lease) * 2)
return 1
"""

# Renew only a slot still held: a holder whose lease ran out (a long stall) must not take a slot
# back past the limit. Returns 1 when renewed, 0 when the slot was lost.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(lease) * 2)
return 1
"""

# Holders whose lease has not run out.
_IN_USE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""


UNLIMITED = 2**31  # retries of a job waiting for an NVENC session


class NoNvencSlot(Exception):
    """Every NVENC session of this node is taken; the job should wait in its queue."""


class NvencSemaphore:
    """The NVENC slots of one node.

    limit: concurrent sessions (default 8); 0 or None: unlimited (no Redis traffic at all).
    lease_s: seconds a slot is held without renewal (default 30).
    """

    def __init__(
        self, client: redis.Redis, node: str, limit: int | None = 8, lease_s: float = 30.0
    ) -> None:
        self.redis = client
        self.key = keys.nvenc_slots(node)
        self.limit = limit or None
        self.lease_s = lease_s
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._renew = client.register_script(_RENEW_LUA)
        self._in_use = client.register_script(_IN_USE_LUA)

    @property
    def unlimited(self) -> bool:
        return self.limit is None

    def try_acquire(self, holder: str) -> bool:
        """Take a slot for `holder` (or renew the one it has); False when none is free."""
        if self.limit is None:
            return True
        return bool(self._acquire(keys=[self.key], args=[holder, self.limit, self.lease_s]))

    def renew(self, holder: str) -> bool:
        """Extend `holder`'s lease by lease_s; False when its slot had already expired."""
        if self.limit is None:
            return True
        return bool(self._renew(keys=[self.key], args=[holder, self.lease_s]))

    def release(self, holder: str) -> None:
        if self.limit is not None:
            self.redis.zrem(self.key, holder)

    def in_use(self) -> int:
        """Slots held now (leases not yet run out), whatever the limit."""
        return int(self._in_use(keys=[self.key]))

    @contextmanager
    def slot(self, holder: str) -> Iterator[None]:
        """Hold a slot for the body, renewing its lease every lease_s / 3 seconds from a thread.

        Raises NoNvencSlot at once when every slot is taken (the caller requeues the job).
        """
        if self.limit is None:
            yield
            return
        if not self.try_acquire(holder):
            raise NoNvencSlot(f"all {self.limit} NVENC sessions of this node are in use")
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.renew(holder):
                        # Redis was out of reach longer than the lease: the encode runs on, but
                        # another job may open a session meanwhile; say so rather than fail.
                        log.warning("NVENC slot of %s expired before it was renewed", holder)
                        self.try_acquire(holder)
                except redis.RedisError as exc:
                    log.warning("cannot renew the NVENC slot of %s: %s", holder, exc)

        renewer = threading.Thread(target=keep, name=f"nvenc-lease-{holder}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            try:
                self.release(holder)
            except redis.RedisError as exc:  # the lease gives it back later anyway
                log.warning("cannot release the NVENC slot of %s: %s", holder, exc)


def semaphore(rt: WorkerRuntime) -> NvencSemaphore:
    """This node's semaphore with the configured limit and lease."""
    return NvencSemaphore(
        rt.store.redis, rt.settings.node_name, rt.settings.nvenc_sessions, rt.settings.nvenc_lease_s
    )


@contextmanager
def job_slot(
    task: Any, rt: WorkerRuntime, job_id: str, spec: dict[str, Any] | None = None
) -> Iterator[None]:
    """Around one delivery of a transcode job: when it will take the NVENC path, hold one of the
    node's NVENC slots while it runs. When every slot is taken, the job goes back to its queue
    for nvenc_wait_s seconds (default 5) through Celery's retry: the same queue (so a job sent
    to one GPU stays there), no attempt counted, its record left `queued`, never a failure.

    task: the bound Celery task. spec: the job's spec when the message carries it (older
    messages do), else it is read from the record. Other paths, and jobs that will not run,
    take no slot; a worker without NVENC reads nothing.
    """
    if not rt.capabilities.nvenc:  # no job of this worker can take the NVENC path
        yield
        return
    record = rt.store.get(job_id)
    try:
        given = spec if spec is not None else (record.spec if record is not None else {})
        path: EncodePath | None = choose_path(TranscodeSpec.model_validate(given), rt.capabilities)
    except (NoGpuPath, ValidationError):
        path = None  # the job body records why it cannot run
    if path is not EncodePath.NVENC or record is None or record.state.terminal:
        yield
        return
    slots = semaphore(rt)
    # One holder per delivery: a duplicate delivery must not renew or release the slot of the
    # attempt that is running.
    holder = f"{job_id}:{uuid.uuid4().hex[:8]}"
    stack = ExitStack()
    try:
        stack.enter_context(slots.slot(holder))
    except NoNvencSlot as exc:
        log.info("job %s waits for an NVENC session: %s", job_id, exc)
        # Waiting for a session is no failure, so no retry limit applies (Celery reads
        # max_retries=None as "the task's default", hence a bound no job reaches).
        raise task.retry(countdown=rt.settings.nvenc_wait_s, max_retries=UNLIMITED) from None
    with stack:
        yield
