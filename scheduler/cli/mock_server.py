"""``scheduler mock-server``: the built-in OpenAI-compatible mock server, on its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

__all__ = ["add_parser"]


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], *, with_options: bool) -> None:
    """Add ``mock-server``; its many options only when ``with_options`` (importing the mock server, aiohttp's
    web part, would slow every other command)."""
    mock = commands.add_parser("mock-server", help="run the built-in OpenAI-compatible mock server")
    mock.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    mock.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default 8000)")
    if with_options:
        from ..mock import add_mock_arguments

        add_mock_arguments(mock)
    mock.set_defaults(handler=lambda args: _serve(mock, args))


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from ..mock import config_from_args, serve

    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port))
    return 0
