"""Requests: what a caller hands the pool, and how a prompt, messages or a body become one API request body.

``submit()``, ``map()``, the bulk-run reader and the distributed worker all build bodies here, so a prompt, a
list of messages and a bare body mean the same wherever they come in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

__all__ = ["CHAT", "EMBEDDINGS", "ENDPOINTS", "Request", "build_body", "infer_endpoint"]

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
#: the endpoints of the Batch API (and of bulk runs)
ENDPOINTS = frozenset({CHAT, EMBEDDINGS, "/v1/responses", "/v1/completions", "/v1/moderations"})


@dataclass(frozen=True, slots=True)
class Request:
    """One request with its scheduling attributes, for :meth:`Pool.map` (``submit`` takes them as keywords)."""

    body: Mapping[str, Any]
    endpoint: str = CHAT
    custom_id: str | None = None
    #: lower runs first
    priority: int = 0
    #: seconds from submission until the job fails with DeadlineExceeded
    timeout_s: float | None = None
    #: use the response cache: True always, False never, None when deterministic (temperature 0, embeddings)
    cacheable: bool | None = None


def infer_endpoint(body: Mapping[str, Any]) -> str | None:
    """The endpoint a bare body is for: chat for ``messages``, embeddings or responses for ``input`` (by the
    model's name), completions for ``prompt``; None when it cannot be told."""
    if "messages" in body:
        return CHAT
    if "input" in body:
        return EMBEDDINGS if "embed" in str(body.get("model", "")) else "/v1/responses"
    if "prompt" in body:
        return "/v1/completions"
    return None


def build_body(
    request: str | Sequence[Mapping[str, Any]] | Mapping[str, Any], endpoint: str | None,
    extra: Mapping[str, Any], model: str | None,
) -> tuple[str, dict[str, Any]]:
    """The endpoint and a fresh body for a prompt (one user message), a list of messages or a whole body, with
    ``extra`` fields added and ``model`` filled in where the body names none.

    Raises:
        ConfigurationError: the request is none of those, names no model, or its endpoint cannot be told.
    """
    if isinstance(request, str):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": request}]}
    elif isinstance(request, Mapping):
        body = dict(request)
    elif isinstance(request, Sequence):
        body = {"messages": list(request)}
    else:
        raise ConfigurationError(
            f"a request is a prompt string, a list of messages or a body dict, not {type(request).__name__}"
        )
    body.update(extra)
    if "model" not in body:
        if model is None:
            raise ConfigurationError("no model: pass model= to Pool or put 'model' in the request body")
        body["model"] = model
    if endpoint is None:
        endpoint = infer_endpoint(body)
        if endpoint is None:
            raise ConfigurationError("cannot tell the endpoint of a body without 'messages': pass endpoint=")
    return endpoint, body
