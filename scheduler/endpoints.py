"""Endpoints: where requests go, each with its own transport, identity and rate-limit dialect."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from .dialects import DialectTracker
from .transport import Transport

__all__ = ["Route", "endpoint_key"]


def endpoint_key(client: Any) -> str:
    """What identifies an endpoint's limits: its base URL and a fingerprint of its key (never the key itself)."""
    key = str(getattr(client, "api_key", "") or "")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{getattr(client, 'base_url', '')}|{fingerprint}"


@dataclass(slots=True)
class Route:
    """One way to the API: a transport, the endpoint it reaches, and what its answers' headers mean."""

    transport: Transport
    #: the endpoint's identity (:func:`endpoint_key`): every model on it has its own limit scope
    endpoint: str
    dialect: DialectTracker = field(default_factory=DialectTracker)
