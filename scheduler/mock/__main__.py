"""`python -m scheduler.mock --port 8000 [options]`: run the mock OpenAI server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from .config import add_mock_arguments, config_from_args
from .server import serve


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and serve until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.mock",
        description="OpenAI-compatible mock server that enforces RPM/TPM limits like the real API.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port to bind; 0 picks a free one (default 8000)"
    )
    add_mock_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
