"""A distributed run read back out of Redis: its results appended to a Batch API output file, and its counts.

What ``scheduler collect`` and ``scheduler status`` run; the stream, the workers and the keys are in
:mod:`scheduler.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio
import redis.exceptions

from .distributed import GROUP, StreamKeys
from .jsonl import scan_output

__all__ = ["CollectReport", "RunStatus", "collect", "status"]


@dataclass(frozen=True, slots=True)
class CollectReport:
    """What :func:`collect` did."""

    #: lines appended to the output
    written: int
    #: results already in the output
    present: int


async def collect(client: redis.asyncio.Redis, output: Path, *, stream: str = "scheduler") -> CollectReport:
    """Append every stored result not yet in ``output`` (Batch API output lines, as ``scheduler run`` writes).

    Idempotent: results already in the file are skipped, and a torn last line is repaired first.
    """
    keys = StreamKeys.of(stream)
    done = scan_output(output).done
    written = present = 0
    seen: set[int] = set()  # HSCAN may return an entry twice
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        async for raw_id, line in client.hscan_iter(keys.results, count=1000):
            custom_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if custom_id in done or hash(custom_id) in seen:
                present += custom_id in done
                continue
            seen.add(hash(custom_id))
            data = memoryview(line + b"\n")
            while data:
                data = data[os.write(fd, data):]
            written += 1
    finally:
        os.close(fd)
    return CollectReport(written, present)


@dataclass(frozen=True, slots=True)
class RunStatus:
    """Where a distributed run stands."""

    #: custom_ids ever enqueued
    enqueued: int
    #: results stored (errors included)
    done: int
    #: of which errors (dead letters and invalid lines included)
    failed: int
    dead: int
    #: delivered to a worker, not yet done
    in_progress: int
    #: not yet delivered
    waiting: int
    #: consumers known to the group (a killed worker stays listed; a worker that exits cleanly leaves)
    consumers: int

    def __str__(self) -> str:
        return (f"enqueued {self.enqueued:,}  done {self.done:,} (failed {self.failed:,}, dead {self.dead:,})  "
                f"in progress {self.in_progress:,}  waiting {self.waiting:,}  workers {self.consumers}")


async def status(client: redis.asyncio.Redis, *, stream: str = "scheduler") -> RunStatus:
    """The run's counts."""
    keys = StreamKeys.of(stream)
    pipe = client.pipeline(transaction=False)
    pipe.scard(keys.enqueued)
    pipe.hlen(keys.results)
    pipe.hget(keys.stats, "failed")
    pipe.xlen(keys.dead)
    pipe.xlen(keys.jobs)
    enqueued, done, failed, dead, held = await pipe.execute()
    in_progress = consumers = 0
    try:
        in_progress = int((await client.xpending(keys.jobs, GROUP))["pending"])
        consumers = len(await client.xinfo_consumers(keys.jobs, GROUP))
    except redis.exceptions.ResponseError:
        pass  # no group yet: nothing enqueued
    return RunStatus(int(enqueued), int(done), int(failed or 0), int(dead), in_progress,
                     max(0, int(held) - in_progress), consumers)
