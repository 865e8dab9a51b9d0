"""What Flower lacks, for Prometheus: queues, jobs, NVENC slots, GPUs and inference throughput.

Everything is read from Redis when Prometheus scrapes (`GpujobsCollector`), so the exporter holds
no state, any number of them agree, and a restart loses nothing. The same reading
(`read_snapshot`) feeds `gpujobs top`.

Sources (keys in gpujobs/keys.py):

- queue depth: the lengths of every priority list of each Celery queue (`keys.queue_lists`); the
  queues are the two named ones plus every node and GPU queue a job was sent to (`keys.QUEUES`);
- jobs by kind and state: the sizes of the store's state indexes (kept as jobs change state);
- NVENC slots in use: the live holders in each node's semaphore (`keys.NVENC_SLOTS`);
- GPU utilisation and memory: the node heartbeats (`keys.HEARTBEAT`, listed in `keys.NODES`);
- inference requests and tokens per second: the `result` of running inference jobs
  (`requests_per_s`, `tokens_per_s`, `request_counts`).

Heartbeats and results come from other processes and versions: they are parsed defensively; a
field that is missing or malformed is skipped, never fatal to a scrape.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from gpujobs import keys
from gpujobs.app import INFERENCE_QUEUE, TRANSCODE_QUEUE
from gpujobs.errors import GpujobsError
from gpujobs.specs import JobKind, JobState
from gpujobs.store import JobStore

log = logging.getLogger(__name__)

# Job records are read in pages of this many ids: one round trip per page.
_PAGE = 1000
MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuStat:
    """One GPU as a heartbeat reports it. Memory in MiB, utilisation in percent (0..100)."""

    index: int
    uuid: str = ""
    name: str = ""
    memory_total_mb: float | None = None
    memory_used_mb: float | None = None
    utilization_pct: float | None = None
    capabilities: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class NodeStat:
    """One node's latest heartbeat. ts: Unix seconds; age_s: seconds since it was written."""

    node: str
    ts: float | None
    age_s: float | None
    gpus: list[GpuStat]
    workers: list[str]
    running_jobs: list[str]
    nvenc_slots_in_use: int | None


@dataclass
class JobCounts:
    """Jobs in the index by (kind, state), and inference throughput of the running ones."""

    by_kind_state: Counter[tuple[str, str]] = field(default_factory=Counter)
    requests_per_s: float = 0.0
    tokens_per_s: float = 0.0
    request_counts: Counter[str] = field(default_factory=Counter)


@dataclass
class ClusterSnapshot:
    """Everything the exporter and `gpujobs top` show, read at one moment (`at`: Unix s)."""

    at: float
    queues: dict[str, int]
    jobs: JobCounts
    nodes: list[NodeStat]
    nvenc_in_use: dict[str, int]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float | None:
    """A finite float from a JSON value, or None (bools, text and NaN are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def parse_gpu(entry: Any) -> GpuStat | None:
    """One heartbeat GPU entry; None when it has no usable index."""
    if not isinstance(entry, dict):
        return None
    index = _number(entry.get("index"))
    if index is None:
        return None
    caps = entry.get("capabilities")
    return GpuStat(
        index=int(index),
        uuid=str(entry.get("uuid") or ""),
        name=str(entry.get("name") or ""),
        memory_total_mb=_number(entry.get("memory_total_mb")),
        memory_used_mb=_number(entry.get("memory_used_mb")),
        utilization_pct=_number(entry.get("utilization_pct")),
        capabilities={str(k): bool(v) for k, v in caps.items()} if isinstance(caps, dict) else {},
    )


def parse_heartbeat(node: str, raw: Any, now: float) -> NodeStat | None:
    """A node's heartbeat JSON as a NodeStat; None when it is not a JSON object."""
    try:
        beat = json.loads(_text(raw))
    except ValueError:
        return None
    if not isinstance(beat, dict):
        return None
    ts = _number(beat.get("ts"))
    raw_gpus = beat.get("gpus")
    gpus: list[Any] = raw_gpus if isinstance(raw_gpus, list) else []
    parsed = [gpu for gpu in (parse_gpu(entry) for entry in gpus) if gpu is not None]
    slots = _number(beat.get("nvenc_slots_in_use"))

    def names(value: Any) -> list[str]:
        return [str(v) for v in value] if isinstance(value, list) else []

    return NodeStat(
        node=str(beat.get("node") or node),
        ts=ts,
        age_s=None if ts is None else max(0.0, now - ts),
        gpus=sorted(parsed, key=lambda gpu: gpu.index),
        workers=names(beat.get("workers")),
        running_jobs=names(beat.get("running_jobs")),
        nvenc_slots_in_use=None if slots is None else int(slots),
    )


