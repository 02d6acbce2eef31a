"""The run's files on disk: the request file of each part, and the output and error files of its batch.

Everything is read and written a line at a time, so memory does not grow with the input or with a batch's
output: a part's request file is written as its lines are planned, a batch's output is streamed from the API to a
file beside the parts and parsed line by line from there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson
import structlog

from .. import errors
from ..jsonl import IdSet
from ..requests import ENDPOINTS, Request

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["Filling", "batch_request", "check_unique", "download", "part_ids", "part_lines", "result_lines"]

log = structlog.get_logger("scheduler")


class Filling:
    """A part's request file being written (``part-000001.jsonl`` in the parts folder)."""

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
        """Append one request line (its newline included) of ``tokens`` estimated tokens."""
        self.file.write(line)
        self.count += 1
        self.size += len(line)
        self.tokens += tokens

    def finish(self) -> None:
        """Close the file, synced to the disk."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


def batch_request(request: Request, model: str | None) -> tuple[str, dict[str, Any]]:
    """The endpoint and body of a request's line in a batch input file (``model`` filled in where it names none).

    Raises:
        ConfigurationError: the Batch API does not serve its endpoint, or it names no model.
    """
    endpoint = request.endpoint
    if endpoint not in ENDPOINTS:
        raise errors.ConfigurationError(
            f"request {request.custom_id!r}: the Batch API does not serve {endpoint!r} "
            f"(it serves {', '.join(sorted(ENDPOINTS))})"
        )
    body = dict(request.body)
    if "model" not in body:
        if model is None:
            raise errors.ConfigurationError(f"request {request.custom_id!r} names no model (pass model=)")
        body["model"] = model
    if not isinstance(body["model"], str) or not body["model"]:
        raise errors.ConfigurationError(f"request {request.custom_id!r}: body.model must be a non-empty string")
    return endpoint, body


def check_unique(ids: IdSet, paths: Iterable[Path]) -> None:
    """Raise if an id of the part files at ``paths`` comes twice. ``ids`` (their hashes) says which ids may: only
    those are read again, and only when there are any.

    Raises:
        ConfigurationError: an id comes twice.
    """
    repeated = ids.repeated()
    if not repeated:
        return
    seen: set[str] = set()
    for path in paths:
        for custom_id in part_ids(path):
            if hash(custom_id) in repeated:
                if custom_id in seen:
                    raise errors.ConfigurationError(f"custom_id {custom_id!r} appears more than once")
                seen.add(custom_id)


def part_lines(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(custom_id, line)`` of each line of a part's request file.

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


def part_ids(path: Path) -> Iterator[str]:
    """The ids of a part's request file, in order."""
    return (custom_id for custom_id, _ in part_lines(path))


async def download(client: AsyncOpenAI, file_id: str, path: Path) -> None:
    """Stream the content of the API's file ``file_id`` into ``path`` (replacing it), a chunk at a time.

    Raises:
        openai.APIError: the download failed (``path`` then holds a part of it: download again).
    """
    with path.open("wb") as file:
        async with client.files.with_streaming_response.content(file_id) as response:
            async for chunk in response.iter_bytes():
                file.write(chunk)


def result_lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """The lines of downloaded output and error files, in order, that are objects with a ``custom_id``
    (an unreadable line is logged and skipped)."""
    for path in paths:
        with path.open("rb") as file:
            for raw in file:
                if not raw.strip():
                    continue
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    log.warning("batch_output_unreadable", file=path.name, line=raw[:200])
                    continue
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    yield line
