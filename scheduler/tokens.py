"""Token estimates: what a request will cost against the token limit, counted with tiktoken.

The cost of a request is its prompt (messages with their per-message overhead, or embedding/responses input)
plus the output reservation: ``max_completion_tokens`` or ``max_tokens`` (``max_output_tokens`` for responses),
times ``n``. That is what OpenAI charges against TPM when the request is admitted; the server's count can still
differ a little from ours, which the limiter calibrates away from the response headers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import structlog

__all__ = ["TokenEstimator", "encoding_name_for_model", "output_reservation"]

log = structlog.get_logger("scheduler")

# Per-message framing of the chat format (OpenAI cookbook, "How to count tokens with tiktoken").
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# An image part, counted at the low-detail price: exact image accounting needs the image's size.
_IMAGE_TOKENS = 85
_CACHED_TEXT_CHARS = 4096
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")


def encoding_name_for_model(model: str) -> str:
    """The tiktoken encoding of a model; o200k_base, the current models' encoding, for unknown names."""
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" from routers
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


@functools.cache
def _load_encoder(name: str) -> Callable[[str], int] | None:
    """The token counter of an encoding, or None (logged once) when it cannot be loaded, e.g. offline."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises plain exceptions for network and cache failures
        log.warning(
            "tokenizer_unavailable",
            encoding=name,
            error=f"{type(exc).__name__}: {exc}"[:300],
            fallback="estimating 1 token per 4 characters; set TIKTOKEN_CACHE_DIR to a folder with the encoding",
        )
        return None
    encode = encoding.encode_ordinary

    @functools.lru_cache(maxsize=4096)
    def count_short(text: str) -> int:
        return len(encode(text))

    def count(text: str) -> int:
        # Short texts are cached: bulk inputs repeat the same system prompt on every line. Long ones are not:
        # they rarely repeat, and 4,096 of them would keep megabytes of prompts alive.
        return count_short(text) if len(text) <= _CACHED_TEXT_CHARS else len(encode(text))

    return count


def _heuristic(text: str) -> int:
    return math.ceil(len(text) / 4)


class TokenEstimator:
    """Estimates the token cost of request bodies; one instance serves every model and endpoint.

    Args:
        default_output_tokens: the output reservation for requests without an output cap.
    """

    __slots__ = ("_warned_uncapped", "default_output_tokens")

    def __init__(self, default_output_tokens: int = 1024) -> None:
        self.default_output_tokens = default_output_tokens
        self._warned_uncapped = False

    @staticmethod
    def preload(model: str) -> None:
        """Load the model's encoding now (it takes a fraction of a second) rather than at the first request."""
        _load_encoder(encoding_name_for_model(model))

    def text_tokens(self, text: str, model: str) -> int:
        count = _load_encoder(encoding_name_for_model(model))
        return count(text) if count is not None else _heuristic(text)

    def prompt_chars(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """The size of the prompt in characters: decides whether estimating is worth a thread.

        Chat messages with string contents, the common case, are summed without walking the body."""
        messages = body.get("messages")
        if isinstance(messages, list):
            total = 0
            for message in messages:
                content = message.get("content") if isinstance(message, Mapping) else None
                if not isinstance(content, str):
                    break
                total += len(content)
            else:
                return total
        return sum(len(text) for text in _texts(endpoint, body))

    def estimate(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """Tokens the request costs against the token limit: prompt plus output reservation."""
        model = str(body.get("model") or "")
        count = _load_encoder(encoding_name_for_model(model))
        tokens = count if count is not None else _heuristic
        prompt = 0
        if endpoint.endswith("chat/completions"):
            for message in body.get("messages") or ():
                prompt += _TOKENS_PER_MESSAGE + _message_tokens(message, tokens)
            prompt += _REPLY_PRIMING
        else:
            prompt = sum(tokens(text) for text in _texts(endpoint, body))
        if endpoint.endswith("embeddings"):
            return prompt
        return prompt + self._output_reservation(body)

    def _output_reservation(self, body: Mapping[str, Any]) -> int:
        if _output_cap(body) is None and not self._warned_uncapped:
            self._warned_uncapped = True
            log.warning(
                "output_cap_missing",
                reserved_tokens=self.default_output_tokens,
                detail="requests without max_tokens are charged this output reservation against TPM",
            )
        return output_reservation("", body, self.default_output_tokens)


def _output_cap(body: Mapping[str, Any]) -> int | None:
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def output_reservation(endpoint: str, body: Mapping[str, Any], default: int) -> int:
    """Output tokens a request may bill at most: its cap (``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens``; ``default`` without one) times ``n``; 0 for embeddings."""
    if endpoint.endswith("embeddings"):
        return 0
    cap = _output_cap(body)
    if cap is None:
        cap = default
    n = body.get("n")
    return cap * (n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1)


def _message_tokens(message: Any, tokens: Callable[[str], int]) -> int:
    if not isinstance(message, Mapping):
        return 0
    total = 0
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(value, tokens)
        elif key == "name" and isinstance(value, str):
            total += tokens(value) + _TOKENS_PER_NAME
        elif key == "role" and isinstance(value, str):
            total += tokens(value)
        elif key == "tool_calls" and isinstance(value, list):
            for call in value:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    total += tokens(str(function.get("name", ""))) + tokens(str(function.get("arguments", "")))
    return total


def _content_tokens(content: Any, tokens: Callable[[str], int]) -> int:
    if isinstance(content, str):
        return tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    total += tokens(part["text"])
                elif part.get("type") in ("image_url", "input_image"):
                    total += _IMAGE_TOKENS
    return total


def _texts(endpoint: str, body: Mapping[str, Any]) -> list[str]:
    """Every prompt text of a body, for any endpoint."""
    texts: list[str] = []
    for key in ("messages", "input", "prompt", "instructions"):
        _collect(body.get(key), texts)
    return texts


def _collect(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect(item, out)
    elif isinstance(value, Mapping):
        for key in ("content", "text", "input"):
            if key in value:
                _collect(value[key], out)