def server_time(client: redis.Redis) -> float:
    """Redis's clock in Unix seconds: leases and slot expiries are stamped with it."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def queue_names(client: redis.Redis) -> list[str]:
    """The gpujobs queues: transcode, inference, and every node and GPU queue a job was sent to
    (keys.QUEUES, kept by the submit script): one SMEMBERS, never a scan of the keyspace."""
    names = {TRANSCODE_QUEUE, INFERENCE_QUEUE}
    names.update(_text(name) for name in client.smembers(keys.QUEUES))
    return sorted(names)


def queue_depths(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue, summing every priority list (one round trip)."""
    queues = list(queues)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for name in keys.queue_lists(queue):
                pipe.llen(name)
        lengths = pipe.execute()
    steps = len(keys.PRIORITY_STEPS)
    return {q: int(sum(lengths[i * steps : (i + 1) * steps])) for i, q in enumerate(queues)}


def job_counts(client: redis.Redis) -> JobCounts:
    """Count jobs by kind and state; sum running inference throughput.

    The counts are the sizes of the store's state indexes, which its scripts keep as jobs change
    state: one ZCARD each, whatever the number of jobs. Only inference records are read (their
    `result` carries the request counts and rates), a page of 1000 per round trip; transcode
    records are never read. The index entries of expired records are pruned first (only jobs
    created more than a record TTL ago are checked).
    """
    store = JobStore(client)
    with contextlib.suppress(redis.ResponseError):  # a read-only replica: count as they are
        store.prune_expired()
    counts = JobCounts()
    for (kind, state), size in store.counts().items():
        counts.by_kind_state[(kind.value, state.value)] += size
    for state in JobState:
        index = keys.state_index(JobKind.INFERENCE.value, state.value)
        start = 0
        while True:
            ids = client.zrange(index, start, start + _PAGE - 1)
            if not ids:
                break
            start += _PAGE
            with client.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hget(keys.job(_text(job_id)), "result")
                rows = pipe.execute()
            for result in rows:
                if result is not None:
                    _add_inference(counts, _text(result), running=state is JobState.RUNNING)
    return counts


def _add_inference(counts: JobCounts, result: str, running: bool) -> None:
    try:
        data = json.loads(result)
    except ValueError:
        return
    if not isinstance(data, dict):
        return
    if running:
        # Rates describe the work in flight; a finished batch's last rate is history.
        counts.requests_per_s += _number(data.get("requests_per_s")) or 0.0
        counts.tokens_per_s += _number(data.get("tokens_per_s")) or 0.0
    request_counts = data.get("request_counts")
    if isinstance(request_counts, dict):
        for status, value in request_counts.items():
            number = _number(value)
            if number is not None:
                counts.request_counts[str(status)] += int(number)


def read_nodes(client: redis.Redis, now: float) -> list[NodeStat]:
    """The latest heartbeat of every listed node whose heartbeat has not expired, by name."""
    nodes = sorted(_text(n) for n in client.smembers(keys.NODES))
    if not nodes:
        return []
    raws = client.mget([keys.heartbeat(node) for node in nodes])
    found = []
    for node, raw in zip(nodes, raws, strict=True):
        if raw is None:
            continue
        stat = parse_heartbeat(node, raw, now)
        if stat is not None:
            found.append(stat)
    return found


def nvenc_in_use(client: redis.Redis, nodes: Iterable[str], now: float) -> dict[str, int]:
    """Live NVENC slot holders per node: members of its semaphore whose lease has not run out."""
    nodes = list(nodes)
    with client.pipeline(transaction=False) as pipe:
        for node in nodes:
            pipe.zcount(keys.nvenc_slots(node), f"({now}", "+inf")
        return dict(zip(nodes, (int(n) for n in pipe.execute()), strict=True))


def read_snapshot(client: redis.Redis) -> ClusterSnapshot:
    """Read everything at once (raises redis.RedisError when the server does not answer)."""
    now = server_time(client)
    nodes = read_nodes(client, now)
    return ClusterSnapshot(
        at=now,
        queues=queue_depths(client, queue_names(client)),
        jobs=job_counts(client),
        nodes=nodes,
        nvenc_in_use=nvenc_in_use(client, [n.node for n in nodes], now),
    )


