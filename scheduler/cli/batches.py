"""``scheduler batches status|cancel OUT``: the Batch API batches of a run writing OUT (``--tier batch|auto``).

Their state is the journal beside the output (``OUT.batches``). ``status`` reads it without disturbing a run
that is going on, and asks the API about the batches still running; ``cancel`` cancels them (a run must not be
going on: it holds the journal). Lines a cancelled batch completed are kept by the API: running the same
``scheduler run`` command again writes them and runs the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import orjson

from ..errors import SchedulerError
from ..logs import configure_logging, redact
from .options import UsageError, api_settings, batch_state, fail

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``batches status`` and ``batches cancel`` to the ``scheduler`` command."""
    batches = commands.add_parser(
        "batches", help="the Batch API batches of a run: status, cancel",
        description="The Batch API batches of a 'scheduler run --tier batch|auto' writing OUTPUT; their state is "
        "OUTPUT.batches beside it. The API key comes from OPENAI_API_KEY.",
    )
    actions = batches.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (
        ("status", "where each batch stands (the API is asked about those still running)"),
        ("cancel", "cancel the batches still running; run the same 'scheduler run' again to collect what they "
                   "finished and run the rest"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("output", type=Path, help="the output file of the run")
        action.add_argument("--base-url", help="API base URL (default: OPENAI_BASE_URL, else OpenAI's)")
        if name == "status":
            action.add_argument("--json", action="store_true", help="one JSON object a batch")
        action.set_defaults(handler=_handle, command_parser=action)


def _handle(args: argparse.Namespace) -> int:
    configure_logging(level=logging.WARNING)  # to stderr: stdout is the status, JSON with --json
    command = f"batches {args.action}"
    state = Path(batch_state(args.output))
    if not state.is_file():
        return fail(command, f"no batch state beside {args.output} ({state} is missing): no batch run wrote it")
    try:
        key, base_url = api_settings(args.base_url)
    except UsageError as exc:
        if args.action == "cancel":
            return fail(command, str(exc))
        key, base_url = "", None  # status without a key: what the journal says
    try:
        return asyncio.run(_status(state, key, base_url, args.json) if args.action == "status"
                           else _cancel(args.output, state, key, base_url))
    except SchedulerError as exc:
        return fail(command, str(exc))
    except Exception as exc:
        import openai

        if not isinstance(exc, openai.APIError):
            raise
        return fail(command, f"the API answered: {redact(str(exc))}", 3)


async def _cancel(output: Path, state: Path, key: str, base_url: str | None) -> int:
    from openai import AsyncOpenAI

    from ..batch_api import cancel_batches

    async with AsyncOpenAI(api_key=key, base_url=base_url) as client:
        cancelled = await cancel_batches(state, client=client)
    if cancelled:
        print(f"Cancel requested for {len(cancelled)} batch(es): {', '.join(cancelled)}. Lines they finished are "
              f"kept: run the same 'scheduler run ... -o {output}' again to write them and run the rest.")
    else:
        print("No batch of this run is running: nothing to cancel.")
    return 0


async def _status(state: Path, key: str, base_url: str | None, as_json: bool) -> int:
    from ..batch_api import batch_status

    if key:
        from openai import AsyncOpenAI

        async with AsyncOpenAI(api_key=key, base_url=base_url) as client:
            found = await batch_status(state, client=client)
    else:
        found = await batch_status(state, client=None)
    if as_json:
        for status in found:
            print(orjson.dumps({"part": status.part, "batch_id": status.batch_id, "status": status.status,
                                "requests": status.requests, "completed": status.completed,
                                "failed": status.failed, "delivered": status.delivered}).decode())
        return 0
    print(f"{'part':>5}  {'batch':<34} {'status':<12} {'done':>15} {'failed':>7}  written")
    for s in found:
        done = f"{s.completed:,}/{s.requests:,}"
        print(f"{s.part:>5}  {s.batch_id or '-':<34} {s.status:<12} {done:>15} {s.failed:>7,}  "
              f"{'yes' if s.delivered else 'no'}")
    if not key:
        print("(OPENAI_API_KEY is not set: statuses are the journal's, not the API's)")
    return 0
