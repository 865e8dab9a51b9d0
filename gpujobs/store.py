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
from gpujobs.specs import JobKind, JobRecord, JobState, compact_json

# KEYS[1] = job hash, KEYS[2] = job channel.
# ARGV[1] = JSON list of states the job may be in ("[]": any state, the job must exist),
# ARGV[2] = JSON object of fields to set, ARGV[3] = seconds to expire the hash in (0: keep),
# ARGV[4] = the attempt the writer owns ("": any): a worker whose attempt was taken over by a
# newer one (its lease expired while it was stalled) can no longer write.
# KEYS[3] = the job's attempt history list, expired with the hash.
# ARGV[5] = keys.STATE_INDEX_PREFIX, ARGV[6] = the job id: a change of state moves the job from
# one state index to the other (the index names are built here from the record's kind).
# ARGV[7] = an entry to append to the attempt history ("" for none), ARGV[8] = its TTL: written
# with the change it describes, so whoever sees the change sees the entry.
# KEYS[4] = the job's lease, KEYS[5] = the leases sorted set: when the attempt that owns the job
# (ARGV[4]) moves it out of running (finished, failed, requeued), its lease goes with the change.
# Returns 1 when written, 0 when the job is missing, in another state, or owned by another attempt.
_UPDATE_LUA = """
local all = redis.call('HGETALL', KEYS[1])
local record = {}
for i = 1, #all, 2 do record[all[i]] = all[i + 1] end
local state = record['state']
if not state then return 0 end
if ARGV[4] ~= '' and record['attempt'] ~= ARGV[4] then return 0 end
local allowed = cjson.decode(ARGV[1])
if #allowed > 0 then
  local ok = false
  for _, s in ipairs(allowed) do if s == state then ok = true end end
  if not ok then return 0 end
end
local fields = cjson.decode(ARGV[2])
local flat, gone = {}, {}
for k, v in pairs(fields) do
  if v == cjson.null then
    if record[k] then table.insert(gone, k) end
  else table.insert(flat, k); table.insert(flat, v) end
  record[k] = nil
end
for i = 1, #flat, 2 do record[flat[i]] = flat[i + 1] end
if #gone > 0 then redis.call('HDEL', KEYS[1], unpack(gone)) end
if #flat > 0 then redis.call('HSET', KEYS[1], unpack(flat)) end
local new = fields['state']
if new and new ~= cjson.null and new ~= state then
  local kind = record['kind'] or ''
  redis.call('ZREM', ARGV[5] .. kind .. ':' .. state, ARGV[6])
  redis.call('ZADD', ARGV[5] .. kind .. ':' .. new, tonumber(record['created_at']) or 0, ARGV[6])
  if ARGV[4] ~= '' and new ~= 'running' then
    redis.call('DEL', KEYS[4])
    redis.call('ZREM', KEYS[5], ARGV[6])
  end
end
if ARGV[7] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[7]) end
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
elseif ARGV[7] ~= '' then
  redis.call('EXPIRE', KEYS[3], ARGV[8])
end
redis.call('PUBLISH', KEYS[2], cjson.encode(record))
return 1
"""

# ARGV[1]: a JSON array of jobs, each [job hash key, state index key, dedup key, queue list,
# event channel, job id, created_at (text: the index score), dedup TTL in seconds (0: no
# duplicate check), the record's fields (an object), the queue to add to keys.QUEUES (""
# for the shared queues, always read)]. ARGV[2]: the job hash key prefix. Then job i's Celery
# message is ARGV[1 + 2i] and its task-sent event ("" for none) ARGV[2 + 2i]: bulk strings
# as they are, not JSON in JSON (unescaping them was a third of the script's time).
# KEYS[1]: keys.QUEUES.
# A whole batch is one call: one command to pack, send and run, not one per job (a pipeline
# of per-job calls spent more on redis-py packing 17 arguments a job than on the writes).
# The jobs' own keys travel in ARGV: gpujobs needs one Redis, as kombu's transport does.
# Returns, per job in order, the id of a queued or running job already holding its fingerprint
# (nothing of this job written), or "" when the job was recorded and queued.
_SUBMIT_LUA = """
local found = {}
for i, job in ipairs(cjson.decode(ARGV[1])) do
  local key, index, dedup, list, channel, id, created, ttl, fields, queue = unpack(job)
  local message, event = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  local held = ''
  if ttl > 0 then
    -- Taken at once when free (one command: the usual case); else who holds it decides.
    local existing = redis.call('SET', dedup, id, 'EX', ttl, 'NX', 'GET')
    if existing then
      if existing ~= id then
        local state = redis.call('HGET', ARGV[2] .. existing, 'state')
        if state == 'queued' or state == 'running' then held = existing end
      end
      if held == '' then redis.call('SET', dedup, id, 'EX', ttl) end
    end
  end
  if held == '' then
    local flat = {}
    for k, v in pairs(fields) do table.insert(flat, k); table.insert(flat, v) end
    redis.call('HSET', key, unpack(flat))
    redis.call('ZADD', index, created, id)
    redis.call('LPUSH', list, message)
    if event ~= '' then redis.call('PUBLISH', channel, event) end
    if queue ~= '' then redis.call('SADD', KEYS[1], queue) end
  end
  found[i] = held
end
return found
"""


