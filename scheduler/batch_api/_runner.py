"""Running requests on the OpenAI Batch API, exactly once across restarts.

:func:`run_batch` plans the requests into Batch API input files (one endpoint and model a file, within
:class:`BatchLimits`), writes each beside the journal and records it, uploads it, creates its batch with metadata
naming the run, the part and the try, polls every running batch with jittered backoff, downloads the output and
error files of each batch as it ends, and yields a :class:`~scheduler.Result` per request. Lines that failed in a
batch (5xx, ``request_timeout``, expired, not run) go into a new part, up to ``max_attempts`` batches a line; a
``token_limit_exceeded`` refusal holds back new batches until one of ours ends.

Exactly once: the journal (:mod:`._journal`) records every step before it is taken. A rerun with the same state
re-attaches to the batches still running instead of creating them again, settles a creation the crash left in
doubt by listing the batches and matching their metadata, downloads the batches that ended meanwhile, yields
the results that were not handed out yet (less the ``done`` ids), and submits only what was never submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import openai
import orjson
import structlog

from .. import errors
from ..clock import Clock, LoopClock
from ..cost import PriceTable
from ..logs import redact
from ..requests import ENDPOINTS, Request
from ..results import ErrorInfo, Result, Usage
from ..retry import Backoff, Outcome, classify
from ._journal import Journal, JournalState, PartState, now_unix, parts_dir, replay, sync_dir
from ._plan import BatchLimits, Splitter

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types import Batch

__all__ = ["BatchProgress", "BatchRun", "BatchRunStatistics", "Polling", "cancel_batches", "run_batch"]

log = structlog.get_logger("scheduler")

#: estimates a request's tokens (prompt and output reservation): ``TokenEstimator().estimate`` fits
Estimate = Callable[[str, Mapping[str, Any]], int]

_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_CANCELLABLE = frozenset({"validating", "in_progress", "finalizing"})
_META_RUN, _META_PART, _META_TRY = "scheduler_run", "scheduler_part", "scheduler_try"
_TOKEN_LIMIT = "token_limit_exceeded"
# Listing batches to settle a creation in doubt stops at batches this much older than the oldest such creation.
_LIST_SLACK_S = 3_600


@dataclass(frozen=True, slots=True)
class Polling:
    """How often running batches are polled: ``first_s``, growing by ``factor`` a quiet round up to ``cap_s``,
    each delay jittered by ``±jitter`` (a share), back to ``first_s`` whenever a batch changes status."""

    first_s: float = 2.0
    cap_s: float = 60.0
    factor: float = 1.5
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.first_s <= 0 or self.cap_s < self.first_s or self.factor < 1 or not 0 <= self.jitter < 1:
            raise errors.ConfigurationError(
                "Polling needs first_s > 0, cap_s >= first_s, factor >= 1 and 0 <= jitter < 1"
            )

    def delay(self, quiet_rounds: int, rng: random.Random) -> float:
        """The delay before the next poll after ``quiet_rounds`` polls without a status change."""
        base = min(self.cap_s, self.first_s * self.factor ** min(quiet_rounds, 60))
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """One part of the run: its batch, status and request counts."""

    part: int
    #: the batch now or last running for it (None: not submitted yet)
    batch_id: str | None
    #: the batch's status; "pending" before submission, "held" after a token-limit refusal
    status: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True, slots=True)
class BatchRunStatistics:
    """A snapshot of a batch run (see :meth:`BatchRun.statistics`)."""

    #: requests planned into batches (input lines, each once), this run and earlier ones
    requests: int
    #: requests with a final result, this run and earlier ones
    finished: int
    #: results yielded by this run: successes and errors
    succeeded: int
    failed: int
    #: results not yielded because the caller had them already (``done``)
    skipped: int
    #: lines put into a later batch after failing or not running in theirs
    retried: int
    #: batches refused for the enqueued-token limit
    refusals: int
    #: US dollars of the successes so far, this run and earlier ones, at Batch API prices
    cost_usd: float
    #: requests without a final result yet, and their estimated tokens (0 without an estimator)
    requests_left: int
    tokens_left: int
    #: every part, in order
    batches: tuple[BatchProgress, ...]


@dataclass(frozen=True, slots=True)
class _Settings:
    done: Container[str]
    model: str | None
    max_attempts: int
    limits: BatchLimits
    polling: Polling
    refusal_backoff: Backoff
    prices: PriceTable
    estimate: Estimate | None
    metadata: Mapping[str, str]
    clock: Clock
    rng: random.Random


@dataclass(frozen=True, slots=True)
class _Verdict:
    """What one line of a batch's output or error file says about its request."""

    kind: Literal["ok", "fatal", "retry", "unrun"]
    status: int | None = None
    body: Any = None
    request_id: str | None = None
    message: str = ""


