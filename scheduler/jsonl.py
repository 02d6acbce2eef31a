"""The bulk run's files: reading input lines, finding duplicate ids, resuming from (and repairing) the output.

Input lines come in three forms, each with an optional ``custom_id`` and ``priority``:

- a Batch API request line: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
- a bare request body (the cookbook's format), with an optional ``metadata`` that is echoed, not sent
- ``{"prompt": "..."}``, one user message to chat completions (other keys go into the body)

A line without a ``custom_id`` is named after its line number (``line-12``), so a resumed run names it alike.
Ids are kept as 64-bit hashes in sorted arrays (:class:`IdSet`, :class:`IdMap`), so the duplicate check and the
resume scan stay small however long the files are. The output is written by :class:`scheduler.output.OutputWriter`.

Each output line records a 48-bit fingerprint of the request it answers (``scheduler.request_hash``, 12 hex
digits: :func:`request_hash` of the endpoint and the body as sent; for an invalid line, :func:`line_hash` of its
text). On resume a line whose ``custom_id`` has a result but whose request changed is found before anything is
sent. A ``custom_id`` may have more than one line (a changed request run again): the last line is its result.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
from array import array
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from .errors import INVALID_REQUEST
from .requests import CHAT, ENDPOINTS, Request, infer_endpoint
from .results import ErrorInfo, Result

__all__ = [
    "EXPECTED_LINES",
    "MAX_LINE_BYTES",
    "IdMap",
    "IdSet",
    "InputLine",
    "InputScan",
    "OutputScan",
    "describe_input",
    "find_duplicates",
    "line_custom_id",
    "line_hash",
    "parse_line",
    "read_lines",
    "request_hash",
    "scan_input",
    "scan_output",
]

log = structlog.get_logger("scheduler")

#: a line longer than this is refused unread: a runaway line must not take the memory with it
MAX_LINE_BYTES = 10 * 2**20
#: what a good input looks like, for messages about a bad one
EXPECTED_LINES = (
    '{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "gpt-4o-mini", '
    '"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 100}}\n'
    '{"custom_id": "q2", "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}\n'
    '{"custom_id": "q3", "prompt": "Hello", "max_tokens": 100}'
)
_RESERVED = ("custom_id", "priority", "metadata")
_BOM = b"\xef\xbb\xbf"
# What the output records of an id, packed in one integer of an IdMap: the fingerprint and three flags.
_HASH_BITS = 48
_HASH_MASK = (1 << _HASH_BITS) - 1
_HASHED = 1 << 48  # the record carries a request hash (older outputs do not)
_FAILED = 1 << 49  # an error record
_INVALID = 1 << 50  # the record of an invalid line: not done


def request_hash(endpoint: str, body: Mapping[str, Any]) -> int:
    """A 48-bit fingerprint of a request: the endpoint and the body as canonical JSON (keys sorted), so the same
    request always gets the same value, whatever the order of its keys."""
    canonical = orjson.dumps([endpoint, body], option=orjson.OPT_SORT_KEYS)
    return int.from_bytes(hashlib.blake2b(canonical, digest_size=6).digest(), "big")


def line_hash(raw: bytes | None) -> int:
    """A 48-bit fingerprint of an input line's text (surrounding white space aside): for invalid lines."""
    return int.from_bytes(hashlib.blake2b((raw or b"").strip(), digest_size=6).digest(), "big")


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


