"""The Batch API tiers of ``scheduler run``: ``--tier batch`` and ``--tier auto``.

The same input and the same output as online runs: the lines not done yet go into Batch API input files (the
journal ``OUT.batches`` and its request files ``OUT.batches.parts/`` beside the output, see
:mod:`scheduler.batch_api`), and each batch's results are written to OUT through the same
:class:`~scheduler.output.OutputWriter` as it ends, with ``"scheduler": {"tier": "batch", "batch_id": ...}``.

- Resume: running the same command again re-attaches to the batches still running (none is submitted twice),
  writes what ended meanwhile, and skips every id OUT already has.
- Ctrl-C: the batches keep running on the API; the message says how to resume (the same command) or to cancel
  them (``scheduler batches cancel OUT``).
- ``auto``: everything goes to the Batch API first. When the deadline less the time what is left would take
  online (:func:`scheduler.batch_api.cutover_at`, from the limits) comes, the running batches are cancelled, what
  they finished is written, and the rest is handed back to run online: flex where the model offers it (falling
  back to standard when flex has no capacity), standard otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from ..batch_api import BatchLimits, BatchRun, Polling, cutover_at, run_batch
from ..errors import SchedulerError
from ..jsonl import IdMap, InputScan, OutputScan, request_hash
from ..logs import redact
from ..output import OutputWriter
from ..progress import Progress
from ..requests import Request
from .estimate import CUTOVER_SAFETY, margin_s
from .options import UsageError, batch_state
from .runtime import Recorder, RunState, WarmEstimator, input_requests
from .verdict import SIGNAL_EXIT

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ..cost import PriceTable
    from ..limits import Limits
    from ..progress import RunCounts
    from .plan import Plan

__all__ = ["check_tier_arguments", "flex_extra", "run_batches", "saving", "tier_figures"]

log = structlog.get_logger("scheduler")

# The built-in mock runs batches in seconds: poll it often.
_MOCK_POLLING = Polling(first_s=0.05, cap_s=0.5)
# Input lines read between two turns of the event loop (the display and Ctrl-C stay alive while planning).
_LINES_A_TURN = 500
_FLEX: Mapping[str, Any] = {"service_tier": "flex"}
# The endpoints that take a service_tier (embeddings and the others do not).
_FLEX_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/responses"})
# Error code of a stop the Batch API's state or answers caused (a journal that does not match the account...).
_BATCH_STOPPED = "batch_run_failed"


async def run_batches(
    plan: Plan, client: AsyncOpenAI, writer: OutputWriter, state: RunState, progress: Progress, prior: OutputScan,
    scan: InputScan,
) -> Iterator[Request] | None:
    """Run the lines not done yet on the Batch API, writing each batch's results as it ends.

    Returns:
        What ``--tier auto`` hands back to run online after its cut-over (each request's line noted with the
        writer), or None: nothing is left for online, or the run stopped.
    """
    from ..cost import PriceTable

    state.first_sent.set()  # nothing goes online now: the tokenizer may load
    prices = PriceTable.load(plan.prices)
    expected = _Expected(echo=plan.echo_requests)
    recorder = Recorder(writer, state, prices)
    estimator = WarmEstimator(state.tokenizer_ready)
    cutover = _Cutover.plan(plan) if plan.tier == "auto" else None
    source = _source(plan, writer, state, prior, scan, expected, cutover)
    batch_run = run_batch(
        source, client=client, state=batch_state(plan.output), done=_Done(prior, scan), model=plan.model,
        max_attempts=plan.max_attempts, limits=BatchLimits(max_requests=plan.batch_size), polling=_polling(plan),
        prices=prices, estimate=cutover.estimate(estimator) if cutover is not None else None,
    )
    if cutover is not None:
        cutover.run = batch_run
    progress.tier = "batch"
    progress.follow_batches(batch_run.statistics)
    loop = asyncio.get_running_loop()
    state.hard_stop = anyio.CancelScope()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on Windows: Ctrl-C stops at once
        for signum in SIGNAL_EXIT:
            loop.add_signal_handler(signum, _on_signal, signum, state, progress)
    try:
        with state.hard_stop:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(progress.watch)
                if cutover is not None:
                    tasks.start_soon(cutover.watch, progress)
                async for result in batch_run:
                    expected.expect(writer, result.custom_id)
                    recorder.record(result)
                tasks.cancel_scope.cancel()
    except SchedulerError as exc:  # the key refused, a journal that does not fit the account, a missing file
        state.stop(getattr(exc, "code", _BATCH_STOPPED), str(exc))
    except Exception as exc:
        import openai

        if not isinstance(exc, openai.APIError):
            raise
        state.stop(_BATCH_STOPPED, f"the Batch API answered: {redact(str(exc))}")
    finally:
        for signum in SIGNAL_EXIT:
            loop.remove_signal_handler(signum)
        await batch_run.aclose()  # releases the journal; the batches keep running
        statistics = batch_run.statistics()
        state.batch_statistics = statistics
        state.batches_running = sum(1 for b in statistics.batches if b.batch_id is not None and b.status in
                                    ("validating", "in_progress", "finalizing", "cancelling", "submitted"))
    if state.stopping is not None or not batch_run.stopped:
        return None
    return _online(batch_run, writer, expected)


def _polling(plan: Plan) -> Polling:
    if plan.mock:
        return _MOCK_POLLING
    return Polling(first_s=min(2.0, plan.poll_s), cap_s=plan.poll_s)


class _Done:
    """The ids OUT already has a result for (the batch run neither plans nor hands them out): those an earlier run
    wrote, less the changed requests run again (--rerun-changed)."""

    __slots__ = ("_prior", "_scan")

    def __init__(self, prior: OutputScan, scan: InputScan) -> None:
        self._prior = prior
        self._scan = scan

    def __contains__(self, custom_id: object) -> bool:
        return isinstance(custom_id, str) and self._prior.is_done(custom_id) and custom_id not in self._scan.changed


class _Expected:
    """What each request's output line carries besides its result (its request hash; its metadata and, with
    --echo-request, its body), kept until the result comes (hours later, on the Batch API): hashes in an
    :class:`~scheduler.jsonl.IdMap` (16 bytes a request), the rest only for the lines that have any."""

    __slots__ = ("_echo", "_extra", "_hashes")

    def __init__(self, *, echo: bool) -> None:
        self._echo = echo
        self._hashes = IdMap()
        self._extra: dict[str, tuple[Any, Any]] = {}

    def note(self, custom_id: str, fingerprint: int, metadata: Any, body: Any) -> None:
        """Keep what ``custom_id``'s line will carry (``OutputWriter.expect``'s arguments)."""
        self._hashes[custom_id] = fingerprint
        if metadata is not None or self._echo:
            self._extra[custom_id] = (metadata, body if self._echo else None)

    def expect(self, writer: OutputWriter, custom_id: str, request: Request | None = None) -> None:
        """Tell ``writer`` what ``custom_id``'s line carries, just before its result is written."""
        fingerprint = self._hashes.get(custom_id)
        if fingerprint is None and request is not None:
            fingerprint = request_hash(request.endpoint, request.body)
        if fingerprint is None:
            return  # planned by an earlier run from a line no longer in the input: written without a hash
        metadata, body = self._extra.pop(custom_id, (None, None))
        writer.expect(custom_id, fingerprint, metadata, body)


