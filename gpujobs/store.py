"""The job store: one Redis hash per job, an index for listing, a channel per job for watchers.

Every write goes through one Lua script that checks the job's current state first, so a late
progress update cannot resurrect a cancelled job and two workers cannot both finish one job.
Each write publishes the whole record on the job's channel, so watchers never poll.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from gpujobs import keys
from gpujobs.specs import JobRecord, JobState

# KEYS[1] = job hash, KEYS[2] = job channel.
# ARGV[1] = JSON list of states the job may be in ("[]": any state, the job must exist),
# ARGV[2] = JSON object of fields to set, ARGV[3] = seconds to expire the hash in (0: keep),
# ARGV[4] = the attempt the writer owns ("": any): a worker whose attempt was taken over by a
# newer one (its lease expired while it was stalled) can no longer write.
# KEYS[3] = the job's attempt history list, expired with the hash; ARGV[5] = an entry to append
# to it with the write ("": none), so a finished job's history is never a moment behind it.
# Returns 1 when written, 0 when the job is missing, in another state, or owned by another attempt.
_UPDATE_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[4] then return 0 end
local allowed = cjson.decode(ARGV[1])
if #allowed > 0 then
  local ok = false
  for _, s in ipairs(allowed) do if s == state then ok = true end end
  if not ok then return 0 end
end
local fields = cjson.decode(ARGV[2])
local flat = {}
for k, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', KEYS[1], k)
  else table.insert(flat, k); table.insert(flat, v) end
end
if #flat > 0 then redis.call('HSET', KEYS[1], unpack(flat)) end
if ARGV[5] ~= nil and ARGV[5] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[5]) end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
redis.call('PUBLISH', KEYS[2], cjson.encode(record))
return 1
"""

# KEYS[1] = the dedup key of a spec's fingerprint. ARGV[1] = the new job's id, ARGV[2] = seconds
# the key lives, ARGV[3] = the job hash key prefix. Returns the id of a queued or running job
# that already holds the fingerprint, else takes it for the new job and returns false.
_DEDUP_LUA = """
local existing = redis.call('GET', KEYS[1])
if existing and existing ~= ARGV[1] then
  local state = redis.call('HGET', ARGV[3] .. existing, 'state')
  if state == 'queued' or state == 'running' then return existing end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class LogEntry:
    """One attempt's log from one source ("ffmpeg": the encoder's whole stderr)."""

    attempt: int
    source: str
    text: str


def _encode(value: Any) -> Any:
    """A field value as the hash stores it: text, JSON for dicts, null to delete."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, JobState):
        return value.value
    return str(value)


