"""The distributed commands: ``scheduler enqueue``, ``scheduler worker`` and ``scheduler collect``.

:func:`add_parser` adds them to the ``scheduler`` command; each sets ``handler``, a function of the parsed
arguments that returns the exit code: 0 done (a worker: drained with ``--burst``, or stopped by
SIGINT/SIGTERM after its requests in flight), 2 unusable input, arguments or Redis, 3 (worker) a run-fatal error
(quota, a refused key) stopped it, leaving its requests pending for another worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from ..logs import configure_logging
from .options import DEFAULT_MODEL, UsageError, api_settings, fail, positive_int, seconds

__all__ = ["add_parser"]

DEFAULT_STREAM = "scheduler"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``enqueue``, ``worker`` and ``collect`` to ``subparsers``; each sets ``handler(args) -> int``."""
    enqueue = subparsers.add_parser(
        "enqueue", help="put a JSONL file of requests on a Redis Stream, for workers on any host",
        description="Put every request of INPUT (Batch API lines, request bodies or {\"prompt\": ...} lines) on "
        "the stream. custom_ids already enqueued or done are skipped, so enqueueing again is safe.",
    )
    enqueue.add_argument("input", type=Path, help="requests, one JSON object a line")
    _common(enqueue)
    enqueue.add_argument("--model", help="model of requests that name none (default: the worker's --model)")
    enqueue.set_defaults(handler=_enqueue)

    worker = subparsers.add_parser(
        "worker", help="run the requests of a Redis Stream; every worker shares one RPM/TPM budget",
        description="Consume the stream through its consumer group, within limits shared through the same "
        "Redis by every worker on every host. The API key comes from OPENAI_API_KEY. SIGINT/SIGTERM stop it "
        "after the requests in flight.",
    )
    _common(worker)
    add = worker.add_argument
    add("--base-url", help="API base URL (default: OPENAI_BASE_URL, else OpenAI's)")
    add("--model", default=DEFAULT_MODEL, help=f"model of requests that name none (default {DEFAULT_MODEL})")
    add("--rpm", type=positive_int, help="requests per minute, for all workers together")
    add("--tpm", type=positive_int, help="tokens per minute, for all workers together")
    add("--workers", type=positive_int, default=64, help="most requests in flight in this worker (default 64)")
    add("--max-attempts", type=positive_int, default=6, help="attempts per request (default 6)")
    add("--burst", action="store_true", help="exit once the stream is drained instead of waiting for more")
    add("--claim-idle", type=seconds, default=120.0, metavar="SECONDS",
        help="take over a dead worker's requests once idle this long (default 120; living workers keep "
        "theirs fresh)")
    add("--max-deliveries", type=positive_int, default=5, metavar="N",
        help="dead-letter a request delivered more than N times (default 5)")
    add("-v", "--verbose", action="store_true", help="also log retries and other info events")
    worker.set_defaults(handler=_worker)

    collect = subparsers.add_parser(
        "collect", help="write a distributed run's results to a JSONL file, or show its progress",
        description="Append the results not yet in OUTPUT (the Batch API output format, as 'scheduler run' "
        "writes); or, with --status, print the counts.",
    )
    _common(collect)
    what = collect.add_mutually_exclusive_group(required=True)
    what.add_argument("-o", "--output", type=Path, help="results file (appended to; ids already there skipped)")
    what.add_argument("--status", action="store_true", help="print enqueued/done/in progress/waiting/dead counts")
    collect.add_argument("--watch", type=seconds, metavar="SECONDS",
                         help="with --status: print again every SECONDS until every request is done")
    collect.set_defaults(handler=_collect)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis", required=True, metavar="URL", help="Redis URL, e.g. redis://host:6379/0")
    parser.add_argument("--stream", default=DEFAULT_STREAM,
                        help=f"name of the run (its Redis keys are {{NAME}}:...; default {DEFAULT_STREAM})")


def _enqueue(args: argparse.Namespace) -> int:
    from ..distributed import connect, enqueue

    configure_logging(level=logging.WARNING)
    if not args.input.is_file():
        return fail("enqueue", f"no such input file: {args.input}")

    async def main() -> Any:
        client = await connect(args.redis)
        try:
            return await enqueue(client, args.input, stream=args.stream, model=args.model)
        finally:
            await client.aclose()

    try:
        report = asyncio.run(main())
    except ConfigurationError as exc:
        return fail("enqueue", str(exc))
    print(f"enqueued {report.added:,}, skipped {report.skipped:,} already enqueued or done, "
          f"{report.invalid:,} invalid line(s) stored as error results (stream {args.stream})")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from ..distributed import WorkerOptions, run_worker
    from ..limits import Limits

    configure_logging(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        key, base_url = api_settings(args.base_url)
    except UsageError as exc:
        return fail("worker", str(exc))
    if args.rpm is None and args.tpm is None:
        return fail("worker", "give the shared limits: --rpm and/or --tpm (for all workers together)")
    try:
        options = WorkerOptions(burst=args.burst, claim_idle_s=args.claim_idle, max_deliveries=args.max_deliveries)
        code: int = asyncio.run(run_worker(
            args.redis, stream=args.stream, base_url=base_url,
            api_key=key, model=args.model, limits=Limits(rpm=args.rpm, tpm=args.tpm), workers=args.workers,
            max_attempts=args.max_attempts, options=options,
        ))
    except ConfigurationError as exc:
        return fail("worker", str(exc))
    except BaseExceptionGroup as group:
        # Redis lost for good mid-run surfaces through the pool's task group.
        found, _ = group.split(ConfigurationError)
        if found is None:
            raise
        return fail("worker", "; ".join(str(exc) for exc in _leaves(found)))
    return code


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _collect(args: argparse.Namespace) -> int:
    from ..distributed import connect
    from ..distributed_collect import collect, status

    configure_logging(level=logging.WARNING)
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        return fail("collect", f"cannot write {args.output}")

    async def main() -> int:
        client = await connect(args.redis)
        try:
            if args.output is not None:
                report = await collect(client, args.output, stream=args.stream)
                print(f"wrote {report.written:,} result(s) to {args.output} ({report.present:,} already there)")
                return 0
            while True:
                now = await status(client, stream=args.stream)
                print(now, flush=True)
                if args.watch is None or (now.enqueued and now.done >= now.enqueued):
                    return 0
                await asyncio.sleep(args.watch)
        finally:
            await client.aclose()

    try:
        return asyncio.run(main())
    except ConfigurationError as exc:
        return fail("collect", str(exc))
    except KeyboardInterrupt:
        return 130