def run_batch(
    requests: Iterable[Request] | AsyncIterable[Request],
    *,
    client: AsyncOpenAI,
    state: str | os.PathLike[str],
    done: Container[str] = frozenset(),
    model: str | None = None,
    max_attempts: int = 6,
    limits: BatchLimits = BatchLimits(),  # noqa: B008 - frozen, so one shared default is safe
    polling: Polling = Polling(),
    refusal_backoff: Backoff = Backoff(base_s=60.0, cap_s=900.0),  # noqa: B008
    prices: PriceTable | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    estimate: Estimate | None = None,
    metadata: Mapping[str, str] | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> BatchRun:
    """Run ``requests`` on the OpenAI Batch API; iterate the returned :class:`BatchRun` for their results.

    ::

        async for result in scheduler.run_batch(requests, client=AsyncOpenAI(), state="out.jsonl.batches"):
            print(result.custom_id, result.ok, result.batch_id)

    Results come as each batch ends, one per request (``tier="batch"``, ``batch_id`` set, ``cost_usd`` at batch
    prices). Running it again with the same ``state`` after a crash, ``kill -9`` or Ctrl-C re-attaches to the
    batches still running, yields the results not handed out yet, and submits only what was never submitted.
    Results are handed out batch by batch: pass the ids already written as ``done`` so that a crash in the middle
    of a batch's results does not yield its first ones twice. Leaving the iteration early leaves the batches
    running: ``await run.aclose()`` releases the state, :func:`cancel_batches` cancels them.

    Args:
        requests: the requests, each with a ``custom_id`` (unique) and an endpoint the Batch API serves.
        client: the SDK client (its own retries cover transient errors of each call).
        state: the journal file (the request files go into a folder beside it, named ``<state>.parts``).
        done: ids whose results the caller has already: not planned, not yielded.
        model: the model of bodies that name none.
        max_attempts: batches a request may go into before its failure is final.
        limits: what one batch input file may hold.
        polling: how often running batches are polled.
        refusal_backoff: how long to wait after a ``token_limit_exceeded`` refusal when none of our batches is
            running (when one is, the next submission waits for it to end).
        prices: price additions for ``cost_usd`` (see :class:`~scheduler.cost.PriceTable`).
        estimate: a token estimate per request (``TokenEstimator().estimate``), for ``statistics().tokens_left``.
        metadata: extra batch metadata (at most 13 pairs: three name the run, part and try).
        clock: time for polling and backoff (the event loop's by default).
        rng: randomness of the jitter.

    Raises:
        ConfigurationError: on iteration: a request without a ``custom_id``, model or Batch API endpoint, a
            duplicate id, a state file in use by another run or not a journal.
    """
    if max_attempts < 1:
        raise errors.ConfigurationError(f"max_attempts must be >= 1, got {max_attempts}")
    extra = dict(metadata or {})
    if len(extra) > 13 or any(not isinstance(v, str) for v in extra.values()):
        raise errors.ConfigurationError("metadata takes at most 13 string values (the Batch API allows 16 pairs)")
    settings = _Settings(
        done=done, model=model, max_attempts=max_attempts, limits=limits, polling=polling,
        refusal_backoff=refusal_backoff, prices=PriceTable.load(prices), estimate=estimate, metadata=extra,
        clock=clock or LoopClock(), rng=rng or random.Random(),
    )
    return BatchRun(requests, client, Path(state), settings)


class BatchRun:
    """One batch run (made by :func:`run_batch`): an async iterator of results that can be stopped for a cut-over.

    :meth:`stop` cancels the running batches; the iteration then yields what they completed and ends, and
    :attr:`handed_back` holds the requests that did not finish, to run online.
    """

    def __init__(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        client: AsyncOpenAI,
        state: Path,
        settings: _Settings,
    ) -> None:
        self._requests = requests
        self._client = client
        self._state = state
        self._parts_dir = parts_dir(state)
        self._s = settings
        self._journal: Journal | None = None
        self._st = JournalState()
        self._iterator: AsyncGenerator[Result, None] | None = None
        #: ids of the input lines planned (in parts not retrying others)
        self._planned: set[str] = set()
        #: id -> parts retrying it, in order
        self._retry_parts: dict[str, list[int]] = {}
        #: part -> its ids already planned into parts retrying it
        self._covered: dict[int, set[str]] = {}
        self._seen: dict[int, Batch] = {}
        self._held = False
        self._hold_until = 0.0
        self._probing = False
        self._refusals_in_row = 0
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._cancel_sent: set[str] = set()
        self._handed_back: list[Request] | None = None
        self._succeeded = self._failed = self._skipped = self._retried = self._refusals = 0

    # -- the public face --------------------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Result]:
        if self._iterator is not None:
            raise errors.ConfigurationError("a BatchRun can be iterated once")
        self._iterator = self._results()
        return self._iterator

    async def aclose(self) -> None:
        """End the iteration early, releasing the state file; running batches keep running."""
        if self._iterator is not None:
            await self._iterator.aclose()

    def stop(self) -> None:
        """Cut over: cancel every running batch and submit no more. The iteration yields what the cancelled batches
        completed, then ends; :attr:`handed_back` then holds the requests not done."""
        self._stop_event.set()

    @property
    def handed_back(self) -> list[Request]:
        """The requests a stopped run did not finish (empty when it was not stopped or finished everything).

        Raises:
            ConfigurationError: the iteration has not ended yet.
        """
        if self._handed_back is not None:
            return self._handed_back
        if not self._stop_event.is_set():
            return []
        raise errors.ConfigurationError("handed_back is known once the stopped run's iteration has ended")

    def statistics(self) -> BatchRunStatistics:
        """Counts, cost and each part's batch as last seen (for a progress display)."""
        parts = sorted(self._st.parts.values(), key=lambda p: p.number)
        base = [p for p in parts if p.source is None]
        requests = sum(p.requests for p in base)
        tokens = sum(p.tokens for p in base)
        finished = sum(p.end.get("succeeded", 0) + p.end.get("failed", 0) for p in parts if p.end is not None)
        cost = sum(p.end.get("cost_usd", 0.0) for p in parts if p.end is not None)
        left = max(0, requests - finished)
        return BatchRunStatistics(
            requests=requests, finished=finished, succeeded=self._succeeded, failed=self._failed,
            skipped=self._skipped, retried=self._retried, refusals=self._refusals, cost_usd=cost,
            requests_left=left, tokens_left=round(tokens * left / requests) if requests else 0,
            batches=tuple(self._progress(p) for p in parts),
        )

    def _progress(self, part: PartState) -> BatchProgress:
        seen = self._seen.get(part.number)
        if part.end is not None:
            end = part.end
            return BatchProgress(part.number, end.get("batch_id"), end["status"], part.requests,
                                 end.get("succeeded", 0), end.get("failed", 0) + len(end.get("retry", ())))
        if seen is not None and part.batch_id == seen.id:
            counts = seen.request_counts
            return BatchProgress(part.number, seen.id, seen.status, counts.total if counts else part.requests,
                                 counts.completed if counts else 0, counts.failed if counts else 0)
        status = "held" if part.refusals and part.pending else "pending" if part.pending else "submitted"
        return BatchProgress(part.number, part.batch_id, status, part.requests, 0, 0)

    # -- the run ----------------------------------------------------------------------------------

    async def _results(self) -> AsyncGenerator[Result, None]:
        self._journal = Journal(self._state)
        try:
            self._start()
            await self._plan(self._requests)
            await self._settle_in_doubt()
            for part in self._parts():
                if part.end is not None and not part.delivered:
                    for result in self._handout(await self._ended_results(part)):
                        yield result
                    self._deliver(part)
            if not self._stop_event.is_set():
                for part in self._parts():
                    self._plan_retries(part)
            quiet = 0
            while True:
                if self._stop_event.is_set() and not self._stopping:
                    await self._begin_stop()
                finished: list[tuple[PartState, list[Result]]] = []
                if not self._stopping:
                    finished.extend(await self._submit_ready())
                if self._stopping:
                    await self._send_cancels()
                changed = False
                for part in [p for p in self._parts() if p.running]:
                    batch = await self._retrieve(part)
                    if batch is None:
                        continue
                    before = self._seen.get(part.number)
                    changed |= before is None or before.status != batch.status
                    self._seen[part.number] = batch
                    if batch.status in _TERMINAL:
                        results = await self._end(part, batch)
                        if part.end is not None:
                            finished.append((part, results))
                for part, results in finished:
                    for result in self._handout(results):
                        yield result
                    self._deliver(part)
                if any(p.in_doubt for p in self._parts()):
                    await self._settle_in_doubt()
                running = any(p.running or p.in_doubt for p in self._parts())
                pending = not self._stopping and any(p.pending for p in self._parts())
                if not running and not pending:
                    break
                quiet = 0 if changed else quiet + 1
                delay = self._s.polling.delay(quiet, self._s.rng)
                if self._held and not running:
                    delay = max(0.0, self._hold_until - self._s.clock.now())
                await self._sleep(delay)
            if self._stopping:
                self._handed_back = self._collect_handback()
                log.info("batch_run_stopped", handed_back=len(self._handed_back))
        finally:
            self._journal.close()
            self._journal = None

    def _parts(self) -> list[PartState]:
        return [self._st.parts[n] for n in sorted(self._st.parts)]

    def _write(self, record: dict[str, Any]) -> None:
        assert self._journal is not None
        self._journal.append(record)

    def _start(self) -> None:
        """Replay the journal (a new one gets its run record) and read the ids of every part planned."""
        assert self._journal is not None
        self._st = replay(self._journal.records)
        if self._st.run_id is None:
            self._st.run_id = os.urandom(8).hex()
            self._write({"type": "run", "v": 1, "run": self._st.run_id, "t": now_unix()})
        for part in self._parts():
            for custom_id in _ids(self._part_path(part)):
                if part.source is None:
                    self._planned.add(custom_id)
                else:
                    self._retry_parts.setdefault(custom_id, []).append(part.number)
                    self._covered.setdefault(part.source, set()).add(custom_id)
        if self._st.parts:
            running = sum(1 for p in self._st.parts.values() if p.running or p.in_doubt)
            log.info("batch_run_resumed", state=str(self._state), parts=len(self._st.parts), running=running)

    def _part_path(self, part: PartState) -> Path:
        return self._parts_dir / part.file

    # -- planning ---------------------------------------------------------------------------------

    async def _plan(self, requests: Iterable[Request] | AsyncIterable[Request]) -> None:
        """Write the requests never planned into part files, and record each part once its file is synced."""
        self._parts_dir.mkdir(parents=True, exist_ok=True)
        splitter = Splitter(self._s.limits, first_part=max(self._st.parts, default=0) + 1)
        filling: dict[int, _Filling] = {}
        new: set[str] = set()
        try:
            async for number, request in _enumerate(requests):
                custom_id = request.custom_id
                if not custom_id:
                    raise errors.ConfigurationError(f"request #{number} has no custom_id: the Batch API needs one")
                if custom_id in self._s.done or custom_id in self._planned:
                    continue
                if custom_id in new:
                    raise errors.ConfigurationError(f"custom_id {custom_id!r} appears more than once")
                new.add(custom_id)
                endpoint, body = self._request(request)
                line = orjson.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body},
                                    option=orjson.OPT_APPEND_NEWLINE)
                key = (endpoint, body["model"])
                number_, closed = splitter.place(key, len(line))
                if closed is not None:
                    self._close_part(filling.pop(closed), source=None)
                fill = filling.get(number_)
                if fill is None:
                    fill = filling[number_] = _Filling(number_, endpoint, body["model"], self._parts_dir)
                fill.add(line, self._s.estimate(endpoint, body) if self._s.estimate is not None else 0)
            for number_ in sorted(filling):
                self._close_part(filling.pop(number_), source=None)
        finally:
            for fill in filling.values():
                fill.file.close()
        self._planned |= new

    def _request(self, request: Request) -> tuple[str, dict[str, Any]]:
        endpoint = request.endpoint
        if endpoint not in ENDPOINTS:
            raise errors.ConfigurationError(
                f"request {request.custom_id!r}: the Batch API does not serve {endpoint!r} "
                f"(it serves {', '.join(sorted(ENDPOINTS))})"
            )
        body = dict(request.body)
        if "model" not in body:
            if self._s.model is None:
                raise errors.ConfigurationError(f"request {request.custom_id!r} names no model (pass model=)")
            body["model"] = self._s.model
        if not isinstance(body["model"], str) or not body["model"]:
            raise errors.ConfigurationError(f"request {request.custom_id!r}: body.model must be a non-empty string")
        return endpoint, body

    def _close_part(self, fill: _Filling, source: int | None) -> PartState:
        fill.finish()
        sync_dir(self._parts_dir)
        record = {"type": "part", "part": fill.number, "file": fill.name, "endpoint": fill.endpoint,
                  "model": fill.model, "requests": fill.count, "bytes": fill.size, "tokens": fill.tokens,
                  "from": source}
        self._write(record)
        part = PartState(fill.number, fill.name, fill.endpoint, fill.model, fill.count, fill.size, fill.tokens,
                         source)
        self._st.parts[part.number] = part
        log.info("batch_part_planned", part=part.number, requests=part.requests, bytes=part.bytes,
                 endpoint=part.endpoint, model=part.model, retries_part=source)
        return part

    def _plan_retries(self, part: PartState, retry: Iterable[str] | None = None) -> None:
        """Plan the lines of ``part`` that need another batch (its ``end`` record says which) into a new part."""
        if retry is None:
            if part.end is None or not part.end.get("retry"):
                return
            retry = part.end["retry"]
        covered = self._covered.setdefault(part.number, set())
        wanted = {i for i in retry if i not in covered and i not in self._s.done}
        if not wanted:
            return
        fill = _Filling(max(self._st.parts) + 1, part.endpoint, part.model, self._parts_dir)
        try:
            # A subset of one part's lines fits one part: same endpoint and model, fewer lines and bytes.
            for custom_id, line in _lines(self._part_path(part)):
                if custom_id in wanted:
                    fill.add(line, 0)
        except BaseException:
            fill.file.close()
            raise
        fill.tokens = round(part.tokens * fill.count / part.requests) if part.requests else 0
        new = self._close_part(fill, source=part.number)
        covered |= wanted
        for custom_id in wanted:
            self._retry_parts.setdefault(custom_id, []).append(new.number)
        self._retried += len(wanted)
        log.info("batch_lines_retried", part=part.number, into=new.number, lines=len(wanted))

    # -- submitting -------------------------------------------------------------------------------

    async def _submit_ready(self) -> list[tuple[PartState, list[Result]]]:
        """Submit the parts waiting, unless a token-limit refusal holds them back; the results of parts the API
        refused outright (a 4xx on upload or create)."""
        pending = [p for p in self._parts() if p.pending]
        if not pending:
            return []
        running = [p for p in self._parts() if p.running or p.in_doubt]
        if self._held:
            # Wait for one of ours to end; with none running, for the backoff.
            if running or self._s.clock.now() < self._hold_until:
                return []
            self._held = False
        refused: list[tuple[PartState, list[Result]]] = []
        for part in pending:
            if self._probing and any(self._validating(p) for p in self._parts() if p.running or p.in_doubt):
                break  # after a refusal, one batch at a time until it is accepted
            results = await self._submit(part)
            if results is not None:
                refused.append((part, results))
            if self._probing:
                break
        return refused

    def _validating(self, part: PartState) -> bool:
        seen = self._seen.get(part.number)
        return part.in_doubt or seen is None or seen.id != part.batch_id or seen.status == "validating"

    async def _submit(self, part: PartState) -> list[Result] | None:
        """Upload ``part`` (once) and create its batch. None normally; the error results when the API refused."""
        client = self._client
        try:
            if part.file_id is None:
                name = f"{self._st.run_id}-{part.file}"
                data = self._part_path(part).read_bytes()
                file = await client.files.create(file=(name, data, "application/jsonl"), purpose="batch")
                self._write({"type": "upload", "part": part.number, "file_id": file.id})
                part.file_id = file.id
                log.info("batch_uploaded", part=part.number, file_id=file.id, bytes=len(data))
            attempt = part.tries + 1
            self._write({"type": "submit", "part": part.number, "try": attempt, "t": now_unix()})
            part.tries, part.in_doubt, part.submitted_t = attempt, True, now_unix()
            batch = await client.batches.create(
                input_file_id=part.file_id,
                endpoint=part.endpoint,  # type: ignore[arg-type]  # checked against ENDPOINTS when planned
                completion_window="24h",
                metadata={**self._s.metadata, _META_RUN: self._st.run_id or "", _META_PART: str(part.number),
                          _META_TRY: str(attempt)},
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
            return self._fail_part(part, "batch_create_refused" if part.file_id else "upload_refused",
                                   f"the API refused the {what} ({exc.status_code}): {redact(exc.message)}")
        except openai.APIError as exc:  # no answer: the batch may exist; settled by listing
            log.warning("batch_submit_failed", part=part.number, detail=redact(str(exc)), in_doubt=part.in_doubt)
            return None
        self._write({"type": "batch", "part": part.number, "try": attempt, "batch_id": batch.id})
        part.batch_id, part.in_doubt = batch.id, False
        self._seen[part.number] = batch
        log.info("batch_submitted", part=part.number, batch_id=batch.id, requests=part.requests, attempt=attempt)
        return None

    async def _settle_in_doubt(self) -> None:
        """Find the batches of creations the journal left in doubt; those not found were never created."""
        doubt = {(p.number, p.tries): p for p in self._parts() if p.in_doubt}
        if not doubt:
            return
        try:
            found = await _find_batches(self._client, self._st.run_id or "", set(doubt),
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

    # -- polling and ending -----------------------------------------------------------------------

    async def _retrieve(self, part: PartState) -> Batch | None:
        assert part.batch_id is not None
        try:
            return await self._client.batches.retrieve(part.batch_id)
        except openai.NotFoundError as exc:
            raise errors.ConfigurationError(
                f"batch {part.batch_id} (part {part.number} in {str(self._state)!r}) is unknown to the API: is this "
                "the account and base URL that ran it?"
            ) from exc
        except openai.APIError as exc:
            log.warning("batch_poll_failed", part=part.number, batch_id=part.batch_id, detail=redact(str(exc)))
            return None

    async def _end(self, part: PartState, batch: Batch) -> list[Result]:
        """Settle a batch that ended: a refusal puts its part back in line; otherwise its files are downloaded,
        its lines judged, the end recorded, the lines to retry planned, and the final results returned."""
        if batch.status == "failed":
            data = batch.errors.data if batch.errors is not None and batch.errors.data else []
            limit = next((e for e in data if e.code == _TOKEN_LIMIT), None)
            if limit is not None:
                self._refuse(part, batch, limit.message or "")
                return []
            message = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in data)
            return self._fail_part(part, "batch_failed", message or "the batch failed", batch)
        try:
            lines = [line for file_id in (batch.output_file_id, batch.error_file_id) if file_id
                     for line in await self._download(file_id)]
        except openai.APIError as exc:
            log.warning("batch_download_failed", part=part.number, batch_id=batch.id, detail=redact(str(exc)))
            return []  # still running as far as the journal knows: downloaded again on the next poll
        ended_at = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.created_at
        record = {"type": "end", "part": part.number, "batch_id": batch.id, "status": batch.status,
                  "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                  "created_at": batch.created_at, "ended_at": ended_at, "stopped": self._stopping}
        results, retry = self._judge(part, record, lines)
        self._record_end(part, record, results, retry)
        if retry and not self._stopping:
            self._plan_retries(part, retry)
        return results

    def _refuse(self, part: PartState, batch: Batch, message: str) -> None:
        self._write({"type": "refused", "part": part.number, "try": part.tries, "batch_id": batch.id,
                     "code": _TOKEN_LIMIT, "message": message})
        part.batch_id = None
        part.refusals += 1
        self._refusals += 1
        self._refusals_in_row += 1
        self._held = self._probing = True
        self._hold_until = self._s.clock.now() + self._s.refusal_backoff.delay(self._refusals_in_row, self._s.rng)
        log.warning("batch_refused", part=part.number, batch_id=batch.id, code=_TOKEN_LIMIT, detail=redact(message))

    def _fail_part(self, part: PartState, code: str, message: str, batch: Batch | None = None) -> list[Result]:
        """End ``part`` for good: an error result for each of its lines."""
        record = {"type": "end", "part": part.number, "batch_id": batch.id if batch else None, "status": "failed",
                  "output_file_id": None, "error_file_id": None,
                  "created_at": batch.created_at if batch else None,
                  "ended_at": batch.failed_at if batch else None, "errors": {"code": code, "message": message}}
        results, _ = self._judge(part, record, [])
        self._record_end(part, record, results, [])
        log.warning("batch_failed", part=part.number, batch_id=record["batch_id"], code=code, detail=message)
        return results

    def _record_end(self, part: PartState, record: dict[str, Any], results: list[Result], retry: list[str]) -> None:
        record["succeeded"] = sum(1 for r in results if r.ok)
        record["failed"] = len(results) - record["succeeded"]
        record["cost_usd"] = round(sum(r.cost_usd or 0.0 for r in results), 8)
        record["retry"] = retry
        self._write(record)
        part.end = record
        if record["status"] != "failed" or record.get("batch_id") is not None:
            self._held = False  # one of ours ended: the enqueued tokens it held are free again
            self._refusals_in_row = 0
        log.info("batch_ended", part=part.number, batch_id=record.get("batch_id"), status=record["status"],
                 succeeded=record["succeeded"], failed=record["failed"], retry=len(retry))

    async def _ended_results(self, part: PartState) -> list[Result]:
        """The final results of a part that ended in an earlier run, from its files again."""
        end = part.end
        assert end is not None
        lines: list[dict[str, Any]] = []
        for file_id in (end.get("output_file_id"), end.get("error_file_id")):
            if file_id:
                lines.extend(await self._download(file_id))
        results, _ = self._judge(part, end, lines)
        return results

    async def _download(self, file_id: str) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        async with self._client.files.with_streaming_response.content(file_id) as response:
            async for raw in response.iter_lines():
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("batch_output_unreadable", file_id=file_id, line=raw[:200])
                    continue
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    lines.append(line)
        return lines

    def _judge(
        self, part: PartState, end: Mapping[str, Any], lines: list[dict[str, Any]]
    ) -> tuple[list[Result], list[str]]:
        """The final results of ``part``'s lines, and the ids that need another batch."""
        by_id: dict[str, dict[str, Any]] = {}
        for line in lines:
            # A line answered twice (it should not be): the success wins, else the first.
            custom_id = line["custom_id"]
            if custom_id not in by_id or _judge_line(line).kind == "ok":
                by_id[custom_id] = line
        failure = end.get("errors") if end["status"] == "failed" else None
        stopped = bool(end.get("stopped")) and end["status"] == "cancelled"
        latency = float(end["ended_at"] - end["created_at"]) if end.get("ended_at") and end.get("created_at") else 0.0
        results: list[Result] = []
        retry: list[str] = []
        for custom_id, _ in _lines(self._part_path(part)):
            attempt = self._attempt(part.number, custom_id)
            base: dict[str, Any] = {"custom_id": custom_id, "endpoint": part.endpoint, "attempts": attempt,
                                    "latency_s": latency, "model": part.model, "tier": "batch",
                                    "batch_id": end.get("batch_id")}
            if failure is not None:
                results.append(Result(status=None, body=None, error=ErrorInfo(errors.BatchFailed.code,
                                                                              failure["message"]), **base))
                continue
            verdict = _judge_line(by_id.get(custom_id))
            if verdict.kind == "ok":
                usage = Usage.from_body(verdict.body)
                model = verdict.body.get("model") if isinstance(verdict.body, dict) else None
                model = model if isinstance(model, str) else part.model
                base["model"] = model
                results.append(Result(status=verdict.status, body=verdict.body, request_id=verdict.request_id,
                                      usage=usage, cost_usd=self._s.prices.cost(model, usage, tier="batch"), **base))
            elif verdict.kind == "fatal":
                results.append(Result(status=verdict.status, body=verdict.body, request_id=verdict.request_id,
                                      error=ErrorInfo(errors.RequestRejected.code, verdict.message), **base))
            elif (verdict.kind == "unrun" and stopped) or attempt < self._s.max_attempts:
                retry.append(custom_id)  # a cut-over's cancel does not count against the request
            else:
                message = f"failed in {attempt} batches; the last: {verdict.message}"
                results.append(Result(status=verdict.status, body=verdict.body, request_id=verdict.request_id,
                                      error=ErrorInfo(errors.RetriesExhausted.code, message), **base))
        return results, retry

    def _attempt(self, part: int, custom_id: str) -> int:
        """Which batch of the request ``part`` is: 1 for its first, one more for each part retrying it up to it."""
        return 1 + sum(1 for number in self._retry_parts.get(custom_id, ()) if number <= part)

    def _handout(self, results: list[Result]) -> list[Result]:
        """The results to yield: those the caller does not have yet (counted)."""
        done = self._s.done
        out = [r for r in results if r.custom_id not in done]
        self._skipped += len(results) - len(out)
        ok = sum(1 for r in out if r.ok)
        self._succeeded += ok
        self._failed += len(out) - ok
        return out

    def _deliver(self, part: PartState) -> None:
        """Record that every final result of ``part`` was handed out (the caller has taken each in turn)."""
        self._write({"type": "delivered", "part": part.number})
        part.delivered = True

    # -- stopping ---------------------------------------------------------------------------------

    async def _begin_stop(self) -> None:
        self._stopping = True
        await self._settle_in_doubt()
        log.info("batch_run_stopping", running=sum(1 for p in self._parts() if p.running))

    async def _send_cancels(self) -> None:
        for part in self._parts():
            if not part.running or part.batch_id in self._cancel_sent:
                continue
            seen = self._seen.get(part.number)
            if seen is not None and seen.id == part.batch_id and seen.status not in _CANCELLABLE:
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

    def _collect_handback(self) -> list[Request]:
        """The requests of a stopped run not done: unsubmitted parts, and lines to retry not planned again."""
        wanted: dict[int, set[str] | None] = {}
        for part in self._parts():
            if part.pending:
                wanted[part.number] = None
            elif part.end is not None and part.end.get("retry"):
                rest = set(part.end["retry"]) - self._covered.get(part.number, set())
                if rest:
                    wanted[part.number] = rest
        handed: list[Request] = []
        for number, ids in wanted.items():
            part = self._st.parts[number]
            for custom_id, raw in _lines(self._part_path(part)):
                if (ids is None or custom_id in ids) and custom_id not in self._s.done:
                    line = orjson.loads(raw)
                    handed.append(Request(line["body"], part.endpoint, custom_id))
        return handed

    async def _sleep(self, seconds: float) -> None:
        """Sleep on the clock, waking early when :meth:`stop` is called."""
        if self._stop_event.is_set() and self._stopping:
            await self._s.clock.sleep(seconds)
            return
        sleeper = asyncio.ensure_future(self._s.clock.sleep(seconds))
        stopper = asyncio.ensure_future(self._stop_event.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, stopper):
                task.cancel()
            for task in (sleeper, stopper):
                with contextlib.suppress(asyncio.CancelledError):
                    await task


# -- module helpers --------------------------------------------------------------------------------


class _Filling:
    """A part file being written."""

    __slots__ = ("count", "endpoint", "file", "model", "name", "number", "path", "size", "tokens")

    def __init__(self, number: int, endpoint: str, model: str, folder: Path) -> None:
        self.number = number
        self.endpoint = endpoint
        self.model = model
        self.name = f"part-{number:06d}.jsonl"
        self.path = folder / self.name
        # "wb": a file of this number left by a crash before its part was recorded is not part of the run.
        self.file: IO[bytes] = self.path.open("wb")
        self.count = self.size = self.tokens = 0

    def add(self, line: bytes, tokens: int) -> None:
        self.file.write(line)
        self.count += 1
        self.size += len(line)
        self.tokens += tokens

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


async def _enumerate(requests: Iterable[Request] | AsyncIterable[Request]) -> AsyncIterator[tuple[int, Request]]:
    number = 0
    if isinstance(requests, AsyncIterable):
        async for request in requests:
            number += 1
            yield number, request
    else:
        for request in requests:
            number += 1
            yield number, request


def _lines(path: Path) -> Iterable[tuple[str, bytes]]:
    """``(custom_id, line)`` of each line of a part file.

    Raises:
        ConfigurationError: the file is missing (the state's folder of parts was removed).
    """
    try:
        file = path.open("rb")
    except FileNotFoundError:
        raise errors.ConfigurationError(f"the batch request file {str(path)!r} is missing: the state beside the "
                                        "output is incomplete") from None
    with file:
        for raw in file:
            if raw.strip():
                yield orjson.loads(raw)["custom_id"], raw


def _ids(path: Path) -> Iterable[str]:
    return (custom_id for custom_id, _ in _lines(path))


def _judge_line(line: Mapping[str, Any] | None) -> _Verdict:
    """What a batch output or error file line says: a success, a final failure, one to retry, or not run."""
    if line is None:
        return _Verdict("unrun", message="the batch ended without running it")
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict) and isinstance(response.get("status_code"), int):
        status = response["status_code"]
        body = response.get("body")
        request_id = response.get("request_id")
        outcome = classify(status, {}, body)
        if outcome is Outcome.SUCCESS and not error:
            return _Verdict("ok", status, body, request_id)
        message = _error_message(body) or f"HTTP {status}"
        kind: Literal["fatal", "retry"] = (
            "retry" if outcome in (Outcome.RETRY, Outcome.RATE_LIMITED, Outcome.SUCCESS) else "fatal"
        )
        return _Verdict(kind, status, body, request_id, redact(message))
    code = error.get("code") if isinstance(error, dict) else None
    message = redact(str(error.get("message") or code)) if isinstance(error, dict) else "no response"
    if code in ("batch_expired", "batch_cancelled"):
        return _Verdict("unrun", message=f"{code}: {message}")
    return _Verdict("retry", message=f"{code}: {message}" if code else message)


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('code') or err.get('type')}: {err.get('message')}"
    return None