class IdMap:
    """A mapping of strings to non-negative 63-bit integers, keyed by the strings' 64-bit hashes (16 bytes an
    entry); the last value set for a key wins. False matches: as in :class:`IdSet`."""

    __slots__ = ("_keys", "_sorted", "_values")

    _MASK = 1023

    def __init__(self) -> None:
        self._keys = [array("q") for _ in range(self._MASK + 1)]
        self._values = [array("q") for _ in range(self._MASK + 1)]
        self._sorted = True

    def __setitem__(self, key: str, value: int) -> None:
        digest = hash(key)
        self._keys[digest & self._MASK].append(digest)
        self._values[digest & self._MASK].append(value)
        self._sorted = False

    def get(self, key: object) -> int | None:
        """The value of ``key``, or None."""
        if not self._sorted:
            self._sort()
        digest = hash(key)
        keys = self._keys[digest & self._MASK]
        i = bisect.bisect_left(keys, digest)
        return self._values[digest & self._MASK][i] if i < len(keys) and keys[i] == digest else None

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        if not self._sorted:
            self._sort()
        return sum(len(keys) for keys in self._keys)

    def values(self) -> Iterator[int]:
        """Every value, one per key."""
        if not self._sorted:
            self._sort()
        for values in self._values:
            yield from values

    def _sort(self) -> None:
        for b, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            # A stable sort keeps the values of one key in the order set: the last of each run wins.
            order = sorted(range(len(keys)), key=keys.__getitem__)
            last = len(order) - 1
            self._keys[b] = array("q", (keys[j] for n, j in enumerate(order)
                                        if n == last or keys[order[n + 1]] != keys[j]))
            self._values[b] = array("q", (values[j] for n, j in enumerate(order)
                                          if n == last or keys[order[n + 1]] != keys[j]))
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
                      error=ErrorInfo(INVALID_REQUEST, message))


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


def parse_line(
    number: int, raw: bytes | None, *, model: str, max_bytes: int = MAX_LINE_BYTES, priority: int = 0
) -> InputLine:
    """Parse one input line into a request, or say what is wrong with it.

    Args:
        number: the 1-based line number (names the line in messages, and its id when it has none).
        raw: the line's bytes, or None for a line over the size cap.
        model: the model of bodies that name none.
        priority: the priority of a line that gives none.
    """
    line, problem = _loads(number, raw, max_bytes)
    return _parse_loaded(number, line, problem, model, priority)


def _parse_loaded(number: int, line: Any, problem: str | None, model: str, default_priority: int = 0) -> InputLine:
    custom_id, id_problem = _custom_id(number, line)
    if problem is None and not isinstance(line, dict):
        problem = f"a line must be a JSON object, not {_kind(line)}"
    problem = problem or id_problem
    if problem is not None:
        return InputLine(number, custom_id, problem=problem)
    assert isinstance(line, dict)
    priority = line.get("priority", default_priority)
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
    #: lines whose result is already in the output (and answers the same request), to be skipped
    done: int = 0
    #: of those, results that are errors
    done_failed: int = 0
    #: of those, results without a request hash (an older output): the request could not be compared
    unchecked: int = 0
    #: lines that are not even JSON objects (CSV, a JSON array, pretty-printed JSON...)
    not_objects: int = 0
    #: the first such line's problem, with its line number
    first_problem: str | None = None
    #: ``(custom_id, line numbers)`` of ids on more than one line
    duplicates: list[tuple[str, list[int]]] = field(default_factory=list)
    #: ``(line number, custom_id, what changed)`` of the first lines whose result answers another request
    mismatches: list[tuple[int, str, str]] = field(default_factory=list)
    #: how many lines' results answer another request
    mismatched: int = 0
    #: of those, lines that are now invalid (they cannot be run again until fixed)
    now_invalid: int = 0
    #: ids of the lines whose request changed since their result was written
    changed: IdSet = field(default_factory=IdSet)

    _SHOWN = 10

    def mismatch(self, number: int, custom_id: str, what: str) -> None:
        self.mismatched += 1
        if len(self.mismatches) < self._SHOWN:
            self.mismatches.append((number, custom_id, what))


