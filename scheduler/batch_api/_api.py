"""Calls on the Batches API outside a run's loop: finding a run's batches by their metadata, cancelling a run's
batches (``scheduler batches cancel``), and reading where each batch of a run stands (``scheduler batches status``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from ._journal import Journal, now_unix, read_records, replay

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["BatchStatus", "batch_status", "cancel_batches", "find_batches"]

log = structlog.get_logger("scheduler")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CANCELLABLE = frozenset({"validating", "in_progress", "finalizing"})
#: the metadata that names a batch's run, part and try
META_RUN, META_PART, META_TRY = "scheduler_run", "scheduler_part", "scheduler_try"
TOKEN_LIMIT = "token_limit_exceeded"
# Listing batches to settle a creation in doubt stops at batches this much older than the oldest such creation.
_LIST_SLACK_S = 3_600


async def find_batches(
    client: AsyncOpenAI, run_id: str, wanted: set[tuple[int, int]], since_unix: int
) -> dict[tuple[int, int], str]:
    """Ids of this run's batches whose ``(part, try)`` is wanted, from the batch list (newest first), looking no
    further back than an hour before ``since_unix``."""
    found: dict[tuple[int, int], str] = {}
    async for batch in client.batches.list(limit=100):
        meta = batch.metadata or {}
        if meta.get(META_RUN) == run_id:
            with contextlib.suppress(ValueError, TypeError):
                key = (int(meta[META_PART]), int(meta[META_TRY]))
                if key in wanted:
                    found[key] = batch.id
        if len(found) == len(wanted) or batch.created_at < since_unix - _LIST_SLACK_S:
            break
    return found


async def cancel_batches(state: str | os.PathLike[str], *, client: AsyncOpenAI) -> list[str]:
    """Cancel every batch of the run recorded in ``state`` that is still running (``scheduler batches cancel``).

    Batches whose creation the journal left in doubt are looked up first. Lines the cancelled batches completed
    are kept by the API; a later :func:`run_batch` with the same state collects them and submits the rest again.

    Returns:
        The ids of the batches a cancel was sent for.

    Raises:
        ConfigurationError: the state is in use by a running run, or is not a batch journal.
    """
    import openai  # here: importing the SDK is most of a command's start-up

    journal = Journal(state)
    try:
        st = replay(journal.records)
        if st.run_id is None:
            return []
        doubt = {(p.number, p.tries): p for p in st.parts.values() if p.in_doubt}
        if doubt:
            found = await find_batches(client, st.run_id, set(doubt), min(p.submitted_t for p in doubt.values()))
            for key, batch_id in found.items():
                journal.append({"type": "batch", "part": key[0], "try": key[1], "batch_id": batch_id})
                doubt[key].batch_id = batch_id
        cancelled: list[str] = []
        for part in sorted(st.parts.values(), key=lambda p: p.number):
            if part.end is not None or part.batch_id is None:
                continue
            batch = await client.batches.retrieve(part.batch_id)
            if batch.status in CANCELLABLE:
                with contextlib.suppress(openai.BadRequestError, openai.ConflictError):  # it ended meanwhile
                    await client.batches.cancel(batch.id)
                    cancelled.append(batch.id)
        journal.append({"type": "cancel", "batch_ids": cancelled, "t": now_unix()})
        log.info("batch_cancel_requested", state=str(state), batches=len(cancelled))
        return cancelled
    finally:
        journal.close()


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """Where one part of a run stands, from its journal and (while its batch runs) from the API."""

    part: int
    requests: int
    #: the part's batch (None: not submitted yet, or its creation is in doubt)
    batch_id: str | None
    #: the API's status for a batch still running in the journal, else the journal's: "pending", "in doubt",
    #: "held" or the batch's final status
    status: str
    completed: int = 0
    failed: int = 0
    #: whether every result of the part was handed out (written to the output)
    delivered: bool = False


async def batch_status(state: str | os.PathLike[str], *, client: AsyncOpenAI | None) -> list[BatchStatus]:
    """Where each part of the run recorded in ``state`` stands (``scheduler batches status``). Reads the journal
    without locking it, so it works while the run goes on; asks the API about batches still running (not
    without ``client``).

    Raises:
        ConfigurationError: ``state`` is not a batch journal.
    """
    st = replay(read_records(state))
    found: list[BatchStatus] = []
    for part in sorted(st.parts.values(), key=lambda p: p.number):
        if part.end is not None:
            end = part.end
            found.append(BatchStatus(part.number, part.requests, end.get("batch_id"), end["status"],
                                     end.get("succeeded", 0), end.get("failed", 0), part.delivered))
        elif part.batch_id is not None and client is not None:
            batch = await client.batches.retrieve(part.batch_id)
            counts = batch.request_counts
            found.append(BatchStatus(part.number, part.requests, batch.id, batch.status,
                                     counts.completed if counts else 0, counts.failed if counts else 0))
        else:
            status = "in doubt" if part.in_doubt else "submitted" if part.batch_id else (
                "held" if part.refusals else "pending")
            found.append(BatchStatus(part.number, part.requests, part.batch_id, status))
    return found
