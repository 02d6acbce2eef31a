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

Memory stays flat in the size of the input: planned ids are kept as 64-bit hashes (:class:`~scheduler.jsonl.IdSet`),
request lines live in the part files, and a batch's output is streamed to disk and judged line by line
(:mod:`._files`, :mod:`._judge`); only one part's ids are held at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Container, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from .. import errors
from ..clock import Clock, LoopClock
from ..cost import PriceTable
from ..jsonl import IdSet
from ..logs import redact
from ..requests import Request
from ..results import Result
from ..retry import Backoff
from ._api import TERMINAL, TOKEN_LIMIT
from ._files import Filling, batch_request, check_unique, download, part_ids, part_lines, result_lines
from ._journal import Journal, JournalState, PartState, now_unix, parts_dir, replay, sync_dir
from ._judge import Ended, ended_as, judge_part
from ._plan import BatchLimits, Splitter
from ._settings import BatchProgress, BatchRunStatistics, Estimate, Polling, Settings
from ._submit import Submitter

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types import Batch

__all__ = ["BatchRun", "run_batch"]

log = structlog.get_logger("scheduler")

# Lines planned, or results handed out, between two turns of the event loop: a long file does not freeze the
# progress display or the signal handlers.
_LINES_A_TURN = 1_000


def run_batch(
    requests: Iterable[Request] | AsyncIterable[Request],
    *,
    client: AsyncOpenAI,
    state: str | os.PathLike[str],
    done: Container[str] = frozenset(),
    model: str | None = None,
    max_attempts: int = 6,
    limits: BatchLimits = BatchLimits(),  # noqa: B008 - frozen, so one shared default is safe
    polling: Polling = Polling(),  # noqa: B008
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
    settings = Settings(
        done=done, model=model, max_attempts=max_attempts, limits=limits, polling=polling,
        refusal_backoff=refusal_backoff, prices=PriceTable.load(prices), estimate=estimate, metadata=extra,
        clock=clock or LoopClock(), rng=rng or random.Random(),
    )
    return BatchRun(requests, client, Path(state), settings)


class BatchRun:
    """One batch run (made by :func:`run_batch`): an async iterator of results that can be stopped for a cut-over.

    :meth:`stop` cancels the running batches; the iteration then yields what they completed and ends, and
    :meth:`hand_back` reads the requests that did not finish, to run online.
    """

    def __init__(
        self,
        requests: Iterable[Request] | AsyncIterable[Request],
        client: AsyncOpenAI,
        state: Path,
        settings: Settings,
    ) -> None:
        self._requests = requests
        self._client = client
        self._state = state
        self._parts_dir = parts_dir(state)
        self._s = settings
        self._journal: Journal | None = None
        self._st = JournalState()
        self._iterator: AsyncGenerator[Result, None] | None = None
        #: ids of the input lines planned by earlier runs (in parts not retrying others), as hashes
        self._planned = IdSet()
        #: id -> parts retrying it, in order (only lines that failed somewhere: few)
        self._retry_parts: dict[str, list[int]] = {}
        #: part -> its ids already planned into parts retrying it
        self._covered: dict[int, set[str]] = {}
        self._seen: dict[int, Batch] = {}
        self._api = Submitter(client, settings, self._write, self._part_path, self._seen)
        self._stop_event = asyncio.Event()
        self._stopping = False
        self._ended = False
        self._succeeded = self._failed = self._skipped = self._retried = 0

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
        completed, then ends; :meth:`hand_back` then reads the requests not done."""
        self._stop_event.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stop_event.is_set()

    def hand_back(self) -> Iterator[Request]:
        """The requests a stopped run did not finish, read from the part files (nothing when the run was not
        stopped): the parts never submitted and the lines of cancelled batches not planned again.

        Raises:
            ConfigurationError: the stopped run's iteration has not ended yet.
        """
        if not self._stop_event.is_set():
            return iter(())
        if not self._ended:
            raise errors.ConfigurationError("what a stopped run hands back is known once its iteration has ended")
        return self._handed_back()

    @property
    def handed_back(self) -> list[Request]:
        """:meth:`hand_back` as a list (a whole input's requests when nothing was submitted: prefer
        :meth:`hand_back` for large runs).

        Raises:
            ConfigurationError: the stopped run's iteration has not ended yet.
        """
        return list(self.hand_back())

    def statistics(self) -> BatchRunStatistics:
        """Counts, cost and each part's batch as last seen (for a progress display)."""
        parts = self._parts()
        base = [p for p in parts if p.source is None]
        requests = sum(p.requests for p in base)
        tokens = sum(p.tokens for p in base)
        finished = sum(p.end.get("succeeded", 0) + p.end.get("failed", 0) for p in parts if p.end is not None)
        cost = sum(p.end.get("cost_usd", 0.0) for p in parts if p.end is not None)
        # Lines a running batch completed are done as far as what is left is concerned: a cut-over collects them.
        completed = sum(b.completed for p in parts if p.running and (b := self._seen_counts(p)) is not None)
        left = max(0, requests - finished - completed)
        return BatchRunStatistics(
            requests=requests, finished=finished, succeeded=self._succeeded, failed=self._failed,
            skipped=self._skipped, retried=self._retried, refusals=self._api.refusals, cost_usd=cost,
            requests_left=left, tokens_left=round(tokens * left / requests) if requests else 0,
            batches=tuple(self._progress(p) for p in parts),
        )

    def _seen_counts(self, part: PartState) -> BatchProgress | None:
        seen = self._seen.get(part.number)
        if seen is None or seen.id != part.batch_id or seen.request_counts is None:
            return None
        return BatchProgress(part.number, seen.id, seen.status, seen.request_counts.total,
                             seen.request_counts.completed, seen.request_counts.failed)

    def _progress(self, part: PartState) -> BatchProgress:
        seen = self._seen.get(part.number)
        if part.end is not None:
            end = part.end
            return BatchProgress(part.number, end.get("batch_id"), end["status"], part.requests,
                                 end.get("succeeded", 0), end.get("failed", 0) + len(end.get("retry", ())))
        counts = self._seen_counts(part)
        if counts is not None:
            return counts
        if seen is not None and part.batch_id == seen.id:
            return BatchProgress(part.number, seen.id, seen.status, part.requests, 0, 0)
        status = "held" if part.refusals and part.pending else "pending" if part.pending else "submitted"
        return BatchProgress(part.number, part.batch_id, status, part.requests, 0, 0)

    # -- the run ----------------------------------------------------------------------------------

    async def _results(self) -> AsyncGenerator[Result, None]:
        self._journal = Journal(self._state)
        try:
            self._start()
            await self._plan(self._requests)
            await self._api.settle_in_doubt(self._parts())
            for part in self._parts():
                if part.end is not None and not part.delivered:
                    async for result in self._hand_out_again(part):
                        yield result
            if not self._stop_event.is_set():
                for part in self._parts():
                    self._plan_retries(part)
            quiet = 0
            while True:
                if self._stop_event.is_set() and not self._stopping:
                    await self._begin_stop()
                if not self._stopping:
                    for part, code, message in await self._api.submit_ready(self._parts()):
                        async for result in self._paced(self._fail_part(part, code, message)):
                            yield result
                if self._stopping:
                    await self._api.send_cancels(self._parts())
                changed = False
                for part in [p for p in self._parts() if p.running]:
                    batch = await self._retrieve(part)
                    if batch is None:
                        continue
                    before = self._seen.get(part.number)
                    changed |= before is None or before.status != batch.status
                    self._seen[part.number] = batch
                    if batch.status in TERMINAL:
                        async for result in self._end(part, batch):
                            yield result
                if any(p.in_doubt for p in self._parts()):
                    await self._api.settle_in_doubt(self._parts())
                running = any(p.running or p.in_doubt for p in self._parts())
                pending = not self._stopping and any(p.pending for p in self._parts())
                if not running and not pending:
                    break
                quiet = 0 if changed else quiet + 1
                delay = self._s.polling.delay(quiet, self._s.rng)
                hold = self._api.hold_s(running)
                await self._sleep(delay if hold is None else hold)
            self._ended = True
            if self._stopping:
                log.info("batch_run_stopped")
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
        self._api.run_id = self._st.run_id
        for part in self._parts():
            for custom_id in part_ids(self._part_path(part)):
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
        """Write the requests never planned into part files; once every file is written and synced (and no id
        came twice), record the parts.

        Raises:
            ConfigurationError: a request cannot go into a batch, or an id comes twice (no part is recorded).
        """
        self._parts_dir.mkdir(parents=True, exist_ok=True)
        splitter = Splitter(self._s.limits, first_part=max(self._st.parts, default=0) + 1)
        filling: dict[int, Filling] = {}
        closed: list[Filling] = []
        new = IdSet()
        try:
            async for number, request in _enumerate(requests):
                custom_id = request.custom_id
                if not custom_id:
                    raise errors.ConfigurationError(f"request #{number} has no custom_id: the Batch API needs one")
                if custom_id in self._s.done or custom_id in self._planned:
                    continue
                new.add(custom_id)
                endpoint, body = batch_request(request, self._s.model)
                line = orjson.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body},
                                    option=orjson.OPT_APPEND_NEWLINE)
                part_number, full = splitter.place((endpoint, body["model"]), len(line))
                if full is not None:
                    filling[full].finish()
                    closed.append(filling.pop(full))
                fill = filling.get(part_number)
                if fill is None:
                    fill = filling[part_number] = Filling(part_number, endpoint, body["model"], self._parts_dir)
                fill.add(line, self._s.estimate(endpoint, body) if self._s.estimate is not None else 0)
            for part_number in sorted(filling):
                filling[part_number].finish()
                closed.append(filling.pop(part_number))
            check_unique(new, [fill.path for fill in sorted(closed, key=lambda f: f.number)])
        except BaseException:
            for fill in [*filling.values(), *closed]:
                fill.file.close()
                with contextlib.suppress(OSError):
                    fill.path.unlink()
            raise
        self._planned = IdSet()  # read while planning only
        sync_dir(self._parts_dir)
        for fill in sorted(closed, key=lambda f: f.number):
            self._record_part(fill, source=None)

    def _record_part(self, fill: Filling, source: int | None) -> PartState:
        """Record a part whose file is written and synced."""
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
        fill = Filling(max(self._st.parts) + 1, part.endpoint, part.model, self._parts_dir)
        try:
            # A subset of one part's lines fits one part: same endpoint and model, fewer lines and bytes.
            for custom_id, line in part_lines(self._part_path(part)):
                if custom_id in wanted:
                    fill.add(line, 0)
        except BaseException:
            fill.file.close()
            raise
        fill.tokens = round(part.tokens * fill.count / part.requests) if part.requests else 0
        fill.finish()
        sync_dir(self._parts_dir)
        new = self._record_part(fill, source=part.number)
        covered |= wanted
        for custom_id in wanted:
            self._retry_parts.setdefault(custom_id, []).append(new.number)
        self._retried += len(wanted)
        log.info("batch_lines_retried", part=part.number, into=new.number, lines=len(wanted))

    # -- polling and ending -----------------------------------------------------------------------

    async def _retrieve(self, part: PartState) -> Batch | None:
        import openai  # here: importing the SDK is most of a command's start-up

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

    async def _end(self, part: PartState, batch: Batch) -> AsyncIterator[Result]:
        """Settle a batch that ended: a refusal puts its part back in line; otherwise its files are downloaded,
        its lines judged and their final results yielded, the end recorded and the lines to retry planned."""
        if batch.status == "failed":
            data = batch.errors.data if batch.errors is not None and batch.errors.data else []
            limit = next((e for e in data if e.code == TOKEN_LIMIT), None)
            if limit is not None:
                self._api.refuse(part, batch, limit.message or "")
                return
            message = "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in data)
            async for result in self._paced(self._fail_part(part, "batch_failed", message or "the batch failed",
                                                            batch)):
                yield result
            return
        files = await self._download(part, batch.output_file_id, batch.error_file_id)
        if files is None:
            return  # still running as far as the journal knows: downloaded again on the next poll
        ended_at = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.created_at
        record = {"type": "end", "part": part.number, "batch_id": batch.id, "status": batch.status,
                  "output_file_id": batch.output_file_id, "error_file_id": batch.error_file_id,
                  "created_at": batch.created_at, "ended_at": ended_at, "stopped": self._stopping}
        ended = ended_as(part.endpoint, part.model, record)
        async for result in self._paced(self._hand_out(part, ended, files, record)):
            yield result

    async def _download(self, part: PartState, *file_ids: str | None) -> list[Path] | None:
        """Stream a batch's output and error files to disk beside the part; None when a download failed."""
        import openai  # here: importing the SDK is most of a command's start-up

        paths: list[Path] = []
        for kind, file_id in zip(("output", "errors"), file_ids, strict=True):
            if not file_id:
                continue
            path = self._parts_dir / f"{Path(part.file).stem}.{kind}.jsonl"
            try:
                await download(self._client, file_id, path)
            except openai.APIError as exc:
                log.warning("batch_download_failed", part=part.number, batch_id=part.batch_id, file_id=file_id,
                            detail=redact(str(exc)))
                return None
            paths.append(path)
        return paths

    async def _hand_out_again(self, part: PartState) -> AsyncIterator[Result]:
        """The final results of a part that ended but was not delivered (a crash in between), from its files."""
        end = part.end
        assert end is not None
        files = await self._download(part, end.get("output_file_id"), end.get("error_file_id"))
        if files is None:
            raise errors.ConfigurationError(f"the results of batch {end.get('batch_id')} (part {part.number}) cannot "
                                            "be downloaded; run again later")
        async for result in self._paced(self._hand_out(part, ended_as(part.endpoint, part.model, end), files, None)):
            yield result

    def _hand_out(
        self, part: PartState, ended: Ended, files: list[Path], record: dict[str, Any] | None
    ) -> Iterator[Result]:
        """Judge ``part``'s lines and yield the final results the caller does not have yet; then record the end
        (``record``: a first ending; None: recorded before), plan the lines to retry, and mark the part delivered.

        Left before its end (the caller stopped), nothing is recorded: the next run judges the part again.
        """
        path = self._part_path(part)
        done = self._s.done
        succeeded = failed = 0
        cost = 0.0
        retry: list[str] = []
        for custom_id, result in judge_part(
            ended, lambda: part_ids(path), result_lines(files),
            attempt=lambda custom_id: self._attempt(part.number, custom_id), max_attempts=self._s.max_attempts,
            prices=self._s.prices,
        ):
            if result is None:
                retry.append(custom_id)
                continue
            if result.ok:
                succeeded += 1
                cost += result.cost_usd or 0.0
            else:
                failed += 1
            if custom_id in done:
                self._skipped += 1
                continue
            if result.ok:
                self._succeeded += 1
            else:
                self._failed += 1
            yield result
        if record is not None:
            record.update(succeeded=succeeded, failed=failed, cost_usd=round(cost, 8), retry=retry)
            self._write(record)
            part.end = record
            if record["status"] != "failed" or record.get("batch_id") is not None:
                self._api.batch_ended()
            log.info("batch_ended", part=part.number, batch_id=record.get("batch_id"), status=record["status"],
                     succeeded=succeeded, failed=failed, retry=len(retry))
            if retry and not self._stopping:
                self._plan_retries(part, retry)
        self._write({"type": "delivered", "part": part.number})
        part.delivered = True
        for file in files:
            with contextlib.suppress(OSError):
                file.unlink()

    async def _paced(self, results: Iterator[Result]) -> AsyncIterator[Result]:
        """``results``, letting the event loop turn every so many (judging is synchronous work)."""
        with contextlib.closing(results):  # type: ignore[type-var]  # a generator: closing it runs its cleanup
            for count, result in enumerate(results, 1):
                yield result
                if count % _LINES_A_TURN == 0:
                    await asyncio.sleep(0)

    def _fail_part(self, part: PartState, code: str, message: str, batch: Batch | None = None) -> Iterator[Result]:
        """End ``part`` for good: an error result for each of its lines."""
        record = {"type": "end", "part": part.number, "batch_id": batch.id if batch else None, "status": "failed",
                  "output_file_id": None, "error_file_id": None,
                  "created_at": batch.created_at if batch else None,
                  "ended_at": batch.failed_at if batch else None, "errors": {"code": code, "message": message}}
        log.warning("batch_failed", part=part.number, batch_id=record["batch_id"], code=code, detail=message)
        return self._hand_out(part, ended_as(part.endpoint, part.model, record), [], record)

    def _attempt(self, part: int, custom_id: str) -> int:
        """Which batch of the request ``part`` is: 1 for its first, one more for each part retrying it up to it."""
        return 1 + sum(1 for number in self._retry_parts.get(custom_id, ()) if number <= part)

    # -- stopping ---------------------------------------------------------------------------------

    async def _begin_stop(self) -> None:
        self._stopping = True
        await self._api.settle_in_doubt(self._parts())
        log.info("batch_run_stopping", running=sum(1 for p in self._parts() if p.running))

    def _handed_back(self) -> Iterator[Request]:
        """The requests of a stopped run not done: unsubmitted parts, and lines to retry not planned again."""
        done = self._s.done
        for part in self._parts():
            wanted: set[str] | None = None
            if not part.pending:
                if part.end is None or not part.end.get("retry"):
                    continue
                wanted = set(part.end["retry"]) - self._covered.get(part.number, set())
                if not wanted:
                    continue
            for custom_id, raw in part_lines(self._part_path(part)):
                if (wanted is None or custom_id in wanted) and custom_id not in done:
                    yield Request(orjson.loads(raw)["body"], part.endpoint, custom_id)

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
            if number % _LINES_A_TURN == 0:
                await asyncio.sleep(0)