async def _find_batches(
    client: AsyncOpenAI, run_id: str, wanted: set[tuple[int, int]], since_unix: int
) -> dict[tuple[int, int], str]:
    """Ids of this run's batches whose ``(part, try)`` is wanted, from the batch list (newest first), looking no
    further back than an hour before ``since_unix``."""
    found: dict[tuple[int, int], str] = {}
    async for batch in client.batches.list(limit=100):
        meta = batch.metadata or {}
        if meta.get(_META_RUN) == run_id:
            with contextlib.suppress(ValueError, TypeError):
                key = (int(meta[_META_PART]), int(meta[_META_TRY]))
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
    journal = Journal(state)
    try:
        st = replay(journal.records)
        if st.run_id is None:
            return []
        doubt = {(p.number, p.tries): p for p in st.parts.values() if p.in_doubt}
        if doubt:
            found = await _find_batches(client, st.run_id, set(doubt), min(p.submitted_t for p in doubt.values()))
            for key, batch_id in found.items():
                journal.append({"type": "batch", "part": key[0], "try": key[1], "batch_id": batch_id})
                doubt[key].batch_id = batch_id
        cancelled: list[str] = []
        for part in sorted(st.parts.values(), key=lambda p: p.number):
            if part.end is not None or part.batch_id is None:
                continue
            batch = await client.batches.retrieve(part.batch_id)
            if batch.status in _CANCELLABLE:
                with contextlib.suppress(openai.BadRequestError, openai.ConflictError):  # it ended meanwhile
                    await client.batches.cancel(batch.id)
                    cancelled.append(batch.id)
        journal.append({"type": "cancel", "batch_ids": cancelled, "t": now_unix()})
        log.info("batch_cancel_requested", state=str(state), batches=len(cancelled))
        return cancelled
    finally:
        journal.close()
