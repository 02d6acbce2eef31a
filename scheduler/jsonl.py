"""The bulk run's files: reading input lines, finding duplicate ids, resuming from (and repairing) the output.

Input lines come in three forms, each with an optional ``custom_id`` and ``priority``:

- a Batch API request line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
- a bare request body (the cookbook's format), with an optional ``metadata`` that is echoed, not sent
- ``{"prompt": "..."}``, one user message to chat completions (other keys go into the body)

A line without a ``custom_id`` is named after its line number (``line-12``), so a resumed run names it alike.
Ids are kept as 64-bit hashes in sorted arrays (:class:`IdSet`), 8 bytes an id, so the duplicate check and the
resume scan stay small however long the files are.
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from .requests import CHAT, ENDPOINTS, Request, infer_endpoint
from .results import ErrorInfo, Result
from .sinks import batch_line

__all__ = [
    "MAX_LINE_BYTES",
    "STOPPED_CODES",
    "IdSet",
    "InputLine",
    "InputScan",
    "OutputScan",
    "OutputWriter",
    "find_duplicates",
    "line_custom_id",
    "parse_line",
    "read_lines",
    "scan_input",
    "scan_output",
]

log = structlog.get_logger("scheduler")

#: a line longer than this is refused unread: a runaway line must not take the memory with it
MAX_LINE_BYTES = 10 * 2**20
#: error codes of jobs that were never (fully) run because the run stopped: they stay undone for the next run
STOPPED_CODES = frozenset({"run_stopped", "insufficient_quota", "authentication_failed", "budget_exhausted"})
INVALID = "invalid_request"
_RESERVED = ("custom_id", "priority", "metadata")
_BOM = b"\xef\xbb\xbf"


class IdSet:
    """A set of strings kept as their 64-bit hashes: 8 bytes a member instead of about 100.

    Python's string hash (SipHash with a per-process key) makes a false match between two different ids about
    as likely as 1 in 10^7 for a million ids against a million, and not something an input can be crafted for.
    """

    __slots__ = ("_buckets", "_len", "_sorted")

    _MASK = 1023

    def __init__(self) -> None:
        # Many small arrays instead of one: each sorts (and counts its repeats) with a small temporary list.
        self._buckets = [array("q") for _ in range(self._MASK + 1)]
        self._len = 0
        self._sorted = True

    def __len__(self) -> int:
        return self._len

    def add(self, key: str) -> None:
        value = hash(key)
        self._buckets[value & self._MASK].append(value)
        self._len += 1
        self._sorted = False

    def __contains__(self, key: object) -> bool:
        if not self._sorted:
            self._sort()
        value = hash(key)
        bucket = self._buckets[value & self._MASK]
        i = bisect.bisect_left(bucket, value)
        return i < len(bucket) and bucket[i] == value

    def repeated(self) -> frozenset[int]:
        """Hashes added more than once (the candidates for duplicate ids)."""
        if not self._sorted:
            self._sort()
        found: set[int] = set()
        for bucket in self._buckets:
            found.update(bucket[i] for i in range(1, len(bucket)) if bucket[i] == bucket[i - 1])
        return frozenset(found)

    def _sort(self) -> None:
        for i, bucket in enumerate(self._buckets):
            self._buckets[i] = array("q", sorted(bucket))
        self._sorted = True


# ---------------------------------------------------------------------------------------------- input


@dataclass(frozen=True, slots=True)
class InputLine:
    """One input line: a request to send, or the problem that keeps it from being sent."""

    number: int
    custom_id: str
    request: Request | None = None
    #: what is wrong with the line (None: it is a request)
    problem: str | None = None
    #: the bare body's ``metadata``, echoed in the output
    metadata: Any = None

    def error_result(self) -> Result:
        """The error record of an invalid line."""
        assert self.problem is not None
        message = f"line {self.number}: {self.problem}"
        return Result(custom_id=self.custom_id, endpoint="", status=None, body=None, attempts=0,
                      error=ErrorInfo(INVALID, message))


def read_lines(file: IO[bytes], max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(line number, line)`` for each non-blank line; ``None`` for a line over ``max_bytes`` (skipped
    unread, so a runaway line costs no memory)."""
    number = 0
    while True:
        raw = file.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := file.readline(2**20)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if raw.strip():
            yield number, raw


