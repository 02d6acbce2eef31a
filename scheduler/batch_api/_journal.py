"""The journal of a Batch API run: an append-only JSONL file beside the output, and what replaying it says.

Every record is flushed and fsynced before the action it announces, so after any crash the journal holds at least
what was done, and marks what may have been: a ``submit`` without its ``batch`` is a ``batches.create`` that may
or may not have happened, which the runner settles by listing the batches and matching their metadata. A torn last
line is a record whose action never started; it is cut off on open.

Records (``"type"`` first; ``part`` numbers a request file, ``try`` the submissions of one part)::

    {"type": "run", "v": 1, "run": "<id>", "t": <unix>}             the run's id: batch metadata names it
    {"type": "part", "part": 3, "file": "part-000003.jsonl", "endpoint": "/v1/chat/completions",
     "model": "gpt-4o-mini", "requests": 500, "bytes": 81234, "tokens": 40210, "from": null}
                                                                    the file beside the journal is written and
                                                                    synced; "from": the part whose failed lines
                                                                    it retries (null: input lines)
    {"type": "upload", "part": 3, "file_id": "file-..."}           uploaded (purpose "batch")
    {"type": "submit", "part": 3, "try": 1, "t": <unix>}           about to call batches.create
    {"type": "batch", "part": 3, "try": 1, "batch_id": "batch_..."} created (or found again by its metadata)
    {"type": "refused", "part": 3, "try": 1, "batch_id": "...", "code": "token_limit_exceeded", "message": "..."}
                                                                    the batch failed for the enqueued-token limit:
                                                                    the part is submitted again later
    {"type": "end", "part": 3, "batch_id": "...", "status": "completed", "output_file_id": "...",
     "error_file_id": "...", "created_at": <unix>, "ended_at": <unix>, "stopped": false,
     "succeeded": 495, "failed": 2, "cost_usd": 0.0123, "retry": ["id-7", ...]}
                                                                    the batch ended and its final results were
                                                                    handed out (a crash before this record: the
                                                                    next run judges its files again); its lines
                                                                    in "retry" need another batch; "stopped":
                                                                    cancelled by a cut-over. A part the API failed
                                                                    as a whole has "status": "failed" and
                                                                    "errors": {"code", "message"} instead
    {"type": "delivered", "part": 3}                               the part is done with (journals of older
                                                                    versions wrote "end" before the hand-out: an
                                                                    "end" without this is handed out again)
    {"type": "cancel", "batch_ids": [...], "t": <unix>}            cancels requested (scheduler batches cancel)
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import structlog

from ..errors import ConfigurationError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, one run a state file is up to the user
    fcntl = None  # type: ignore[assignment]

__all__ = ["Journal", "JournalState", "PartState", "parts_dir", "read_records", "replay"]

log = structlog.get_logger("scheduler")

VERSION = 1


def parts_dir(state: Path) -> Path:
    """The folder beside the journal that holds the request files of its parts."""
    return state.with_name(state.name + ".parts")


class Journal:
    """An append-only JSONL file whose every record reaches the disk before :meth:`append` returns.

    Opening reads the records already there (cutting off a torn last line) and takes an exclusive lock, so two
    runs cannot share one state file; the lock goes with the process, even on ``kill -9``.

    Raises:
        ConfigurationError: the file is locked by another run, or a line before the last is not a record.
    """

    __slots__ = ("_file", "path", "records")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file: IO[bytes] = self.path.open("a+b")
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ConfigurationError(
                        f"the batch state {str(self.path)!r} is in use by another run; wait for it to end"
                    ) from None
            #: the records read on open, oldest first
            self.records = self._read(file)
        except BaseException:
            file.close()
            raise
        self._file = file

    def _read(self, file: IO[bytes]) -> list[dict[str, Any]]:
        file.seek(0)
        data = file.read()
        records, end = _parse(self.path, data)
        if end < len(data):
            log.warning("batch_journal_repaired", file=str(self.path), removed_bytes=len(data) - end)
            file.truncate(end)
            _sync(file)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line and sync it to the disk."""
        self._file.write(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        _sync(self._file)

    def close(self) -> None:
        """Release the lock and close the file."""
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of the journal at ``path``, read without locking or repairing it (a run may be writing it).

    Raises:
        ConfigurationError: there is no such file, or a line before the last is not a record.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"no batch state at {str(path)!r}: no batch run wrote this output") from None
    return _parse(path, data)[0]