async def _source(
    plan: Plan, writer: OutputWriter, state: RunState, prior: OutputScan, scan: InputScan, expected: _Expected,
    cutover: _Cutover | None,
) -> AsyncIterator[Request]:
    """The input's requests not done yet, letting the event loop turn every so many lines; at the end of the
    input, ``auto`` decides whether there is time for batches at all (before any is submitted)."""
    requests = input_requests(plan.input, plan.model, writer, state, prior, scan, expected.note, plan.priority)
    for count, request in enumerate(requests, 1):
        yield request
        if count % _LINES_A_TURN == 0:
            await asyncio.sleep(0)
    if cutover is not None and state.stopping is None:
        cutover.check(planning=True)


class _Cutover:
    """When ``--tier auto`` stops the Batch API: :func:`~scheduler.batch_api.cutover_at` of the deadline, the
    work left (requests and estimated tokens) and the online limits."""

    def __init__(self, deadline: float, limits: Limits, margin: float) -> None:
        #: the deadline on the event loop's clock
        self.deadline = deadline
        self.limits = limits
        self.margin = margin
        self.run: BatchRun | None = None
        #: requests and tokens planned by this run and not recorded yet (the run's statistics count them once
        #: their parts are recorded)
        self._planned = [0, 0]

    @classmethod
    def plan(cls, plan: Plan) -> _Cutover:
        """The cut-over of ``plan``'s deadline (wall-clock time) on the event loop's clock."""
        limits = plan.online_limits()
        assert limits is not None and plan.deadline_unix is not None  # checked when the arguments were read
        left = plan.deadline_unix - time.time()
        return cls(asyncio.get_running_loop().time() + left, limits, margin_s(left))

    def estimate(self, estimator: WarmEstimator) -> Any:
        """The batch run's token estimate, counting what it plans."""

        def estimate(endpoint: str, body: Any) -> int:
            tokens = estimator.estimate(endpoint, body)
            self._planned[0] += 1
            self._planned[1] += tokens
            return tokens

        return estimate

    def check(self, *, planning: bool = False) -> bool:
        """Stop the batch run (cancelling its batches) if the cut-over has come; True once it is stopped.

        Args:
            planning: the input was just read and the parts of this run are not recorded yet.
        """
        run = self.run
        if run is None or run.stopped:
            return True
        stats = run.statistics()
        requests, tokens = stats.requests_left, stats.tokens_left
        if planning:
            requests, tokens = requests + self._planned[0], tokens + self._planned[1]
        at = cutover_at(self.deadline, requests=requests, tokens=tokens, rpm=self.limits.rpm, tpm=self.limits.tpm,
                        safety=CUTOVER_SAFETY, margin_s=self.margin)
        if asyncio.get_running_loop().time() < at:
            return False
        log.info("tier_cutover", requests_left=requests, tokens_left=tokens,
                 deadline_in_s=round(self.deadline - asyncio.get_running_loop().time(), 1))
        run.stop()
        return True

    async def watch(self, progress: Progress) -> None:
        """Check the cut-over about once a second until it comes."""
        while not self.check():
            await anyio.sleep(1.0)
        progress.say("Cutting over: the deadline is near; the running batches are cancelled and what they did not "
                     "finish runs online.", "tier_cutover")


