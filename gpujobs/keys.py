"""Every Redis key and channel gpujobs uses, named once, with why it exists.

Celery's own keys (queue lists such as `transcode`, `_kombu.*`, `celery-task-meta-*`) belong to
Celery and are not repeated here; `queue_lists()` names the lists behind one Celery queue because
the Redis transport splits a queue by priority.
"""

from __future__ import annotations

PREFIX = "gpujobs"

# Hash per job: state, progress, worker, timestamps, the spec as JSON. The source of truth for
# status/watch/ls; Celery's result backend is only a mirror for Flower.
JOB = PREFIX + ":job:{job_id}"
# The index: one sorted set per kind and state of the job ids in it, scored by creation time.
# The store's scripts move a job between them as its state changes, so `ls --state running`
# reads only running jobs, `ls` merges the heads of these sets, and a metrics scrape counts jobs
# by kind and state with one ZCARD each instead of reading records.
STATE_INDEX = PREFIX + ":jobs:{kind}:{state}"
# What a Lua script prepends to `<kind>:<state>` to name a state index.
STATE_INDEX_PREFIX = PREFIX + ":jobs:"
# Pub/sub channel per job: every record update is published here so watchers need not poll.
JOB_EVENTS = PREFIX + ":events:{job_id}"
# Pattern matching every job channel, for `gpujobs top` and the CLI's multi-job progress view.
ALL_JOB_EVENTS = PREFIX + ":events:*"
# List per job: one JSON entry per attempt (worker, start, end, outcome, reason), oldest first.
ATTEMPTS = PREFIX + ":attempts:{job_id}"
# Logs per job (`gpujobs logs ID`): one text per attempt and source (LOG_SOURCES), written once
# with SET EX when the attempt's tool ends, expiring with the record (record_ttl_s). No index:
# a reader finds them from the record's attempt count (attempts 1..N, each source).
LOG = PREFIX + ":log:{job_id}:{attempt}:{source}"
LOG_SOURCES = ("ffmpeg",)  # "ffmpeg": a transcode's whole stderr
# kombu's Redis transport (its default key names, not prefixed): a message taken from a queue
# waits in the UNACKED hash (delivery tag -> [message, exchange, routing key]) and the
# UNACKED_INDEX sorted set (tag scored by delivery time) until it is acknowledged.
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
# Idempotency: spec fingerprint -> job id of the live job for it, so a duplicate submit returns it.
DEDUP = PREFIX + ":dedup:{fingerprint}"

# Set of the queues jobs were sent to besides the shared `transcode` and `inference` ones (node
# and GPU queues, `transcode.node-1.gpu2`), added by the submit script: the metrics exporter
# reads queue depths from these instead of scanning the keyspace for kombu's bindings.
QUEUES = PREFIX + ":queues"

# Lease of a running job (JSON: attempt, worker, expires_at), renewed by the worker's heartbeat
# thread; the watchdog requeues a running job whose lease has expired (reliability, issue 4).
LEASE = PREFIX + ":lease:{job_id}"
# Sorted set of running job ids scored by lease expiry: the watchdog scans only this, not all jobs.
LEASES = PREFIX + ":leases"
# Lock that makes one watchdog win each round across all workers.
WATCHDOG_LOCK = PREFIX + ":watchdog:lock"

# Node heartbeat (JSON with a TTL): node, GPUs and their capabilities and utilisation, worker
# processes, running jobs, NVENC slots in use. Read by `gpujobs gpus`, `worker --check`, metrics.
HEARTBEAT = PREFIX + ":heartbeat:{node}"
# Set of node names that have sent a heartbeat (entries whose heartbeat expired are pruned).
NODES = PREFIX + ":nodes"
# NVENC session semaphore per node: sorted set of holder -> lease expiry (GeForce session limit).
NVENC_SLOTS = PREFIX + ":nvenc:{node}"

# Celery's Redis transport keeps one list per priority step; these are our priority steps.
PRIORITY_STEPS = list(range(10))
# kombu's separator between a queue name and its priority step (kombu.transport.redis).
_PRIORITY_SEP = "\x06\x16"


def job(job_id: str) -> str:
    return JOB.format(job_id=job_id)


def state_index(kind: str, state: str) -> str:
    return STATE_INDEX.format(kind=kind, state=state)


def job_events(job_id: str) -> str:
    return JOB_EVENTS.format(job_id=job_id)


def attempts(job_id: str) -> str:
    return ATTEMPTS.format(job_id=job_id)


def log(job_id: str, attempt: int, source: str) -> str:
    return LOG.format(job_id=job_id, attempt=attempt, source=source)


def dedup(fingerprint: str) -> str:
    return DEDUP.format(fingerprint=fingerprint)


def lease(job_id: str) -> str:
    return LEASE.format(job_id=job_id)


def heartbeat(node: str) -> str:
    return HEARTBEAT.format(node=node)


def nvenc_slots(node: str) -> str:
    return NVENC_SLOTS.format(node=node)