def _custom_id(number: int, line: Any) -> tuple[str, str | None]:
    """The line's id (its own, or ``line-N``) and a problem with its own, if any."""
    if isinstance(line, dict) and "custom_id" in line:
        value = line["custom_id"]
        if isinstance(value, str) and value:
            return value, None
        return f"line-{number}", "custom_id must be a non-empty string"
    return f"line-{number}", None


def _loads(number: int, raw: bytes | None, max_bytes: int) -> tuple[Any, str | None]:
    if raw is None:
        return None, f"line longer than {max_bytes:,} bytes"
    try:
        return orjson.loads(raw), None
    except orjson.JSONDecodeError as exc:
        # orjson refuses NaN and Infinity, which are not JSON and which no API accepts.
        return None, f"invalid JSON ({exc})"


def line_custom_id(number: int, raw: bytes | None, max_bytes: int = MAX_LINE_BYTES) -> str:
    """The id a line's result is written under, whether or not the line is valid."""
    line, _ = _loads(number, raw, max_bytes)
    return _custom_id(number, line)[0]


def parse_line(number: int, raw: bytes | None, *, model: str, max_bytes: int = MAX_LINE_BYTES) -> InputLine:
    """Parse one input line into a request, or say what is wrong with it.

    Args:
        number: the 1-based line number (names the line in messages, and its id when it has none).
        raw: the line's bytes, or None for a line over the size cap.
        model: the model of bodies that name none.
    """
    line, problem = _loads(number, raw, max_bytes)
    custom_id, id_problem = _custom_id(number, line)
    if problem is None and not isinstance(line, dict):
        problem = f"a line must be a JSON object, not {_kind(line)}"
    problem = problem or id_problem
    if problem is not None:
        return InputLine(number, custom_id, problem=problem)
    assert isinstance(line, dict)
    priority = line.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        return InputLine(number, custom_id, problem=f"priority must be an integer, not {_kind(priority)}")
    metadata = None
    if "body" in line or "url" in line or "method" in line:
        endpoint, body, problem = _batch_request(line)
    else:
        metadata = line.get("metadata")
        endpoint, body, problem = _bare_request(line)
    if problem is None:
        assert body is not None
        problem = _check_body(endpoint, body)
    if problem is not None:
        return InputLine(number, custom_id, problem=problem)
    assert body is not None
    if "model" not in body:
        body["model"] = model
    return InputLine(number, custom_id, Request(body, endpoint, custom_id, priority), metadata=metadata)


