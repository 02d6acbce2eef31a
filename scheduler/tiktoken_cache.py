"""tiktoken's encodings for offline machines: ``python -m scheduler.tiktoken_cache download DIR``.

tiktoken downloads an encoding the first time it is used and keeps it in ``TIKTOKEN_CACHE_DIR`` (under the SHA-1
of its URL, checked against a SHA-256 when read). A machine without internet access cannot download it, and the
token estimates then fall back to a rough count. On a machine with network, ``download DIR`` has tiktoken fill
``DIR`` with the encodings of current OpenAI models (o200k_base, cl100k_base); copy the folder to the offline
machine and point ``TIKTOKEN_CACHE_DIR`` at it. ``check`` says whether the encodings load here.

This module is a command of its own, not imported by the package: ``python -m`` would otherwise warn that it
runs a module already imported.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from .tokens import encoding_available

__all__ = ["ENCODINGS", "download_encodings", "main"]

#: the encodings of current OpenAI models: o200k_base (gpt-4o and later), cl100k_base (gpt-4, gpt-3.5, embeddings)
ENCODINGS = ("o200k_base", "cl100k_base")


def download_encodings(directory: str | os.PathLike[str], names: Iterable[str] = ENCODINGS) -> list[Path]:
    """Have tiktoken download ``names`` into ``directory`` as its cache; returns the files it added.

    ``TIKTOKEN_CACHE_DIR`` is set to ``directory`` while tiktoken loads them, then restored. An encoding this
    process has loaded already is not read again, so run this in a fresh process (the command does).

    Raises:
        Exception: whatever tiktoken raised (no network: a ``requests`` connection error).
    """
    import tiktoken

    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder.resolve())
    try:
        for name in names:
            tiktoken.get_encoding(name)
    finally:
        if previous is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = previous
    return sorted(set(folder.iterdir()) - before)


def main(argv: Sequence[str] | None = None) -> int:
    """The command: ``download DIR`` or ``check``; returns the exit code (0 done, 1 failed)."""
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.tiktoken_cache",
        description="tiktoken's encodings for machines without internet access.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    download = commands.add_parser("download", help="download the encodings into DIR (needs network)")
    download.add_argument("directory", metavar="DIR", type=Path)
    download.add_argument("--encoding", action="append", dest="names", metavar="NAME",
                          help=f"an encoding to download (repeatable; default: {', '.join(ENCODINGS)})")
    check = commands.add_parser("check", help="say whether the encodings load here (TIKTOKEN_CACHE_DIR, network)")
    check.add_argument("--encoding", action="append", dest="names", metavar="NAME")
    args = parser.parse_args(argv)
    names = args.names or list(ENCODINGS)
    if args.command == "check":
        missing = [name for name in names if not encoding_available(name)]
        for name in names:
            print(f"{name}: {'missing' if name in missing else 'ok'}")
        if missing:
            print("Set TIKTOKEN_CACHE_DIR to a folder filled by 'download' on a machine with network.")
        return 1 if missing else 0
    try:
        added = download_encodings(args.directory, names)
    except Exception as exc:  # tiktoken's errors: requests', OSError, ValueError
        print(f"could not download {', '.join(names)} ({type(exc).__name__}): this needs network access",
              file=sys.stderr)
        return 1
    size = sum(path.stat().st_size for path in added)
    if added:
        print(f"{args.directory}: {len(added)} file(s) added ({size / 1e6:.1f} MB) for {', '.join(names)}.")
    else:
        print(f"{args.directory}: nothing added: it holds {', '.join(names)} already.")
    print("Copy the folder to the offline machine and set TIKTOKEN_CACHE_DIR to it there.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