def queue_lists(queue: str) -> list[str]:
    """The Redis lists that hold one Celery queue: the plain name for step 0, then one per step."""
    return [queue if step == 0 else f"{queue}{_PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


# --- Batch inference (gpujobs/batch.py, workers/inference/chunk.py) ---------------------------
# Every per-batch key below expires, so a batch abandoned half-way leaves nothing: the counters,
# checkpoints, done set and requeue counts record_ttl_s after their last write, leases and the
# merge lock after their own timeout. A chunk deletes its checkpoint once its part is written.
# CHUNK_LEASES is one set for all batches: a chunk removes its member when it lets go of its
# lease, the watchdog when it finds the lease expired.

# Hash per batch: total, chunks, completed, failed and token counts, incremented atomically with
# each checkpoint, so progress is exact however many workers share the batch.
BATCH_STATS = PREFIX + ":batch:{job_id}:stats"
# Hash per chunk: request index -> its finished output line (JSON). The checkpoint: a retried or
# restarted chunk sends only the requests missing here. Deleted once the chunk's part file is
# written.
BATCH_CHECKPOINT = PREFIX + ":batch:{job_id}:chunk:{chunk}"
# Set per batch of chunk numbers whose part file is written; when it holds every chunk, the
# worker that completed it writes the output.
BATCH_DONE = PREFIX + ":batch:{job_id}:done"
# Lease of a running chunk (a random token, expiring; renewed while the chunk runs): a redelivered
# chunk waits while a live worker holds it, so no two workers send the same chunk at once.
BATCH_LEASE = PREFIX + ":batch:{job_id}:lease:{chunk}"
# Sorted set of every live chunk lease (member: the chunk's task arguments as JSON; score: lease
# expiry by the server's clock): the watchdog resends a chunk whose lease expired.
CHUNK_LEASES = PREFIX + ":chunk-leases"
# Hash per batch: chunk index -> how often the watchdog resent it (a poison chunk fails the job).
BATCH_REQUEUES = PREFIX + ":batch:{job_id}:requeues"
# Lock (a random token, expiring) held while a worker writes the batch's output from the part
# files: the last chunk's merge and the partial output of a cancelled batch never run at once.
BATCH_MERGE = PREFIX + ":batch:{job_id}:merge"


def batch_stats(job_id: str) -> str:
    return BATCH_STATS.format(job_id=job_id)


def batch_checkpoint(job_id: str, chunk: int) -> str:
    return BATCH_CHECKPOINT.format(job_id=job_id, chunk=chunk)


def batch_done(job_id: str) -> str:
    return BATCH_DONE.format(job_id=job_id)


def batch_requeues(job_id: str) -> str:
    return BATCH_REQUEUES.format(job_id=job_id)


def batch_lease(job_id: str, chunk: int) -> str:
    return BATCH_LEASE.format(job_id=job_id, chunk=chunk)


def batch_merge(job_id: str) -> str:
    return BATCH_MERGE.format(job_id=job_id)


# Hash per batch created through the OpenAI Batch API (`gpujobs api`), keyed by its job id: what
# the job record does not hold (input_file_id, endpoint, completion_window, metadata). Status,
# counts and outputs are always read from the job record.
API_BATCH = PREFIX + ":api:batch:{job_id}"
# Sorted set of those job ids scored by creation time: `GET /v1/batches` pages through it.
API_BATCHES = PREFIX + ":api:batches"


def api_batch(job_id: str) -> str:
    return API_BATCH.format(job_id=job_id)


# --- Split transcodes (workers/transcode/split.py) --------------------------------------------
# Set per split job of the piece numbers whose encode succeeded; the piece whose success
# completes the set sends the join. Expires with the record (record_ttl_s after its last write).
SPLIT_DONE = PREFIX + ":split:{job_id}:done"


def split_done(job_id: str) -> str:
    return SPLIT_DONE.format(job_id=job_id)


# Adaptive concurrency (workers/inference/adaptive.py), per inference server (endpoint id: a
# hash of its base URL). A hash {window, changed, cut, known}: the total requests in flight that
# every worker sending to that server shares (AIMD), when it last changed and was last cut
# (server time), so that workers seeing the same overload decrease it once, not once each, and
# the window the server's /metrics last showed it can take (0: not known).
ENDPOINT_WINDOW = PREFIX + ":endpoint:{endpoint}:window"
# Sorted set of the clients sending to that server now (member: a token; score: expiry by the
# server's clock, renewed each tick): the window is split between the live ones.
ENDPOINT_CLIENTS = PREFIX + ":endpoint:{endpoint}:clients"
# Hash client token -> "demand held": the requests that client could send now (in flight and
# waiting for a slot) and the slots it holds (its share, or more while a cut share drains),
# written on each tick: the window is split by demand, and a share is only handed over once
# its holder has let it go.
ENDPOINT_DEMANDS = PREFIX + ":endpoint:{endpoint}:demands"


def endpoint_window(endpoint: str) -> str:
    return ENDPOINT_WINDOW.format(endpoint=endpoint)


def endpoint_clients(endpoint: str) -> str:
    return ENDPOINT_CLIENTS.format(endpoint=endpoint)


def endpoint_demands(endpoint: str) -> str:
    return ENDPOINT_DEMANDS.format(endpoint=endpoint)
