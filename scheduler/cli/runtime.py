"""What a bulk run plugs into the pool, and the state those parts share.

- :class:`RunState`: the run's counts and why (and how) it is stopping;
- :class:`Recorder`: the pool's sink, writing each result to the output and stopping the run at once when the
  output cannot be written;
- :class:`FirstSend`: the pool's transport, noting when the first request goes out and the limits the server
  announces;
- :class:`WarmEstimator` and :func:`warm_up`: token estimates that never wait for the tokenizer to load;
- :class:`LogFilter`: keeps the log to what the user needs while the display (or the summary) says the rest;
- :func:`input_requests`: the input's requests not done yet, read as they are wanted.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ..dialects import read_limits
from ..errors import STOPPED_CODES, BudgetExhausted
from ..jsonl import InputScan, OutputScan, line_custom_id, line_hash, parse_line, read_lines, request_hash
from ..output import OutputUnwritable, OutputWriter
from ..progress import RunCounts
from ..requests import CHAT, Request
from ..tokens import TokenEstimator

if TYPE_CHECKING:
    from ..batch_api import BatchRunStatistics
    from ..cost import PriceTable
    from ..results import Result
    from ..statistics import PoolStatistics
    from ..transport import Response, StreamResponse, Transport

__all__ = [
    "CurrentStderr",
    "FirstSend",
    "LogFilter",
    "Recorder",
    "RunState",
    "WarmEstimator",
    "input_requests",
    "process_age",
    "warm_up",
]

log = structlog.get_logger("scheduler")


@dataclass(slots=True)
class RunState:
    """What the run's parts share."""

    counts: RunCounts
    #: monotonic time the process started
    started: float
    #: set when the first request is out: the warm-up thread then loads the tokenizer
    first_sent: threading.Event
    #: set once the tokenizer's encoding has loaded
    tokenizer_ready: threading.Event
    #: why reading stopped: a signal's name, or the code of a run-fatal error
    stopping: str | None = None
    #: the run-fatal error's message, and its code
    fatal: str | None = None
    fatal_code: str | None = None
    signal: int | None = None
    #: the first invalid line met, and its problem
    first_invalid: str | None = None
    #: why the output could not be written (the run stopped at once)
    output_error: OutputUnwritable | None = None
    #: results taken from the pool, written or not
    received: int = 0
    #: monotonic time the first request went out
    first_request: float | None = None
    #: cancels the whole run (made on the event loop)
    hard_stop: anyio.CancelScope | None = None
    #: the pool's statistics when it ended
    statistics: PoolStatistics | None = None
    #: the batch run's statistics when it ended (the batch and auto tiers)
    batch_statistics: BatchRunStatistics | None = None
    #: batches left running on the API when the run stopped (an interrupted batch run)
    batches_running: int = 0

    def stop(self, code: str, message: str) -> None:
        """Stop reading input for a run-fatal reason; requests in flight finish."""
        if self.stopping is None:
            self.stopping = code
            self.fatal, self.fatal_code = message, code

    def stop_at_once(self, error: OutputUnwritable) -> None:
        """The output cannot be written: stop now, abandoning requests in flight (their results could not be
        kept; the next run does them)."""
        if self.output_error is None:
            self.output_error = error
            self.stopping = "output_unwritable"
        if self.hard_stop is not None:
            self.hard_stop.cancel()


class Recorder:
    """The pool's sink: writes each result, counts it, and notices a run-fatal stop.

    Args:
        prices: prices what results of a cheaper tier would have cost at standard prices (the saving).
    """

    __slots__ = ("_prices", "_state", "_writer")

    def __init__(self, writer: OutputWriter, state: RunState, prices: PriceTable | None = None) -> None:
        self._writer = writer
        self._state = state
        self._prices = prices

    async def write(self, result: Result) -> None:
        self.record(result)

    def record(self, result: Result) -> None:
        """Write and count ``result`` (what :meth:`write` does, for callers that are not the pool)."""
        state = self._state
        state.received += 1
        try:
            written = self._writer.write(result)
        except OutputUnwritable as exc:
            state.stop_at_once(exc)
            return
        standard = None
        if self._prices is not None and result.tier not in (None, "standard"):
            standard = self._prices.cost(result.model, result.usage)
        state.counts.add(result, written, standard)
        if not written and result.error is not None:
            # A run-fatal error (quota, key, budget): stop reading; what is left stays for the next run.
            state.stop(result.error.code, result.error.message)

    async def aclose(self) -> None:
        return None  # the run closes the file once the pool is gone


class FirstSend:
    """The pool's transport, noting when the first request goes out (the start-up figure of the summary) and the
    limits the server announces in its headers (shown where the run was given none)."""

    __slots__ = ("_inner", "_state")

    def __init__(self, inner: Transport, state: RunState) -> None:
        self._inner = inner
        self._state = state

    async def send(self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None) -> Response:
        state = self._state
        if state.first_request is None:
            state.first_request = time.monotonic()
            state.first_sent.set()
            log.info("first_request", after_s=round(state.first_request - state.started, 3))
        response = await self._inner.send(endpoint, body, timeout=timeout)
        counts = state.counts
        if counts.server_rpm is None and counts.server_tpm is None and response.headers:
            seen = read_limits(response.headers, None, now_unix=time.time())
            if seen is not None:
                counts.server_rpm = _whole(seen.requests.limit if seen.requests else None)
                counts.server_tpm = _whole(seen.tokens.limit if seen.tokens else None)
        return response

    def stream(
        self, endpoint: str, body: Mapping[str, Any], *, timeout: float | None
    ) -> contextlib.AbstractAsyncContextManager[StreamResponse]:
        return self._inner.stream(endpoint, body, timeout=timeout)


