"""The ``scheduler`` command: one module per subcommand, the options they share in :mod:`.options`.

::

    scheduler run          a resumable bulk run of a JSONL file            (run.py; the Batch API tiers: tiers.py)
    scheduler estimate     its cost and time on each tier, nothing sent    (estimate.py)
    scheduler batches      status and cancel of a run's Batch API batches  (batches.py)
    scheduler mock-server  the built-in OpenAI-compatible mock server      (mock_server.py)
    scheduler enqueue | worker | collect   bulk runs over a Redis Stream   (distributed.py)

Each module's ``add_parser(commands)`` adds its subcommand(s) and sets ``handler(args) -> exit code``. Heavy
imports (the SDK, aiohttp's server, redis) happen inside the handlers, so ``--help`` and start-up stay quick.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import batches, distributed, estimate, mock_server, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``scheduler`` command.

    Called without ``argv`` (as the command) it ends the process as soon as the output is flushed, skipping
    the interpreter's teardown (about half a second with the SDK loaded); with ``argv`` it returns the code.
    """
    arguments = sys.argv[1:] if argv is None else argv
    top = parser(with_mock_options=arguments[:1] == ["mock-server"])
    args, unknown = top.parse_known_args(arguments)
    if unknown:
        # Said by the command's own parser, so the usage shown is the command's, not the list of commands.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        code = int(args.handler(args))
    except KeyboardInterrupt:
        # Ctrl-C while reading the files or starting up: nothing was sent.
        print("scheduler: interrupted before any request was sent", file=sys.stderr)
        code = 130
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def parser(*, with_mock_options: bool = False) -> argparse.ArgumentParser:
    """The whole command line; the mock server's many options only when that command is run."""
    top = argparse.ArgumentParser(
        prog="scheduler",
        description="Push many requests through an OpenAI-compatible API within its rate limits.",
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(commands)
    estimate.add_parser(commands)
    batches.add_parser(commands)
    mock_server.add_parser(commands, with_options=with_mock_options)
    distributed.add_parser(commands)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)
    return top
