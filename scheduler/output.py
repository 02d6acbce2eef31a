"""The bulk run's output file: appended to in whole lines, by one run at a time.

:class:`OutputWriter` holds the file locked (``flock``) while it is open, so a second run on the same output
refuses to start instead of interleaving its lines (and repairing the first run's line in progress). Each line
goes out in one ``write``; a write that fails part way (disk full, file-size limit) is cut back to where the line
began, and the writer raises :class:`OutputUnwritable` from then on, so the run stops with whole lines only.
Reading and repairing the file on resume is :func:`scheduler.jsonl.scan_output`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import orjson

from .errors import STOPPED_CODES, SchedulerError
from .results import Result
from .sinks import batch_line

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; two runs on one output are not caught
    fcntl = None  # type: ignore[assignment]

__all__ = ["OutputLocked", "OutputUnwritable", "OutputWriter"]


class OutputUnwritable(SchedulerError):
    """Raised when a result cannot be written to the output (disk full, file-size limit, permissions, the file
    deleted): the run must stop. Every line written before is whole.

    ``resumable`` is False when the file is gone (deleted or replaced): a rerun starts over.
    """

    def __init__(self, message: str, *, resumable: bool = True) -> None:
        super().__init__(message)
        self.resumable = resumable


class OutputLocked(SchedulerError):
    """Raised when another process (a run of the same output) holds the output's lock."""


class OutputWriter:
    """Appends Batch API output lines to a file it holds locked (``flock``) for as long as it is open.

    Each line goes out in one ``write``; a write that fails part way is cut back to the line's start, so the file
    never holds a torn line (a kill -9 mid-write can still leave one: :func:`scan_output` repairs it). Once a
    write failed, every later one raises too. Results of jobs that the stop kept from running
    (:data:`STOPPED_CODES`) are not written: a later run does them.

    Args:
        path: the output file, created if missing.
        echo_requests: copy each request's body into its line (``scheduler.request_body``).

    Raises:
        OutputLocked: another process has the file open for writing through an OutputWriter.
        OSError: the file cannot be opened for appending.
    """

    __slots__ = ("_broken", "_fd", "_stat", "created", "echo_requests", "path", "pending")

    def __init__(self, path: Path, *, echo_requests: bool = False) -> None:
        self.path = path
        self.echo_requests = echo_requests
        #: whether this writer created the file (see :meth:`discard_if_unused`)
        self.created = False
        #: ``custom_id -> (request hash, metadata, body)`` of requests in flight, for their lines
        self.pending: dict[str, tuple[int, Any, Any]] = {}
        self._broken: OutputUnwritable | None = None
        for _ in range(5):
            existed = path.exists()
            # Unbuffered: every record reaches the OS at once, so a kill -9 loses no finished result.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                _lock(fd, path)
                # A run that gave up on this (empty) file may have removed it between our open and our lock.
                if _same_file(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        else:  # pragma: no cover - five removals in a row
            raise OutputLocked(f"{path} keeps being replaced by another process")
        self._fd = fd
        self.created = not existed
        self._stat = os.fstat(fd)

    def expect(self, custom_id: str, fingerprint: int, metadata: Any = None, body: Any = None) -> None:
        """Note what the line of ``custom_id``'s result will carry besides the result: the request's hash, the
        input line's metadata and (with ``echo_requests``) its body."""
        self.pending[custom_id] = (fingerprint, metadata, body if self.echo_requests else None)

    def write(self, result: Result, fingerprint: int | None = None) -> bool:
        """Write ``result``'s line; False (nothing written) for a job that the stop kept from running.

        Args:
            result: the result.
            fingerprint: the request hash to record (default: the one noted by :meth:`expect`).

        Raises:
            OutputUnwritable: the line could not be written (nothing of it is left in the file).
        """
        noted = self.pending.pop(result.custom_id, None)
        if result.error is not None and result.error.code in STOPPED_CODES:
            return False
        if self._broken is not None:
            raise self._broken
        record = batch_line(result)
        extra = record["scheduler"]
        if fingerprint is None and noted is not None:
            fingerprint = noted[0]
        if fingerprint is not None:
            extra["request_hash"] = f"{fingerprint:012x}"
        if noted is not None:
            if noted[1] is not None:
                extra["metadata"] = noted[1]
            if noted[2] is not None:
                extra["request_body"] = noted[2]
        self._append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        return True

    def check(self) -> None:
        """Raise if the file was deleted, moved or replaced since it was opened: lines written now would be lost.

        Raises:
            OutputUnwritable: it was.
        """
        if self._broken is not None:
            raise self._broken
        if not _same_file(self._fd, self.path):
            self._broken = OutputUnwritable(
                f"{self.path} was deleted, moved or replaced while the run wrote it", resumable=False)
            raise self._broken

    def discard_if_unused(self) -> None:
        """Remove the file if this writer created it and nothing was written: a run that failed to start leaves
        nothing behind. Call before :meth:`close` (the lock keeps other runs out meanwhile)."""
        if self.created and os.fstat(self._fd).st_size == 0 and _same_file(self._fd, self.path):
            os.unlink(self.path)

    def close(self) -> None:
        """Close the file, which releases the lock."""
        os.close(self._fd)

    def _append(self, data: bytes) -> None:
        fd = self._fd
        try:
            info = os.fstat(fd)
            if info.st_nlink == 0:
                raise OutputUnwritable(f"{self.path} was deleted while the run wrote it", resumable=False)
            start = info.st_size
            view = memoryview(data)
            try:
                while view:
                    # A short write (the disk or the file-size limit reached mid-line) writes the rest again,
                    # which then fails with the reason.
                    view = view[os.write(fd, view):]
            except OSError:
                if len(view) < len(data):
                    os.ftruncate(fd, start)  # no torn line: cut back to where this line began
                raise
        except OutputUnwritable as exc:
            self._broken = exc
            raise
        except OSError as exc:
            self._broken = OutputUnwritable(f"cannot write {self.path}: {_why(exc)}")
            raise self._broken from exc


def _why(exc: OSError) -> str:
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file-size limit is reached (ulimit -f)",
        errno.EPERM: "writing it is not permitted (an immutable file?)",
        errno.EACCES: "writing it is not permitted",
        errno.EROFS: "the file system is read-only",
        errno.EIO: "an input/output error",
    }
    reason = reasons.get(exc.errno or 0)
    return f"{reason} ({exc.strerror})" if reason else str(exc.strerror or exc)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not deleted, moved or replaced)."""
    opened = os.fstat(fd)
    try:
        named = os.stat(path)
    except OSError:
        return False
    return opened.st_nlink > 0 and (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        who = f"another run (pid {holder})" if holder is not None else "another run"
        raise OutputLocked(
            f"{who} is writing {path}; wait for it to end (or stop it), or write to another file with -o"
        ) from None


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (Linux); None where that cannot be told."""
    inode = str(os.fstat(fd).st_ino)
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146554 0 EOF"; waiters are marked "->"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None