def _online(batch_run: BatchRun, writer: OutputWriter, expected: _Expected) -> Iterator[Request]:
    """What the stopped batch run hands back, each request's line noted with the writer as it is taken."""
    for request in batch_run.hand_back():
        assert request.custom_id is not None
        expected.expect(writer, request.custom_id, request)
        yield request


def _on_signal(signum: int, state: RunState, progress: Progress) -> None:
    """Ctrl-C: stop at once. The batches keep running on the API (they hold nothing of ours); the summary says
    how to resume or cancel them."""
    if state.signal is None:
        state.signal = signum
        state.stopping = signal.Signals(signum).name
        progress.say("Stopping: the batches keep running on the API.", "run_stopping")
    if state.hard_stop is not None:
        state.hard_stop.cancel()


# -- what run.py asks of the tiers ---------------------------------------------------------------------------


def check_tier_arguments(args: argparse.Namespace) -> None:
    """The tier's own flags, and the flags it cannot honour.

    Raises:
        UsageError: they do not fit.
    """
    tier = args.tier
    if tier == "auto":
        if args.deadline is None:
            raise UsageError("--tier auto plans for a deadline: give --deadline (6h, 90m, or an ISO time)")
        if args.deadline <= time.time():
            raise UsageError("the --deadline has passed")
        if not (args.rpm or args.tpm or args.limit or args.mock):
            raise UsageError("--tier auto needs the online limits (--rpm/--tpm) to know how long what is left "
                             "takes online")
    elif args.deadline is not None:
        raise UsageError("--deadline plans --tier auto")
    if args.flex_fallback is not None and tier != "flex":
        raise UsageError("--flex-fallback is for --tier flex (--tier auto always falls back to standard)")
    if tier in ("batch", "auto") and args.endpoints is not None:
        raise UsageError(f"--tier {tier} sends batches through one endpoint (--base-url): --endpoints is for the "
                         "online tiers")
    if tier == "batch":
        online_only = [("--redis", args.redis), ("--cache", args.cache), ("--fallback", args.fallback),
                       ("--budget", args.budget is not None), ("--metrics-port", args.metrics_port is not None)]
        unused = [flag for flag, value in online_only if value]
        if unused:
            raise UsageError(f"{', '.join(unused)} serve(s) online runs, not the Batch API (a batch is billed as a "
                             "whole: see its cost before with --dry-run)")


def flex_extra(plan: Plan, prices: PriceTable) -> Callable[[str, Any], Mapping[str, Any]] | None:
    """What goes into an online request's body, by its endpoint and model: ``service_tier: "flex"`` on the
    endpoints that take it (chat completions, responses) for --tier flex, and for what --tier auto left online
    where the model offers flex (it has a flex price). None: nothing."""
    if plan.tier not in ("flex", "auto"):
        return None
    offered: dict[Any, bool] = {}

    def flex(endpoint: str, model: Any) -> Mapping[str, Any]:
        if endpoint not in _FLEX_ENDPOINTS:
            return {}
        if plan.tier == "flex":
            return _FLEX
        if model not in offered:
            offered[model] = isinstance(model, str) and prices.price(model, "flex") is not None
        return _FLEX if offered[model] else {}

    return flex


def tier_figures(plan: Plan, state: RunState) -> dict[str, Any]:
    """The summary's figures of the tier: which, and the batches of the batch tiers."""
    if plan.tier == "standard":
        return {}
    figures: dict[str, Any] = {"tier": plan.tier}
    run = state.batch_statistics
    if run is not None:
        figures.update(batches=len(run.batches), batch_refusals=run.refusals, batch_retried=run.retried,
                       batches_running=state.batches_running)
    return figures


def saving(counts: RunCounts) -> dict[str, Any]:
    """Cost per tier and the saving against standard prices, when a cheaper tier served anything."""
    if set(counts.cost_by_tier) <= {"standard"}:
        return {}
    return {"cost_by_tier": {tier: round(usd, 6) for tier, usd in sorted(counts.cost_by_tier.items())},
            "standard_cost_usd": round(counts.standard_usd, 6),
            "saved_usd": round(max(0.0, counts.standard_usd - counts.cost_usd), 6)}