# The shared queues (gpujobs.app's names; not imported: the store does not need the Celery app).
_SHARED_QUEUES = ("transcode", "inference")
ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class LogEntry:
    """One attempt's log from one source ("ffmpeg": the encoder's whole stderr)."""

    attempt: int
    source: str
    text: str


def _index(kind: JobKind | str, state: JobState | str) -> str:
    return keys.state_index(JobKind(kind).value, JobState(state).value)


# Every state index: a job is in exactly one of them.
ALL_INDEXES = [_index(kind, state) for kind in JobKind for state in JobState]


def _encode(value: Any) -> Any:
    """A field value as the hash stores it: text, JSON for dicts, null to delete."""
    if value is None:
        return None
    if isinstance(value, dict | list):
        return compact_json(value)
    if isinstance(value, JobState):
        return value.value
    return str(value)


@dataclass(frozen=True)
class Submission:
    """One job for `JobStore.submit`: its record (state queued), its Celery message for the
    list `queue_list`, the task-sent event for `event_channel` ("" for none), and the
    fingerprint of its spec (None: no duplicate check)."""

    record: JobRecord
    message: str
    queue_list: str
    event: str = ""
    event_channel: str = ""
    fingerprint: str | None = None


class JobStore:
    """Job records in Redis. `record_ttl_s`: seconds a finished record is kept (default 7 days)."""

    def __init__(self, client: redis.Redis, record_ttl_s: int = 7 * 24 * 3600) -> None:
        self.redis = client
        self.record_ttl_s = record_ttl_s
        self._update = client.register_script(_UPDATE_LUA)
        self._submit = client.register_script(_SUBMIT_LUA)

    def create(self, record: JobRecord) -> None:
        """Store a new record and index it (newest first in `list`)."""
        with self.redis.pipeline() as pipe:
            # redis-py stubs want a Mapping invariant in its key type; a dict[str, str] is fine.
            pipe.hset(keys.job(record.id), mapping=record.to_hash())  # type: ignore[arg-type,unused-ignore]
            pipe.zadd(_index(record.kind, record.state), {record.id: record.created_at})
            pipe.execute()

    def submit(self, jobs: list[Submission]) -> list[str | None]:
        """Record, index and queue each job, in one round trip (one script call for all).

        Each job's duplicate check, record, state index entry, Celery message and task-sent
        event are written together: for each job, the id of the queued or running job that
        already holds its fingerprint (nothing of this one is written), or None when it was
        queued. A later job of `jobs` sees an earlier one's fingerprint.
        """
        if not jobs:
            return []
        args = [compact_json([self._entry(job) for job in jobs]), keys.JOB.format(job_id="")]
        for job in jobs:
            args += (job.message, job.event)
        found = self._submit(keys=[keys.QUEUES], args=args)
        return [_str(held) or None for held in found]

    def _entry(self, job: Submission) -> list[Any]:
        """`job` as one entry of the submit script's ARGV[1] (in the order named there)."""
        record = job.record
        return [
            keys.job(record.id),
            _index(record.kind, record.state),
            keys.dedup(job.fingerprint or "-"),
            job.queue_list,
            job.event_channel,
            record.id,
            repr(record.created_at),
            self.record_ttl_s if job.fingerprint else 0,
            _lean(record.to_hash()),
            "" if record.queue in _SHARED_QUEUES else (record.queue or ""),
        ]

    def delete(self, job_id: str) -> None:
        """Remove a record that never reached a queue (its send failed)."""
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.job(job_id))
            for index in ALL_INDEXES:
                pipe.zrem(index, job_id)
            pipe.execute()

    def purge(self, job_id: str) -> None:
        """Remove a job's record, its attempt history, its logs and its index entries
        (`gpujobs clean`)."""
        last = self.redis.hget(keys.job(job_id), "attempt")
        logs = [keys.log(job_id, n, source) for n in range(1, int(last or 0) + 1)
                for source in keys.LOG_SOURCES]  # fmt: skip
        with self.redis.pipeline() as pipe:
            pipe.delete(keys.job(job_id), keys.attempts(job_id), *logs)
            for index in ALL_INDEXES:
                pipe.zrem(index, job_id)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        data = self.redis.hgetall(keys.job(job_id))
        return JobRecord.from_hash(_text(data)) if data else None

    def state_of(self, job_id: str) -> tuple[JobState, int] | None:
        """A job's state and attempt (two fields, no record parsed); None when it is gone."""
        return _state_of(*self.redis.hmget(keys.job(job_id), ["state", "attempt"]))

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

        history: an entry for the attempt history (see `add_attempt`), appended in the same
        script as the change, so no reader sees one without the other.

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
            keys=[
                keys.job(job_id),
                keys.job_events(job_id),
                keys.attempts(job_id),
                keys.lease(job_id),
                keys.LEASES,
            ],
            args=[
                compact_json(allowed),
                compact_json(encoded),
                ttl,
                "" if attempt is None else attempt,
                keys.STATE_INDEX_PREFIX,
                job_id,
                "" if history is None else compact_json(history),
                self.record_ttl_s,
            ],
        )
        return bool(written)

    def add_attempt(self, job_id: str, entry: dict[str, Any]) -> None:
        """Append how one attempt went (attempt, worker, started_at, ended_at, outcome, reason)."""
        with self.redis.pipeline() as pipe:
            pipe.rpush(keys.attempts(job_id), compact_json(entry))
            pipe.expire(keys.attempts(job_id), self.record_ttl_s)
            pipe.execute()

    def attempts(self, job_id: str) -> list[dict[str, Any]]:
        """Every attempt of a job, oldest first."""
        rows: list[str] = self.redis.lrange(keys.attempts(job_id), 0, -1)  # type: ignore[assignment,unused-ignore]
        return [json.loads(row) for row in rows]

    def write_log(self, job_id: str, attempt: int, source: str, text: str) -> None:
        """Keep `text` as the log of one attempt of a job from one source (keys.LOG_SOURCES:
        "ffmpeg"), replacing what that attempt and source had; it expires with the record
        (record_ttl_s). One command. ValueError for a source not in keys.LOG_SOURCES."""
        self.redis.set(_log_key(job_id, attempt, source), text, ex=self.record_ttl_s)

    def write_log_and_state(
        self, job_id: str, attempt: int, source: str, text: str
    ) -> tuple[JobState, int] | None:
        """write_log, then state_of, in one round trip (a worker keeps its log and checks that
        the job is still its own before it moves the output into place)."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(_log_key(job_id, attempt, source), text, ex=self.record_ttl_s)
            pipe.hmget(keys.job(job_id), ["state", "attempt"])
            _, fields = pipe.execute()
        return _state_of(*fields)

    def logs(self, job_id: str, attempt: int | None = None) -> list[LogEntry]:
        """A job's logs, oldest attempt first (only `attempt`'s when given); [] when none."""
        if attempt is None:
            last = self.redis.hget(keys.job(job_id), "attempt")
            attempts = range(1, int(last) + 1) if last else range(0)
        else:
            attempts = range(attempt, attempt + 1)
        wanted = [(number, source) for number in attempts for source in keys.LOG_SOURCES]
        if not wanted:
            return []
        texts = self.redis.mget([keys.log(job_id, n, source) for n, source in wanted])
        found = zip(wanted, texts, strict=True)
        return [LogEntry(n, source, _str(text)) for (n, source), text in found if text is not None]

    def list(self, limit: int = 50, states: Iterable[JobState] = ()) -> list[JobRecord]:
        """Newest first (by creation time), `limit` at most; only jobs in `states` when given.

        Reads the heads of the state indexes (one round trip), merges them and reads just the
        records shown (one more): the cost follows `limit`, not the number of jobs. Index
        entries whose record has expired are dropped on the way.
        """
        wanted = [JobState(s) for s in states] or list(JobState)
        indexes = [_index(kind, state) for kind in JobKind for state in wanted]
        while True:
            with self.redis.pipeline(transaction=False) as pipe:
                for index in indexes:
                    pipe.zrevrange(index, 0, limit - 1, withscores=True)
                heads = pipe.execute()
            entries = [
                (float(score), _str(job_id), index)
                for index, head in zip(indexes, heads, strict=True)
                for job_id, score in head
            ]
            entries.sort(key=lambda entry: (entry[0], entry[1]), reverse=True)
            shown = entries[:limit]
            with self.redis.pipeline(transaction=False) as pipe:
                for _, job_id, _ in shown:
                    pipe.hgetall(keys.job(job_id))
                rows = pipe.execute()
            expired = [
                (job_id, index)
                for (_, job_id, index), row in zip(shown, rows, strict=True)
                if not row
            ]
            if not expired:
                return [JobRecord.from_hash(_text(row)) for row in rows]
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, index in expired:
                    pipe.zrem(index, job_id)
                pipe.execute()

    def counts(self) -> dict[tuple[JobKind, JobState], int]:
        """How many jobs there are of each kind in each state: one ZCARD per index, one round
        trip, whatever the number of jobs. Finished jobs count until their record expires
        (`prune_expired` drops the index entries of expired records)."""
        pairs = [(kind, state) for kind in JobKind for state in JobState]
        with self.redis.pipeline(transaction=False) as pipe:
            for kind, state in pairs:
                pipe.zcard(_index(kind, state))
            sizes = pipe.execute()
        return {pair: int(size) for pair, size in zip(pairs, sizes, strict=True)}

    def prune_expired(self) -> int:
        """Drop the index entries of finished records that expired; how many were dropped.

        A record expires `record_ttl_s` after it finished, so only jobs created longer ago than
        that can have expired: only those entries are checked, a few per call in a steady state.
        """
        seconds, _ = self.redis.time()
        older = float(seconds) - self.record_ttl_s
        indexes = [_index(kind, state) for kind in JobKind for state in JobState if state.terminal]
        with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.zrangebyscore(index, "-inf", older)
            heads = pipe.execute()
        candidates = [
            (index, _str(job_id))
            for index, head in zip(indexes, heads, strict=True)
            for job_id in head
        ]
        if not candidates:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for _, job_id in candidates:
                pipe.exists(keys.job(job_id))
            alive = pipe.execute()
        gone = [pair for pair, exists in zip(candidates, alive, strict=True) if not exists]
        with self.redis.pipeline(transaction=False) as pipe:
            for index, job_id in gone:
                pipe.zrem(index, job_id)
            return sum(int(n) for n in pipe.execute())

    def watch(self, job_ids: Iterable[str], timeout_s: float | None = None) -> Iterator[JobRecord]:
        """Yield each job's record now, then on every update, until all are terminal.

        Subscribes before reading the current records, so no update falls between the two; an
        update published before the read but delivered after it is older than what was yielded
        and is skipped (an earlier attempt's, or a running job's lower percent in the same
        attempt), so progress never goes backwards within an attempt. A new attempt starts
        again from its own percent (its record says which attempt it is).
        timeout_s: seconds to wait in all (None: no limit); TimeoutError when it passes.
        """
        ids = list(dict.fromkeys(job_ids))
        shown: dict[str, JobRecord] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call,unused-ignore]
        try:
            pubsub.subscribe(*[keys.job_events(job_id) for job_id in ids])
            pending: set[str] = set()
            for job_id in ids:
                record = self.get(job_id)
                if record is None:
                    raise KeyError(job_id)
                shown[job_id] = record
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
                if record.id not in pending or _older(record, shown[record.id]):
                    continue
                shown[record.id] = record
                yield record
                if record.state.terminal:
                    pending.discard(record.id)
        finally:
            pubsub.close()


# Fields a new record need not store: reading a record without them gives these values.
_DEFAULTS = {"percent": "0.0", "attempt": "0"}


def _lean(fields: dict[str, str]) -> dict[str, str]:
    """A new record's fields without those at their default (each costs ~60 B in Redis)."""
    return {k: v for k, v in fields.items() if _DEFAULTS.get(k) != v}


def _older(record: JobRecord, shown: JobRecord) -> bool:
    """Whether a published `record` is behind the one `shown` last: an earlier attempt's, or,
    both running in one attempt, a lower percent."""
    if record.attempt != shown.attempt:
        return record.attempt < shown.attempt
    both_running = record.state is JobState.RUNNING and shown.state is JobState.RUNNING
    return both_running and record.percent < shown.percent


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


def _log_key(job_id: str, attempt: int, source: str) -> str:
    """The key of one attempt's log from one source; ValueError for a source not in
    keys.LOG_SOURCES."""
    if source not in keys.LOG_SOURCES:
        known = ", ".join(keys.LOG_SOURCES)
        raise ValueError(f"log source must be one of {known}, got {source!r}")
    return keys.log(job_id, attempt, source)


def _state_of(state: Any, attempt: Any) -> tuple[JobState, int] | None:
    """(state, attempt) from a record's two fields as read; None when the record is gone."""
    if state is None:
        return None
    return JobState(_str(state)), int(_str(attempt)) if attempt is not None else 0
