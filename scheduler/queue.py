"""The bounded priority queue between submitters and the dispatcher."""

from __future__ import annotations

import asyncio
import heapq
from collections import deque
from typing import Generic, Protocol, TypeVar

__all__ = ["JobQueue"]


class _Queued(Protocol):
    priority: int
    sequence: int


J = TypeVar("J", bound=_Queued)


class JobQueue(Generic[J]):
    """Orders jobs by ``(priority, sequence)``: lower priority number first, FIFO among equals.

    ``put`` waits while ``maxsize`` jobs are queued (backpressure: a bulk run's memory does not grow with its
    input). ``requeue`` ignores the bound: a retried job must never wait behind the work it is ahead of, and it
    keeps its sequence, so it goes before newer work of its priority.
    """

    __slots__ = ("_getter", "_heap", "_putters", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.maxsize = maxsize
        # The sequence is unique, so jobs themselves are never compared.
        self._heap: list[tuple[int, int, J]] = []
        self._getter: asyncio.Future[None] | None = None
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._heap)

    async def put(self, job: J) -> None:
        """Queue a job, waiting while the queue is full."""
        while len(self._heap) >= self.maxsize:
            waiter = asyncio.get_running_loop().create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                if not waiter.cancelled() or len(self._heap) < self.maxsize:
                    self._wake_putter()  # pass the free slot on
                raise
        self.requeue(job)

    def requeue(self, job: J) -> None:
        """Queue a job at once, whatever the bound."""
        heapq.heappush(self._heap, (job.priority, job.sequence, job))
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    def remove(self, job: J) -> bool:
        """Take ``job`` out of the queue wherever it is (a job that expired or was abandoned while queued);
        False when it is not queued."""
        for i, entry in enumerate(self._heap):
            if entry[2] is job:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                self._wake_putter()
                return True
        return False

    def clear(self) -> list[J]:
        """Take every job out (a stop fails them all); returns them in order."""
        jobs = [entry[2] for entry in sorted(self._heap, key=lambda entry: entry[:2])]
        self._heap.clear()
        while self._putters:
            self._wake_putter()
        return jobs

    def head(self) -> J | None:
        """The next job, without taking it."""
        return self._heap[0][2] if self._heap else None

    def pop(self) -> J:
        """Take the next job (the queue must not be empty)."""
        job = heapq.heappop(self._heap)[2]
        if len(self._heap) < self.maxsize:
            self._wake_putter()
        return job

    def _wake_putter(self) -> None:
        while self._putters:
            waiter = self._putters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def wait_nonempty(self) -> None:
        """Wait until a job is queued (one waiter: the dispatcher)."""
        while not self._heap:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
