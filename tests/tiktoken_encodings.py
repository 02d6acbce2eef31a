"""A mark for tests that need tiktoken's real encodings, which an offline machine may not have."""

from __future__ import annotations

import functools

import pytest

from scheduler.tokens import encoding_available

__all__ = ["HOW_TO_PROVIDE", "needs_encoding"]

HOW_TO_PROVIDE = (
    "set TIKTOKEN_CACHE_DIR to a folder holding the tiktoken encodings; see README 'Offline machines' "
    "(python -m scheduler.tiktoken_cache download DIR, on a machine with network)"
)


@functools.cache
def _available(name: str) -> bool:
    return encoding_available(name)


def needs_encoding(*names: str) -> pytest.MarkDecorator:
    """Skips a test (saying how to provide them) where tiktoken cannot load these encodings."""
    missing = [name for name in names if not _available(name)]
    return pytest.mark.skipif(bool(missing), reason=f"no tiktoken encoding {', '.join(missing)}: {HOW_TO_PROVIDE}")
