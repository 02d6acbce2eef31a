from __future__ import annotations

from dataclasses import dataclass

import anyio
import pytest

from scheduler.queue import JobQueue


@dataclass
class Item:
    priority: int
    sequence: int


def test_orders_by_priority_then_sequence() -> None:
    queue: JobQueue[Item] = JobQueue(10)
    for priority, sequence in [(2, 0), (1, 1), (2, 2), (0, 3), (1, 4)]:
        queue.requeue(Item(priority, sequence))
    assert [(i.priority, i.sequence) for i in (queue.pop() for _ in range(5))] == [
        (0, 3), (1, 1), (1, 4), (2, 0), (2, 2)]


def test_a_retried_job_goes_before_newer_work_of_its_priority() -> None:
    queue: JobQueue[Item] = JobQueue(10)
    first = Item(1, 0)
    queue.requeue(Item(1, 5))
    queue.requeue(first)  # back from a retry with its original sequence
    assert queue.pop() is first


@pytest.mark.anyio
async def test_put_waits_while_full_and_requeue_ignores_the_bound() -> None:
    queue: JobQueue[Item] = JobQueue(2)
    await queue.put(Item(0, 0))
    await queue.put(Item(0, 1))
    queue.requeue(Item(0, 2))  # a retry never waits
    assert len(queue) == 3
    done = anyio.Event()

    async def put_one() -> None:
        await queue.put(Item(0, 3))
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_one)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set()
        queue.pop()
        queue.pop()
        await done.wait()
    assert len(queue) == 2