class JobStore:
    """Job records in Redis. `record_ttl_s`: seconds a finished record is kept (default 7 days)."""

    def __init__(self, client: redis.Redis, record_ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.record_ttl_s = record_ttl_s
        self._update = client.register_script(_UPDATE_LUA)
        self._dedup = client.register_script(_DEDUP_LUA)

    def create(self, record: JobRecord) -> None:
        """Store a new record and index it (newest first in `list`)."""
        with self.redis.pipeline() as pipe:
            # redis-py stubs want a Mapping invariant in its key type; a dict[str, str] is fine.
            pipe.hset(keys.job(record.id), mapping=record.to_hash())  # type: ignore[arg-type]
            pipe.zadd(keys.JOB_INDEX, {record.id: record.created_at})
            pipe.execute()

    def claim_fingerprint(self, fingerprint: str, job_id: str) -> str | None:
        """Make `job_id` the live job for `fingerprint`, unless a queued or running job already
        is: then return that job's id. Call after `create`, so a racing submit sees a record."""
        existing = self._dedup(
            keys=[keys.dedup(fingerprint)],
            args=[job_id, self.record_ttl_s, keys.JOB.format(job_id="")],
        )
        return _str(existing) if existing else None

    def delete(self, job_id: str) -> None:
        """Remove a record that never reached a queue (its send failed)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.job(job_id))
            pipe.zrem(keys.JOB_INDEX, job_id)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        data = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(_text(data)) if data else None

    def update(
        self,
        job_id: str,
        only_from: Iterable[JobState] = (),
        attempt: int | None = None,
        history: dict[str, Any] | None = None,
        **fields: Any,
    ) -> bool:
        """Set fields (None deletes one) if the job is in one of `only_from` (empty: any state)
        and, when `attempt` is given, still belongs to that attempt.

        A move into a terminal state stamps finished_at and starts the record's expiry.
        history: an attempt entry (see `add_attempt`) appended in the same step, only if written.
        Returns False when the job is missing, in another state or attempt; nothing is written.
        """
        now = time.time()
        fields.setdefault("updated_at", now)
        state = fields.get("state")
        ttl = 0
        if state is not None and JobState(state).terminal:
            fields.setdefault("finished_at", now)
            ttl = self.record_ttl_s
        encoded = {name: _encode(value) for name, value in fields.items()}
        allowed = [JobState(s).value for s in only_from]
        written = self._update(
            keys=[keys.job(job_id), keys.job_events(job_id), keys.attempts(job_id)],
            args=[
                json.dumps(allowed),
                json.dumps(encoded),
                ttl,
                "" if attempt is None else attempt,
                "" if history is None else json.dumps(history, separators=(",", ":")),
            ],
        )
        return bool(written)

    def add_attempt(self, job_id: str, entry: dict[str, Any]) -> None:
        """Append how one attempt went (attempt, worker, started_at, ended_at, outcome, reason)."""
        with self.redis.pipeline() as pipe:
            pipe.rpush(keys.attempts(job_id), json.dumps(entry, separators=(",", ":")))
            pipe.expire(keys.attempts(job_id), self.record_ttl_s)
            pipe.execute()

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Every attempt of a job, oldest first."""
        rows: list[str] = self.redis.lrange(keys.attempts(job_id), 0, -1)  # type: ignore[assignment]
        return [json.loads(row) for row in rows]

    def append_log(self, job_id: str, attempt: int, source: str, text: str) -> None:
        """Append `text` to the log of one attempt of a job from one source ("ffmpeg", or
        "requests" for inference); it expires with the record (record_ttl_s after this write).
        source: letters, digits, '-' and '_' only (ValueError otherwise)."""
        if not source or not all(c.isalnum() or c in "-_" for c in source):
            raise ValueError(f"log source must be letters, digits, - or _, got {source!r}")
        key = keys.log(job_id, attempt, source)
        with self.redis.pipeline() as pipe:
            pipe.append(key, text)
            pipe.expire(key, self.record_ttl_s)
            pipe.zadd(keys.logs(job_id), {f"{attempt}:{source}": attempt})
            pipe.expire(keys.logs(job_id), self.record_ttl_s)
            pipe.execute()

    def logs(self, job_id: str, attempt: int | None = None) -> list[LogEntry]:
        """A job's logs, oldest attempt first (only `attempt`'s when given); [] when none."""
        members: list[Any] = self.redis.zrange(keys.logs(job_id), 0, -1)
        entries = []
        for member in members:
            number, _, source = _str(member).partition(":")
            if attempt is not None and int(number) != attempt:
                continue
            text = self.redis.get(keys.log(job_id, int(number), source))
            if text is not None:
                entries.append(LogEntry(int(number), source, _str(text)))
        return entries

    def list(self, limit: int = 50, states: Iterable[JobState] = ()) -> list[JobRecord]:
        """Newest first. Index entries whose record has expired are dropped on the way."""
        wanted = {JobState(s) for s in states}
        found: list[JobRecord] = []
        start = 0
        page = max(limit, 50)
        while len(found) < limit:
            members: list[str] = self.redis.zrevrange(keys.JOB_INDEX, start, start + page - 1)  # type: ignore[assignment]
            ids = [_str(i) for i in members]
            if not ids:
                break
            start += page
            with self.redis.pipeline() as pipe:
                for job_id in ids:
                    pipe.hgetall(keys.job(job_id))
                rows = pipe.execute()
            expired = [job_id for job_id, row in zip(ids, rows, strict=True) if not row]
            if expired:
                self.redis.zrem(keys.JOB_INDEX, *expired)
                start -= len(expired)
            for row in rows:
                if not row:
                    continue
                record = JobRecord.from_hash(_text(row))
                if not wanted or record.state in wanted:
                    found.append(record)
        return found[:limit]

    def watch(self, job_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[JobRecord]:
        """Yield each job's record now, then on every update, until all are terminal.

        Subscribes before reading the current records, so no update falls between the two.
        timeout_s: seconds to wait in all (None: no limit); TimeoutError when it passes.
        """
        ids = list(dict.fromkeys(job_ids))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(*[keys.job_events(job_id) for job_id in ids])
            pending: set[str] = set()
            for job_id in ids:
                record = self.get(job_id)
                if record is None:
                    raise KeyError(job_id)
                yield record
                if not record.state.terminal:
                    pending.add(job_id)
            while pending:
                wait = 1.0
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise TimeoutError(f"jobs still running: {', '.join(sorted(pending))}")
                    wait = min(wait, 1.0)
                message = pubsub.get_message(timeout=wait)
                if message is None:
                    continue
                record = parse_published(message["data"])
                if record is None:
                    continue
                if record.id not in pending:
                    continue
                yield record
                if record.state.terminal:
                    pending.discard(record.id)
        finally:
            pubsub.close()


def parse_published(data: Any) -> JobRecord | None:
    """A record as the store publishes it on a job's channel; None for anything else."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
        return JobRecord.from_hash(json.loads(text))
    except (ValueError, TypeError):
        return None


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(data: dict[Any, Any]) -> dict[str, str]:
    return {_str(k): _str(v) for k, v in data.items()}