class LogFilter:
    """A structlog processor that drops what the run reports otherwise.

    - ``job_failed`` of jobs a stop kept from running: the next run does them; one line says why it stopped;
    - ``run_stopped`` after Ctrl-C: the run said so in one calm line;
    - ``run_stopped`` for the budget: the pool knows only this run's share of it; the summary says it whole;
    - ``dispatch_paused`` under the live display, which counts the pauses.
    """

    __slots__ = ("live", "state")

    def __init__(self, *, live: bool) -> None:
        self.live = live
        self.state: RunState | None = None

    def __call__(self, _logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        name = event.get("event")
        if (
            (name == "job_failed" and event.get("code") in STOPPED_CODES)
            or (name == "run_stopped" and self.state is not None and self.state.signal is not None)
            or (name == "run_stopped" and event.get("code") == BudgetExhausted.code)
            or (name == "dispatch_paused" and self.live)
        ):
            raise structlog.DropEvent
        return event


def input_requests(
    source: Path, model: str, writer: OutputWriter, state: RunState, prior: OutputScan, scan: InputScan,
    expect: Callable[[str, int, Any, Any], None], priority: int = 0,
) -> Iterator[Request]:
    """The input's requests not done yet, read as they are wanted; invalid lines become error records.

    Args:
        source: the input file.
        model: the model of bodies that name none.
        writer: where an invalid line's error record goes.
        state: the run's state (reading stops once it is stopping).
        prior: what the output already holds.
        scan: what the first pass over the input found.
        expect: told ``(custom_id, request hash, metadata, body)`` of each request before it is yielded
            (``OutputWriter.expect``, or a store of its own for results that come much later).
        priority: the priority of lines that give none.
    """
    counts = state.counts
    resuming = len(prior.done) > 0
    with source.open("rb") as file:
        for number, raw in read_lines(file):
            if state.stopping is not None:
                return
            if resuming:
                custom_id = line_custom_id(number, raw)
                if prior.is_done(custom_id) and custom_id not in scan.changed:
                    continue  # done by an earlier run (its request checked by scan_input)
            line = parse_line(number, raw, model=model, priority=priority)
            if line.request is None:
                log.warning("invalid_line", file=str(source), line=number, custom_id=line.custom_id,
                            problem=line.problem)
                counts.failed += 1
                counts.invalid += 1
                state.first_invalid = state.first_invalid or f"line {number}: {line.problem}"
                if resuming and prior.recorded_invalid(line.custom_id, raw):
                    continue  # the same line's record is already there
                try:
                    writer.write(line.error_result(), fingerprint=line_hash(raw))
                except OutputUnwritable as exc:
                    state.stop_at_once(exc)
                    return
                continue
            request = line.request
            expect(line.custom_id, request_hash(request.endpoint, request.body), line.metadata, request.body)
            yield request


def warm_up(model: str, first_sent: threading.Event, ready: threading.Event) -> None:
    """Import the SDK while the main thread reads the files; load the tokenizer's encoding once the first
    request is out. Each takes a good part of a second of CPU, and under the GIL they would slow each other
    down: the first request needs the SDK, not the encoding (see WarmEstimator)."""
    import openai  # noqa: F401

    first_sent.wait(timeout=10.0)
    TokenEstimator.preload(model)
    ready.set()


class WarmEstimator(TokenEstimator):
    """Token estimates that never wait for the tokenizer: 4 characters a token (close to tiktoken's count of
    ordinary text, so the calibration learned meanwhile stays right) until the encoding has loaded, tiktoken
    after. The first request needs the SDK, not the encoding.

    The least a prompt can cost (``lower``) is counted for real, loading the encoding at once if it must: it
    decides whether a line is refused for not fitting its context window, which a guess must not decide. Only a
    prompt whose guess is over its window asks for it."""

    __slots__ = ("_ready",)

    def __init__(self, ready: threading.Event, default_output_tokens: int = 1024) -> None:
        super().__init__(default_output_tokens)
        self._ready = ready

    def prompt_tokens(self, endpoint: str, body: Mapping[str, Any], *, lower: bool = False) -> int:
        if lower or self._ready.is_set():
            return super().prompt_tokens(endpoint, body, lower=lower)
        return math.ceil(self.prompt_chars(endpoint, body) / 4) + 3 * (len(body.get("messages") or ()) + 1)

    def message_tokens(self, message: Any, model: str, *, lower: bool = False) -> int:
        # Trimming subtracts these from prompt_tokens: counted alike, or a chat is trimmed too little.
        if lower or self._ready.is_set():
            return super().message_tokens(message, model, lower=lower)
        return math.ceil(self.prompt_chars(CHAT, {"model": model, "messages": [message]}) / 4) + 3


class CurrentStderr:
    """A file writing to whatever ``sys.stderr`` is now (rich swaps in a proxy during the live display)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere), so start-up figures include the imports."""
    try:
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _whole(value: float | None) -> int | None:
    return round(value) if value is not None else None
