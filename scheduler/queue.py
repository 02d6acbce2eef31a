"""The bounded priority queue between submitters and the dispatcher, one lane per limit scope.

A lane holds the jobs one limit scope admits (a route and a model: OpenAI limits each model separately). Each
lane is ordered by ``(priority, sequence)``: lower priority number first, FIFO among equals. The dispatcher takes
the most urgent head among the lanes that can admit now, so a model waiting for its limit never holds back a
model whose buckets have room.
"""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

__all__ = ["JobQueue"]


class _Queued(Protocol):
    priority: int
    sequence: int


J = TypeVar("J", bound=_Queued)


def _one_lane(job: object) -> Hashable:
    return None


class JobQueue(Generic[J]):
    """Jobs by lane, each lane ordered by ``(priority, sequence)``.

    ``put`` waits while ``maxsize`` jobs are queued (backpressure: a bulk run's memory does not grow with its
    input). ``requeue`` ignores the bound: a retried job must never wait behind the work it is ahead of, and it
    keeps its sequence, so it goes before newer work of its priority.

    Args:
        maxsize: jobs queued before ``put`` waits.
        lane: the lane of a job (default: one lane for all).
    """

    __slots__ = ("_count", "_getter", "_lanes", "_putters", "lane", "maxsize", "on_arrival")

    def __init__(self, maxsize: int, lane: Callable[[J], Hashable] = _one_lane) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize = maxsize
        self.lane = lane
        # The sequence is unique, so jobs themselves are never compared.
        self._lanes: dict[Hashable, list[tuple[int, int, J]]] = {}
        self._count = 0
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()
        #: called whenever a job arrives (the dispatcher wakes from a nap: the job may fit now)
        self.on_arrival: Callable[[], None] | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count >= self.maxsize

    async def put(self, job: J) -> None:
        """Queue a job, waiting while the queue is full."""
        await self.wait_for_room()
        self.requeue(job)

    async def wait_for_room(self) -> None:
        """Wait until the queue has room (at once if it has). A waiter cancelled after its turn came passes the
        turn on."""
        while self._count >= self.maxsize:
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                if not waiter.cancelled() or self._count < self.maxsize:
                    self._wake_putter()  # pass the free slot on
                raise

    def requeue(self, job: J) -> None:
        """Queue a job at once, whatever the bound."""
        key = self.lane(job)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = []
        heapq.heappush(lane, (job.priority, job.sequence, job))
        self._count += 1
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)
        if self.on_arrival is not None:
            self.on_arrival()

    def heads(self) -> list[tuple[int, int, Hashable]]:
        """``(priority, sequence, lane)`` of each lane's next job, most urgent first."""
        if len(self._lanes) == 1:  # the common case, without the sort (this is on every job's path)
            for key, lane in self._lanes.items():
                return [(lane[0][0], lane[0][1], key)]
        return sorted((lane[0][0], lane[0][1], key) for key, lane in self._lanes.items() if lane)

    def pop_lane(self, key: Hashable) -> J:
        """Take the next job of a lane (it must not be empty)."""
        lane = self._lanes[key]
        job = heapq.heappop(lane)[2]
        if not lane:
            del self._lanes[key]
        self._taken()
        return job

    def take(self, key: Hashable, accept: Callable[[J], bool | None], limit: int) -> list[J]:
        """Take up to ``limit`` more jobs of a lane in order, those ``accept`` says True of; False passes a job
        over (it stays queued), None stops the search."""
        lane = self._lanes.get(key)
        taken: list[J] = []
        passed: list[tuple[int, int, J]] = []
        while lane and len(taken) < limit:
            entry = heapq.heappop(lane)
            verdict = accept(entry[2])
            if verdict:
                taken.append(entry[2])
                continue
            passed.append(entry)
            if verdict is None:
                break
        if lane is not None:
            for entry in passed:
                heapq.heappush(lane, entry)
            if not lane:
                del self._lanes[key]
        self._count -= len(taken)
        for _ in range(min(len(taken), self.maxsize - self._count)):
            self._wake_putter()
        return taken

    def pop(self) -> J:
        """Take the most urgent job of any lane (the queue must not be empty)."""
        return self.pop_lane(self.heads()[0][2])

    def remove(self, job: J) -> bool:
        """Take ``job`` out of the queue wherever it is (a job that expired or was abandoned while queued);
        False when it is not queued."""
        key = self.lane(job)
        lane = self._lanes.get(key)
        for i, entry in enumerate(lane or ()):
            if entry[2] is job:
                assert lane is not None
                lane[i] = lane[-1]
                lane.pop()
                heapq.heapify(lane)
                if not lane:
                    del self._lanes[key]
                self._taken()
                return True
        return False

    def clear(self) -> list[J]:
        """Take every job out (a stop fails them all); returns them in order."""
        jobs = [entry[2] for lane in self._lanes.values() for entry in lane]
        jobs.sort(key=lambda job: (job.priority, job.sequence))
        self._lanes.clear()
        self._count = 0
        while self._putters:
            self._wake_putter()
        return jobs

    def _taken(self) -> None:
        self._count -= 1
        if self._count < self.maxsize:
            self._wake_putter()

    def _wake_putter(self) -> None:
        while self._putters:
            waiter = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait_nonempty(self) -> None:
        """Wait until a job is queued (one waiter: the dispatcher)."""
        while not self._count:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