class GpujobsCollector(Collector):
    """A Prometheus collector that reads Redis at every scrape (no state of its own).

    When Redis does not answer, a scrape still succeeds with `gpujobs_redis_up 0` and nothing
    else, so the alert is about Redis, not about a failed scrape.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("gpujobs_redis_up", "1 when Redis answered this scrape")
        try:
            snapshot = read_snapshot(self.client)
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from snapshot_metrics(snapshot)


def snapshot_metrics(snapshot: ClusterSnapshot) -> Iterator[GaugeMetricFamily]:
    """The metric families of one snapshot (units in names: bytes, percent, per second)."""
    depth = GaugeMetricFamily(
        "gpujobs_queue_depth", "Messages waiting in a queue, every priority", labels=["queue"]
    )
    for queue, count in sorted(snapshot.queues.items()):
        depth.add_metric([queue], count)
    yield depth

    jobs = GaugeMetricFamily(
        "gpujobs_jobs", "Job records by kind and state", labels=["kind", "state"]
    )
    for kind in JobKind:
        for state in JobState:
            count = snapshot.jobs.by_kind_state[(kind.value, state.value)]
            jobs.add_metric([kind.value, state.value], count)
    yield jobs

    up = GaugeMetricFamily("gpujobs_node_up", "1 for a node with a live heartbeat", labels=["node"])
    age = GaugeMetricFamily(
        "gpujobs_node_heartbeat_age_seconds", "Seconds since the node's heartbeat", labels=["node"]
    )
    running = GaugeMetricFamily(
        "gpujobs_node_running_jobs", "Jobs the node's heartbeat says it runs", labels=["node"]
    )
    for node in snapshot.nodes:
        up.add_metric([node.node], 1)
        if node.age_s is not None:
            age.add_metric([node.node], node.age_s)
        running.add_metric([node.node], len(node.running_jobs))
    yield from (up, age, running)

    slots = GaugeMetricFamily(
        "gpujobs_nvenc_slots_in_use", "NVENC sessions held on the node", labels=["node"]
    )
    for node in snapshot.nodes:
        # The semaphore is the truth; a node without one (no limit) reports its own count.
        count = snapshot.nvenc_in_use.get(node.node) or node.nvenc_slots_in_use or 0
        slots.add_metric([node.node], count)
    yield slots

    gpu_labels = ["node", "gpu", "uuid", "name"]
    util = GaugeMetricFamily(
        "gpujobs_gpu_utilization_percent", "GPU utilisation (0..100)", labels=gpu_labels
    )
    used = GaugeMetricFamily(
        "gpujobs_gpu_memory_used_bytes", "GPU memory in use", labels=gpu_labels
    )
    total = GaugeMetricFamily("gpujobs_gpu_memory_total_bytes", "GPU memory", labels=gpu_labels)
    for node in snapshot.nodes:
        for gpu in node.gpus:
            labels = [node.node, str(gpu.index), gpu.uuid, gpu.name]
            if gpu.utilization_pct is not None:
                util.add_metric(labels, gpu.utilization_pct)
            if gpu.memory_used_mb is not None:
                used.add_metric(labels, gpu.memory_used_mb * MIB)
            if gpu.memory_total_mb is not None:
                total.add_metric(labels, gpu.memory_total_mb * MIB)
    yield from (util, used, total)

    yield GaugeMetricFamily(
        "gpujobs_inference_requests_per_second",
        "Requests per second of the running inference jobs, summed",
        value=snapshot.jobs.requests_per_s,
    )
    yield GaugeMetricFamily(
        "gpujobs_inference_tokens_per_second",
        "Tokens per second of the running inference jobs, summed",
        value=snapshot.jobs.tokens_per_s,
    )
    requests = GaugeMetricFamily(
        "gpujobs_inference_requests",
        "Requests of the kept inference jobs by status (total, completed, failed)",
        labels=["status"],
    )
    for status, count in sorted(snapshot.jobs.request_counts.items()):
        requests.add_metric([status], count)
    yield requests


def registry_for(client: redis.Redis) -> CollectorRegistry:
    """A registry holding only the gpujobs collector (no process metrics: those are the pod's)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpujobsCollector(client))
    return registry


def serve_metrics(client: redis.Redis, address: str, port: int, ready: Any = None) -> None:
    """Serve /metrics on address:port until SIGTERM/SIGINT. Blocks.

    ready: called with the bound port once the server listens (port 0 picks a free one).
    """
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=address, registry=registry_for(client))
    except OSError as exc:  # the port is taken, the address is not this machine's
        raise GpujobsError(
            f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}"
        ) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready is not None:
        ready(server.server_port)
    try:
        stop.wait()
    finally:
        server.shutdown()
        with contextlib.suppress(Exception):
            server.server_close()
        thread.join(timeout=5.0)