def _parse(path: Path, data: bytes) -> tuple[list[dict[str, Any]], int]:
    """The whole records of ``data`` and the offset where they end (a torn last line is not one).

    Raises:
        ConfigurationError: a line before the last is not a record.
    """
    records: list[dict[str, Any]] = []
    end = 0
    for number, raw in enumerate(data.splitlines(keepends=True), 1):
        record = _record(raw)
        if record is None and raw.endswith(b"\n") and raw.strip():
            raise ConfigurationError(f"{str(path)!r} line {number} is not a journal record: is it a batch "
                                     "state file?")
        if record is None or not raw.endswith(b"\n"):
            break  # a torn last line: its action never started
        records.append(record)
        end += len(raw)
    return records, end


def _record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("type"), str) else None


def _sync(file: IO[bytes]) -> None:
    file.flush()
    os.fsync(file.fileno())


def sync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (files just created in it) durable."""
    with contextlib.suppress(OSError):  # some file systems cannot open or sync a folder: nothing more to do there
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def now_unix() -> int:
    """Wall-clock seconds for journal stamps (records for people and for matching batch creation times, not for
    scheduling)."""
    return int(time.time())


@dataclass(slots=True)
class PartState:
    """One request file of the run, as the journal tells it."""

    number: int
    file: str
    endpoint: str
    model: str
    requests: int
    bytes: int
    tokens: int = 0
    #: the part whose failed lines this one retries (None: input lines)
    source: int | None = None
    file_id: str | None = None
    #: submissions so far (the ``try`` of the last ``submit``)
    tries: int = 0
    #: a ``submit`` without its ``batch``: the batch may exist
    in_doubt: bool = False
    #: unix time of the last ``submit``
    submitted_t: int = 0
    #: the batch now running (or ended) for this part
    batch_id: str | None = None
    refusals: int = 0
    #: the ``end`` record, once the batch ended
    end: dict[str, Any] | None = None
    delivered: bool = False

    @property
    def pending(self) -> bool:
        """Waiting to be submitted (never, or again after a refusal)."""
        return self.end is None and self.batch_id is None and not self.in_doubt

    @property
    def running(self) -> bool:
        """Submitted and not ended."""
        return self.end is None and self.batch_id is not None


@dataclass(slots=True)
class JournalState:
    """What the journal's records say: the run's id and its parts."""

    run_id: str | None = None
    parts: dict[int, PartState] = field(default_factory=dict)


def replay(records: list[dict[str, Any]]) -> JournalState:
    """Rebuild the run's state from its journal records (unknown record types are skipped).

    Raises:
        ConfigurationError: a record names a part that was never planned, or the journal is of a newer version.
    """
    state = JournalState()
    for record in records:
        kind = record["type"]
        if kind == "run":
            if record.get("v", VERSION) > VERSION:
                raise ConfigurationError(f"the batch state was written by a newer version (v{record['v']})")
            state.run_id = record["run"]
            continue
        if kind == "part":
            state.parts[record["part"]] = PartState(
                number=record["part"], file=record["file"], endpoint=record["endpoint"], model=record["model"],
                requests=record["requests"], bytes=record["bytes"], tokens=record.get("tokens", 0),
                source=record.get("from"),
            )
            continue
        if kind not in ("upload", "submit", "batch", "refused", "end", "delivered"):
            continue
        part = state.parts.get(record.get("part", -1))
        if part is None:
            raise ConfigurationError(f"the batch journal names part {record.get('part')!r} before planning it")
        if kind == "upload":
            part.file_id = record["file_id"]
        elif kind == "submit":
            part.tries = record["try"]
            part.in_doubt = True
            part.batch_id = None
            part.submitted_t = record.get("t", 0)
        elif kind == "batch":
            part.in_doubt = False
            part.batch_id = record["batch_id"]
        elif kind == "refused":
            part.batch_id = None
            part.refusals += 1
        elif kind == "end":
            part.end = record
            part.in_doubt = False  # an outright refusal of the create ends the part with no batch record
            part.batch_id = record.get("batch_id", part.batch_id)
        else:
            part.delivered = True
    return state
