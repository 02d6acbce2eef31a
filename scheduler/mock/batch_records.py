"""The mock Batch API's records: an uploaded file, a batch and its state in loop time, and one line's answer.

:class:`~scheduler.mock.batches.BatchMock` keeps them and moves a batch through its statuses; each record renders
itself as the openai SDK's types say (``FileObject``; the output and error file lines of OpenAI's batch guide).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from .respond import request_id

__all__ = ["Answer", "Batch", "File", "metadata_problem"]

_DAY_S = 86_400


@dataclass(slots=True)
class File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict[str, Any]:
        """The FileObject. Batch files expire after 30 days, as OpenAI's default."""
        batch = self.purpose in ("batch", "batch_output")
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": self.created_at + 30 * _DAY_S if batch else None,
            "status_details": None,
        }


@dataclass(slots=True)
class Answer:
    """How one line was answered: a response (status and body), or an error without one."""

    custom_id: str
    status: int | None
    body: Any = None
    error: dict[str, Any] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 300

    def line(self) -> dict[str, Any]:
        """The output (or error) file line, as OpenAI's batch guide shows it."""
        response = None
        if self.status is not None:
            response = {"status_code": self.status, "request_id": request_id(), "body": self.body}
        return {"id": "batch_req_" + os.urandom(12).hex(), "custom_id": self.custom_id, "response": response,
                "error": self.error}


@dataclass(slots=True)
class Batch:
    id: str
    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    created: float  # loop time
    created_at: int  # unix time
    expires_at: int
    status: str = "validating"
    times: dict[str, int] = field(default_factory=dict)  # in_progress_at, finalizing_at, ... (unix)
    model: str | None = None
    #: ``(custom_id, body)`` of each line, once validated
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    #: enqueued prompt tokens (the server's character estimate)
    tokens: int = 0
    errors: list[dict[str, Any]] | None = None
    started: float = 0.0  # loop time the first line started
    rate: float = 1.0
    #: lines answered, once no more are (finalizing and after)
    done: int | None = None
    #: scripted: expire once this many lines are answered
    expire_after: int | None = None
    #: scripted: fail validation with token_limit_exceeded
    refuse: bool = False
    #: the next transition and its loop time (None: the batch has ended)
    next_step: str | None = "validate"
    next_at: float = 0.0
    output_file_id: str | None = None
    error_file_id: str | None = None

    def answered(self, now: float) -> int:
        """Lines answered by ``now``."""
        if self.done is not None:
            return self.done
        if self.status != "in_progress":
            return 0
        # Loop time is the machine's uptime: its float error grows with it, and after an hour (t + k / rate - t) *
        # rate fell short of k by more than 1e-9 (a scripted expiry after k lines answered k - 1). A thousandth of
        # a line is no change in what a client sees, and holds for decades of uptime.
        n = min(len(self.requests), math.floor((now - self.started) * self.rate + 1e-3))
        return n if self.expire_after is None else min(n, self.expire_after)


def metadata_problem(metadata: Any) -> str | None:
    """What is wrong with a batch's metadata: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "Invalid 'metadata': expected an object."
    if len(metadata) > 16:
        return f"Invalid 'metadata': {len(metadata)} keys; at most 16 are allowed."
    for key, value in metadata.items():
        if len(key) > 64:
            return f"Invalid 'metadata': the key {key[:20]!r}... is longer than 64 characters."
        if not isinstance(value, str) or len(value) > 512:
            return f"Invalid 'metadata': the value of {key!r} must be a string of at most 512 characters."
    return None
