"""A split job's state from its pieces': while a piece runs, its parent's record shows the
pieces' progress together (percent, fps, speed, ETA), written from the piece's worker; a piece
that fails for good fails its parent at once (`fail_parent`), wherever it failed: on its worker,
or in the watchdog once its worker died too often."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis

from gpujobs import keys
from gpujobs.specs import JobRecord, JobState
from gpujobs.store import JobStore, parse_published

log = logging.getLogger(__name__)
PIECE_PROGRESS_INTERVAL_S = 0.5  # at most two combined-progress writes a second per piece
ACTIVE = (JobState.QUEUED, JobState.RUNNING)


def combined_progress(pieces: list[JobRecord | None]) -> dict[str, Any]:
    """The parent's progress from its pieces': percent the mean (a piece counts 100 once it
    succeeded; at most 99 until the join), fps and speed the sums over running pieces, ETA the
    longest running piece's while none waits in the queue (else unknown)."""
    percents = [100.0 if p and p.state is JobState.SUCCEEDED else (p.percent if p else 0.0)
                for p in pieces]  # fmt: skip
    running = [p for p in pieces if p is not None and p.state is JobState.RUNNING]
    waiting = any(p is None or p.state is JobState.QUEUED for p in pieces)
    etas = [p.eta_s for p in running if p.eta_s is not None]
    return {
        "percent": round(min(99.0, sum(percents) / max(1, len(percents))), 1),
        "fps": round(sum(p.fps or 0.0 for p in running), 1) or None,
        "speed": round(sum(p.speed or 0.0 for p in running), 2) or None,
        "eta_s": None if waiting or not etas else max(etas),
    }


def cancel_pieces(store: JobStore, pieces: list[str]) -> None:
    """Cancel every piece still queued or running (the others are left as they are)."""
    for piece in pieces:
        store.update(piece, only_from=ACTIVE, state=JobState.CANCELLED, eta_s=None)


def fail_parent(store: JobStore, piece: JobRecord) -> bool:
    """`piece` failed for good: fail its parent, if it still runs, with the piece's reason
    (`piece 2/4 failed: ...`, with an attempt-history entry written in the same step), and
    cancel the other pieces. True for the one call that failed the parent; any later call (a
    sibling's, the watchdog's) finds it failed and changes nothing but the pieces left."""
    if piece.parent is None:
        return False
    parent = store.get(piece.parent)
    if parent is None or parent.state is not JobState.RUNNING or not parent.pieces:
        return False
    index = parent.pieces.index(piece.id) if piece.id in parent.pieces else -1
    reason = f"piece {index + 1}/{len(parent.pieces)} failed: {piece.error}"
    entry = {"attempt": parent.attempt, "outcome": "failed", "reason": reason,
             "ended_at": time.time()}  # fmt: skip
    failed = store.update(parent.id, only_from=(JobState.RUNNING,), state=JobState.FAILED,
                          error=reason, eta_s=None, history=entry)  # fmt: skip
    cancel_pieces(store, parent.pieces)
    if failed:
        log.warning("split job %s failed: %s", parent.id, reason)
    return failed


# KEYS: the parent's hash, its channel. ARGV: the attempt that planned the pieces, the fields
# (JSON; null deletes one). Writes only while the parent runs that attempt, and never lowers its
# percent: the pieces' workers write in any order, each from what it read a moment before, and a
# piece whose worker died starts again from 0. Publishes the record as JobStore.update does.
_RAISE_LUA = """
local cur = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'percent')
if cur[1] ~= 'running' or cur[2] ~= ARGV[1] then return 0 end
local fields = cjson.decode(ARGV[2])
if tonumber(fields['percent']) <= (tonumber(cur[3]) or 0) then fields['percent'] = nil end
local flat, gone = {}, {}
for k, v in pairs(fields) do
  if v == cjson.null then table.insert(gone, k)
  else table.insert(flat, k); table.insert(flat, v) end
end
if #gone > 0 then redis.call('HDEL', KEYS[1], unpack(gone)) end
if #flat > 0 then redis.call('HSET', KEYS[1], unpack(flat)) end
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
redis.call('PUBLISH', KEYS[2], cjson.encode(record))
return 1
"""


def refresh_parent(store: JobStore, parent_id: str) -> None:
    """Write the parent's combined progress (only while it runs); its percent only rises."""
    parent = store.get(parent_id)
    if parent is None or parent.state is not JobState.RUNNING or not parent.pieces:
        return
    combined = combined_progress([store.get(piece) for piece in parent.pieces])
    fields = {name: None if value is None else str(value) for name, value in combined.items()}
    fields["updated_at"] = str(time.time())
    store.redis.eval(
        _RAISE_LUA, 2, keys.job(parent_id), keys.job_events(parent_id),
        str(parent.attempt), json.dumps(fields),
    )  # fmt: skip


@contextlib.contextmanager
def piece_progress(store: JobStore, job_id: str, piece: bool | None = None) -> Iterator[None]:
    """Around a delivery of a piece: a thread follows the piece's channel and writes its
    parent's combined progress (at most every PIECE_PROGRESS_INTERVAL_S). Other jobs: nothing.
    piece: whether the job is a piece, when the caller knows (False: nothing is read)."""
    if piece is False:
        yield
        return
    record = store.get(job_id)
    if record is None or record.parent is None:
        yield
        return
    parent_id = record.parent
    stop = threading.Event()
    pubsub = store.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
    pubsub.subscribe(keys.job_events(job_id))

    def relay() -> None:
        last = 0.0
        while not stop.is_set():
            try:
                message = pubsub.get_message(timeout=0.5)
                if message is None or parse_published(message["data"]) is None:
                    continue
                if time.monotonic() - last >= PIECE_PROGRESS_INTERVAL_S:
                    last = time.monotonic()
                    refresh_parent(store, parent_id)
            except (redis.RedisError, ValueError) as exc:  # progress is best effort
                log.warning("combined progress of %s: %s", parent_id, exc)
                stop.wait(1.0)

    thread = threading.Thread(target=relay, name=f"split-progress-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            pubsub.close()
            refresh_parent(store, parent_id)
