"""Putting a run's parts on the Batches API and taking them off: uploads and creations (held back after a
``token_limit_exceeded`` refusal), creations left in doubt by a crash, and the cancels of a cut-over.

Every call is announced in the journal before it is made (a ``submit`` before ``batches.create``), so a crash
leaves at most a creation in doubt, which :meth:`Submitter.settle_in_doubt` finds again by the batch's metadata.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .. import errors
from ..logs import redact
from ._api import CANCELLABLE, META_PART, META_RUN, META_TRY, TOKEN_LIMIT, find_batches
from ._journal import PartState, now_unix
from ._settings import Settings

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types import Batch

__all__ = ["Submitter"]

log = structlog.get_logger("scheduler")


class Submitter:
    """Submits and cancels the parts of one run.

    Args:
        client: the SDK client.
        settings: the run's settings (metadata, refusal backoff, clock).
        write: appends a journal record (synced before it returns).
        part_path: the request file of a part.
        seen: each part's batch as last seen (shared with the run's polling).
    """

    def __init__(
        self, client: AsyncOpenAI, settings: Settings, write: Callable[[dict[str, Any]], None],
        part_path: Callable[[PartState], Path], seen: dict[int, Batch],
    ) -> None:
        self._client = client
        self._s = settings
        self._write = write
        self._part_path = part_path
        self.seen = seen
        #: the run's id, named in every batch's metadata (set once the journal is read)
        self.run_id = ""
        #: batches refused for the enqueued-token limit
        self.refusals = 0
        self._refusals_in_row = 0
        self._held = False
        self._hold_until = 0.0
        self._probing = False
        self._cancel_sent: set[str] = set()
        #: batches of ours that ended, and how many had when each part was last submitted
        self._ends = 0
        self._ends_at_submit: dict[int, int] = {}

    async def submit_ready(self, parts: list[PartState]) -> list[tuple[PartState, str, str]]:
        """Submit the parts waiting, unless a token-limit refusal holds them back. Returns the parts the API
        refused outright (a 4xx on upload or create), with the refusal's code and message."""
        pending = [p for p in parts if p.pending]
        if not pending:
            return []
        running = [p for p in parts if p.running or p.in_doubt]
        if self._held:
            # Wait for one of ours to end; with none running, for the backoff.
            if running or self._s.clock.now() < self._hold_until:
                return []
            self._held = False
        refused: list[tuple[PartState, str, str]] = []
        for part in pending:
            if self._probing and any(self._validating(p) for p in parts if p.running or p.in_doubt):
                break  # after a refusal, one batch at a time until it is accepted
            outcome = await self.submit(part)
            if outcome is not None:
                refused.append((part, *outcome))
            if self._probing:
                break
        return refused

    def _validating(self, part: PartState) -> bool:
        seen = self.seen.get(part.number)
        return part.in_doubt or seen is None or seen.id != part.batch_id or seen.status == "validating"

    async def submit(self, part: PartState) -> tuple[str, str] | None:
        """Upload ``part`` (once) and create its batch. None normally; the error code and message when the API
        refused it outright.

        Raises:
            AuthenticationFailed: the API refused the key.
        """
        import openai  # here: importing the SDK is most of a command's start-up

        client = self._client
        try:
            if part.file_id is None:
                name = f"{self.run_id}-{part.file}"
                # Read whole: a part is at most BatchLimits.max_bytes (the SDK retries an upload from its bytes).
                data = self._part_path(part).read_bytes()
                file = await client.files.create(file=(name, data, "application/jsonl"), purpose="batch")
                self._write({"type": "upload", "part": part.number, "file_id": file.id})
                part.file_id = file.id
                log.info("batch_uploaded", part=part.number, file_id=file.id, bytes=len(data))
            attempt = part.tries + 1
            self._ends_at_submit[part.number] = self._ends
            self._write({"type": "submit", "part": part.number, "try": attempt, "t": now_unix()})
            part.tries, part.in_doubt, part.submitted_t = attempt, True, now_unix()
            batch = await client.batches.create(
                input_file_id=part.file_id,
                endpoint=part.endpoint,  # type: ignore[arg-type]  # checked against ENDPOINTS when planned
                completion_window="24h",
                metadata={**self._s.metadata, META_RUN: self.run_id, META_PART: str(part.number),
                          META_TRY: str(attempt)},
            )
        except openai.APIStatusError as exc:
            if exc.status_code in (401, 403):
                raise errors.AuthenticationFailed(f"the API refused the key ({exc.status_code})") from exc
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                log.warning("batch_submit_failed", part=part.number, status=exc.status_code,
                            detail=redact(exc.message), in_doubt=part.in_doubt)
                return None
            # Refused outright: no batch exists, and sending the same file again would be refused again.
            part.in_doubt = False
            what = "batch" if part.file_id else "upload of the batch input file"
            return ("batch_create_refused" if part.file_id else "upload_refused",
                    f"the API refused the {what} ({exc.status_code}): {redact(exc.message)}")
        except openai.APIError as exc:  # no answer: the batch may exist; settled by listing
            log.warning("batch_submit_failed", part=part.number, detail=redact(str(exc)), in_doubt=part.in_doubt)
            return None
        self._write({"type": "batch", "part": part.number, "try": attempt, "batch_id": batch.id})
        part.batch_id, part.in_doubt = batch.id, False
        self.seen[part.number] = batch
        log.info("batch_submitted", part=part.number, batch_id=batch.id, requests=part.requests, attempt=attempt)
        return None

    async def settle_in_doubt(self, parts: list[PartState]) -> None:
        """Find the batches of creations the journal left in doubt; those not found were never created."""
        import openai  # here: importing the SDK is most of a command's start-up

        doubt = {(p.number, p.tries): p for p in parts if p.in_doubt}
        if not doubt:
            return
        try:
            found = await find_batches(self._client, self.run_id, set(doubt),
                                       min(p.submitted_t for p in doubt.values()))
        except openai.APIError as exc:
            log.warning("batch_list_failed", detail=redact(str(exc)))
            return
        for key, part in doubt.items():
            batch_id = found.get(key)
            part.in_doubt = False
            if batch_id is None:
                log.info("batch_not_created", part=part.number, attempt=part.tries)
                continue
            self._write({"type": "batch", "part": part.number, "try": part.tries, "batch_id": batch_id})
            part.batch_id = batch_id
            log.info("batch_reattached", part=part.number, batch_id=batch_id, attempt=part.tries)

    def refuse(self, part: PartState, batch: Batch, message: str) -> None:
        """The batch failed for the enqueued-token limit: its part waits to be submitted again, and new batches
        are held back until one of ours ends (or, with none running, for the refusal backoff)."""
        self._write({"type": "refused", "part": part.number, "try": part.tries, "batch_id": batch.id,
                     "code": TOKEN_LIMIT, "message": message})
        part.batch_id = None
        part.refusals += 1
        self.refusals += 1
        self._refusals_in_row += 1
        self._probing = True
        log.warning("batch_refused", part=part.number, batch_id=batch.id, code=TOKEN_LIMIT, detail=redact(message))
        if self._ends > self._ends_at_submit.pop(part.number, self._ends):
            return  # one of ours ended since it was submitted: the tokens that refused it are free now
        self._held = True
        self._hold_until = self._s.clock.now() + self._s.refusal_backoff.delay(self._refusals_in_row, self._s.rng)

    def batch_ended(self) -> None:
        """One of ours ended: the enqueued tokens it held are free again."""
        self._held = False
        self._refusals_in_row = 0
        self._ends += 1

    def hold_s(self, running: bool) -> float | None:
        """With none of ours running, how long a refusal still holds new batches back (None: no hold)."""
        if not self._held or running:
            return None
        return max(0.0, self._hold_until - self._s.clock.now())

    async def send_cancels(self, parts: list[PartState]) -> None:
        """Ask the API to cancel every running batch of ``parts`` not asked yet (a cut-over)."""
        import openai  # here: importing the SDK is most of a command's start-up

        for part in parts:
            if not part.running or part.batch_id in self._cancel_sent:
                continue
            seen = self.seen.get(part.number)
            if seen is not None and seen.id == part.batch_id and seen.status not in CANCELLABLE:
                continue
            assert part.batch_id is not None
            with contextlib.suppress(openai.BadRequestError, openai.ConflictError):  # it ended meanwhile
                try:
                    await self._client.batches.cancel(part.batch_id)
                except openai.APIStatusError as exc:
                    if exc.status_code < 500 and exc.status_code not in (408, 429):
                        raise
                    log.warning("batch_cancel_failed", batch_id=part.batch_id, detail=redact(exc.message))
                    continue
                except openai.APIConnectionError as exc:
                    log.warning("batch_cancel_failed", batch_id=part.batch_id, detail=redact(str(exc)))
                    continue
            self._cancel_sent.add(part.batch_id)
            log.info("batch_cancel_requested", part=part.number, batch_id=part.batch_id)