def scan_input(path: Path, prior: OutputScan | None = None, *, model: str,
               max_bytes: int = MAX_LINE_BYTES) -> InputScan:
    """Count the lines, and those already done (comparing each one's request with the one its result answers),
    and find duplicate ids and lines that are not even JSON objects.

    Args:
        path: the input file.
        prior: what the output already holds (None: nothing).
        model: the model of bodies that name none (part of the request a result answers).
    """
    scan = InputScan()
    seen = IdSet()
    records = prior.done if prior is not None and len(prior.done) else None
    with path.open("rb") as file:
        for number, raw in read_lines(file, max_bytes):
            loaded, problem = _loads(number, raw, max_bytes)
            custom_id = _custom_id(number, loaded)[0]
            seen.add(custom_id)
            scan.lines += 1
            if not isinstance(loaded, dict):
                scan.not_objects += 1
                if scan.first_problem is None:
                    scan.first_problem = f"line {number}: {_parse_loaded(number, loaded, problem, model).problem}"
            state = records.get(custom_id) if records is not None else None
            if state is None or state & _INVALID:
                continue  # to do: no result yet, or only an invalid line's record (parsed when it is run)
            line = _parse_loaded(number, loaded, problem, model)
            if line.request is None:
                scan.now_invalid += 1
                scan.mismatch(number, custom_id, f"is now invalid: {line.problem}")
            elif state & _HASHED and state & _HASH_MASK != request_hash(line.request.endpoint, line.request.body):
                scan.changed.add(custom_id)
                scan.mismatch(number, custom_id, "differs from the request its result answers")
            else:
                scan.done += 1
                scan.done_failed += bool(state & _FAILED)
                scan.unchecked += not state & _HASHED
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


def describe_input(path: Path, head_bytes: int = 65536) -> str:
    """What a file that is not JSON Lines looks like (from its first bytes), and how to make it JSON Lines."""
    with path.open("rb") as file:
        head = file.read(head_bytes)
    text = head.removeprefix(_BOM).lstrip()
    first = text.split(b"\n", 1)[0].strip()
    if text.startswith(b"["):
        return ("it is a JSON array (one document), not one JSON object a line; "
                f"convert it with: jq -c '.[]' {path} > requests.jsonl")
    if text.startswith(b"{"):
        return ("it holds JSON objects spread over several lines (pretty-printed JSON, or one body a file); "
                f"put each request on one line: jq -c . {path} > requests.jsonl")
    if b"\t" in first:
        return "it looks like TSV (tab-separated values); write each row as one JSON object a line"
    if b"," in first:
        return "it looks like CSV (comma-separated values); write each row as one JSON object a line"
    return "it is not JSON Lines (one JSON object a line)"


# ---------------------------------------------------------------------------------------------- output


@dataclass(slots=True)
class OutputScan:
    """What earlier runs left in the output file."""

    #: every custom_id with a record in the file and what its last record says (see :meth:`is_done`); ``in``
    #: tells whether an id has any record at all
    done: IdMap = field(default_factory=IdMap)
    #: US dollars the records say were spent (``scheduler.cost_usd``; lines superseded since included)
    spent_usd: float = 0.0
    #: bytes of a torn last line cut off
    repaired_bytes: int = 0
    #: line numbers of unreadable lines before the last (left as they are)
    unreadable: list[int] = field(default_factory=list)

    def is_done(self, custom_id: str) -> bool:
        """Whether the id has a result (an invalid line's record is not one: the line is read again)."""
        state = self.done.get(custom_id)
        return state is not None and not state & _INVALID

    def recorded_invalid(self, custom_id: str, raw: bytes | None) -> bool:
        """Whether the id's last record is that of an invalid line with this very text (no need to write it
        again)."""
        state = self.done.get(custom_id)
        return state is not None and bool(state & _INVALID) and state & _HASH_MASK == line_hash(raw)


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
    extra = record.get("scheduler")
    extra = extra if isinstance(extra, dict) else {}
    cost = extra.get("cost_usd")
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        scan.spent_usd += cost
    state = 0
    fingerprint = extra.get("request_hash")
    if isinstance(fingerprint, str) and len(fingerprint) == _HASH_BITS // 4:
        with contextlib.suppress(ValueError):  # not ours: resumed unchecked, like a record without one
            state = int(fingerprint, 16) | _HASHED
    error = record.get("error")
    if error is not None:
        state |= _FAILED
        if isinstance(error, dict) and error.get("code") == INVALID_REQUEST:
            state |= _INVALID
    scan.done[record["custom_id"]] = state
