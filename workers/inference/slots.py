"""The bound on a client's requests in flight, whose limit may move while requests wait."""

from __future__ import annotations

import asyncio
import collections


class Slots:
    """At most `limit` requests in flight; the limit may change while requests wait (adaptive
    concurrency lowers or raises it), and waiting requests follow at once, first come first
    served.

    A free slot is taken without a lock or a wakeup; a release hands its slot to the longest
    waiter (one wakeup, not one per waiter), so each request costs O(1) however many wait.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.active = 0
        self.waiting = 0  # requests waiting for a slot
        self.saturated = False  # a request found every slot taken (reset by its reader)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def demand(self) -> int:
        """The slots this client could use now: requests in flight and waiting for one."""
        return self.active + self.waiting

    async def __aenter__(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        self.saturated = True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.waiting += 1
        try:
            await waiter  # resolved by _hand_over, which counts the slot as ours
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled
                self.active -= 1
                self._hand_over()
            elif waiter in self._waiters:  # else _hand_over dropped it (and counted it out)
                self._waiters.remove(waiter)
                self.waiting -= 1
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.active -= 1
        self._hand_over()

    async def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._hand_over()

    def _hand_over(self) -> None:
        """Give free slots to the longest waiters."""
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            self.waiting -= 1
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)