def _batch_request(line: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    for name in ("method", "url", "body"):
        if name not in line:
            return "", None, f"missing '{name}' (a Batch API line has custom_id, method, url and body)"
    method, url, body = line["method"], line["url"], line["body"]
    if method != "POST":
        return "", None, f"method must be POST, not {method!r}"
    if url not in ENDPOINTS:
        return "", None, f"unknown url {url!r} (expected one of {', '.join(sorted(ENDPOINTS))})"
    if not isinstance(body, dict):
        return "", None, f"body must be a JSON object, not {_kind(body)}"
    return url, body, None


def _bare_request(line: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
    body = {key: value for key, value in line.items() if key not in _RESERVED}
    if "messages" in body or "input" in body:
        return str(infer_endpoint(body)), body, None
    if "prompt" in body:
        prompt = body.pop("prompt")
        if not isinstance(prompt, str) or not prompt:
            return "", None, "prompt must be a non-empty string"
        body["messages"] = [{"role": "user", "content": prompt}]
        return CHAT, body, None
    return "", None, (
        "not a request: expected a Batch API line (custom_id, method, url, body), "
        "a request body (messages or input) or a {\"prompt\": ...} line"
    )


def _check_body(endpoint: str, body: dict[str, Any]) -> str | None:
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "body.messages must be a non-empty list"
        if not all(isinstance(message, dict) for message in messages):
            return "body.messages must hold JSON objects"
    elif endpoint != "/v1/completions" and body.get("input") in (None, "", []):
        return "body.input is missing or empty"
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        return "body.model must be a non-empty string"
    return None


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


@dataclass(slots=True)
class InputScan:
    """What a first pass over the input found, before anything is sent."""

    #: non-blank lines, i.e. requests (valid or not)
    lines: int = 0
    #: lines whose id is already in the output
    done: int = 0
    #: ``(custom_id, line numbers)`` of ids on more than one line
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)


def scan_input(path: Path, done: IdSet, max_bytes: int = MAX_LINE_BYTES) -> InputScan:
    """Count the input's requests and those already done, and find duplicate ids."""
    scan = InputScan()
    seen = IdSet()
    resuming = len(done) > 0
    with path.open("rb") as file:
        for number, raw in read_lines(file, max_bytes):
            custom_id = line_custom_id(number, raw, max_bytes)
            seen.add(custom_id)
            scan.lines += 1
            if resuming and custom_id in done:
                scan.done += 1
    repeated = seen.repeated()
    if repeated:
        scan.duplicates = find_duplicates(path, repeated, max_bytes)
    return scan


def find_duplicates(
    path: Path, hashes: frozenset[int], max_bytes: int = MAX_LINE_BYTES
) -> list[tuple[str, list[int]]]:
    """Second pass, only when the first saw repeated hashes: the ids really repeated, with their lines."""
    lines: dict[str, list[int]] = {}
    with path.open("rb") as file:
        for number, raw in read_lines(file, max_bytes):
            custom_id = line_custom_id(number, raw, max_bytes)
            if hash(custom_id) in hashes:
                lines.setdefault(custom_id, []).append(number)
    return [(custom_id, numbers) for custom_id, numbers in lines.items() if len(numbers) > 1]


# ---------------------------------------------------------------------------------------------- output


@dataclass(slots=True)
class OutputScan:
    """What an earlier run left in the output file."""

    done: IdSet = field(default_factory=IdSet)
    #: records written with an error
    failed: int = 0
    #: bytes of a torn last line cut off
    repaired_bytes: int = 0
    #: line numbers of unreadable lines before the last (left as they are)
    unreadable: list[int] = field(default_factory=list)


def scan_output(path: Path) -> OutputScan:
    """Read the ids an earlier run completed, and repair a torn last line (a crash mid-write) in place.

    A last line without its newline is kept (and given one) if it is a whole record, else cut off: its request
    is simply run again.
    """
    scan = OutputScan()
    if not path.exists():
        return scan
    with path.open("r+b") as file:
        number = 0
        good_end = 0  # the offset just past the last line known good
        while raw := file.readline():
            number += 1
            record = _record(raw)
            if raw.endswith(b"\n"):
                if record is not None:
                    _count(scan, record)
                elif raw.strip():
                    scan.unreadable.append(number)
                good_end = file.tell()
            elif record is not None:
                _count(scan, record)
                file.write(b"\n")
                log.warning("output_repaired", file=str(path), line=number, detail="added a missing newline")
            else:
                file.truncate(good_end)
                scan.repaired_bytes = len(raw)
                log.warning("output_repaired", file=str(path), line=number, removed_bytes=len(raw),
                            detail="cut off a torn last line; its request runs again")
    if scan.unreadable:
        # A torn line followed by more output cannot be told apart from damage; leave it to the user.
        log.warning("output_lines_unreadable", file=str(path), lines=scan.unreadable[:20],
                    detail="not valid records: their requests (if any) are not counted as done")
    return scan


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
        return record
    return None


def _count(scan: OutputScan, record: dict[str, Any]) -> None:
    scan.done.add(record["custom_id"])
    if record.get("error") is not None:
        scan.failed += 1


class OutputWriter:
    """Appends Batch API output lines, each in one write: a crash leaves at most one torn line.

    Results of jobs that the stop kept from running (:data:`STOPPED_CODES`) are not written: a later run does
    them.
    """

    __slots__ = ("_fd", "metadata", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        # Unbuffered: every record reaches the OS at once, so a kill -9 loses no finished result.
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        #: ``custom_id -> metadata`` of requests in flight whose input line had metadata
        self.metadata: dict[str, Any] = {}

    def write(self, result: Result) -> bool:
        """Write ``result``'s record; False (nothing written) for a job that the stop kept from running."""
        metadata = self.metadata.pop(result.custom_id, None) if self.metadata else None
        if result.error is not None and result.error.code in STOPPED_CODES:
            return False
        record = batch_line(result)
        if metadata is not None:
            record["scheduler"]["metadata"] = metadata
        data = memoryview(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        while data:
            data = data[os.write(self._fd, data):]
        return True

    def close(self) -> None:
        os.close(self._fd)
