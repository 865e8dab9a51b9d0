"""A split job settles as soon as one of its pieces fails for good, however the piece failed: a
piece the watchdog gives up on (its worker died once too often) fails the parent in the same
round, with the reason, cancelling the other pieces, and exactly once."""

from __future__ import annotations

import time

from gpujobs import keys
from gpujobs.app import make_app
from gpujobs.client import Client
from gpujobs.config import Settings
from gpujobs.specs import JobKind, JobRecord, JobState
from tests.helpers import wait_for
from workers.lease import Leases
from workers.recovery import Watchdog
from workers.transcode.split_progress import fail_parent


def record(job_id: str, state: JobState, **fields: object) -> JobRecord:
    return JobRecord(id=job_id, kind=JobKind.TRANSCODE, state=state, created_at=time.time(),
                     spec={"input": "in/a.mp4", "output": "in/a.480p.mp4"},
                     **fields)  # type: ignore[arg-type]  # fmt: skip


def test_a_piece_the_watchdog_gives_up_on_fails_its_parent_at_once(
    client: Client, settings: Settings
) -> None:
    pieces = ["job000000001-p0", "job000000001-p1", "job000000001-p2"]
    client.store.create(record("job000000001", JobState.RUNNING, pieces=pieces, attempt=1))
    for piece in pieces:
        client.store.create(record(piece, JobState.QUEUED, parent="job000000001"))
    leases = Leases(client.redis, lease_s=0.05)
    assert leases.claim(pieces[1], "a@test", "node-a", "cpu").claimed  # the second piece runs...
    assert Leases(client.redis).claim(pieces[2], "b@test", "node-b", "cpu").claimed
    wait_for(lambda: not client.redis.exists(keys.lease(pieces[1])), timeout_s=30)  # ...dies
    app = make_app(settings, client.broker_url)
    # One attempt allowed: the watchdog fails the piece for good in this round.
    assert Watchdog(client.store, app, interval_s=0.05, max_attempts=1).run_round() == [pieces[1]]

    parent = client.store.get("job000000001")
    assert parent is not None and parent.state is JobState.FAILED  # now, not after a sibling
    assert parent.error is not None and parent.error.startswith(
        "piece 2/3 failed: gave up after 1 attempts; last: worker a@test stopped renewing"
    ), parent.error
    states = [client.store.get(p).state for p in pieces]  # type: ignore[union-attr]
    assert states == [JobState.CANCELLED, JobState.FAILED, JobState.CANCELLED]
    [entry] = client.store.attempts("job000000001")
    assert entry["outcome"] == "failed" and entry["reason"] == parent.error

    # Once: a later report of the same failure (the piece's own worker, a sibling) is a no-op.
    failed_piece = client.store.get(pieces[1])
    assert failed_piece is not None and fail_parent(client.store, failed_piece) is False
    assert len(client.store.attempts("job000000001")) == 1
    assert client.store.get("job000000001").error == parent.error  # type: ignore[union-attr]
