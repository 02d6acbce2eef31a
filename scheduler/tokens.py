"""Token estimates: what a request will cost against the token limit, counted with tiktoken.

The cost of a request is its prompt plus its output reservation; that is what OpenAI charges against TPM when
the request is admitted. The server's count can still differ a little from ours, which the limiter calibrates
away from the response headers. The rules, by part of the body:

- **Chat messages**: every string field of a message (role, content, name, tool_call_id...) with tiktoken and
  the model's encoding, plus 3 tokens per message, 1 per ``name`` and 3 to prime the reply (OpenAI cookbook,
  "How to count tokens with tiktoken"). Tool calls in messages: their name, arguments and id, plus 3 each.
  Responses API ``input`` items count like messages; ``instructions`` as text.
- **Tool and function definitions** (``tools``, ``functions``): the cookbook's formula renders each function as
  a TypeScript-like signature (7 tokens per function on o200k_base, 10 on cl100k_base; 3 per property; 3 per
  enum item; 12 once). We count each function's JSON text instead, which is longer than that rendering, plus
  10 per function, 3 per enum item and 12 once: never below the cookbook's count (a property test holds it).
  ``tool_choice``/``function_call`` as their JSON text.
- **Structured outputs**: a ``response_format`` (or Responses API ``text.format``) JSON schema counts as prompt,
  as its JSON text.
- **Token arrays** (embeddings ``input``, completions ``prompt``): one token per integer.
- **Images, audio, files**: see :mod:`scheduler._media` (OpenAI's image formulas by model and ``detail``, the
  size read from a data URL's header; 10 tokens per second of audio).
- **Output reservation**: ``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens`` (the default
  reservation without one), times ``n`` (or ``best_of`` for completions); none for embeddings and moderations,
  which produce no tokens.

Without tiktoken's encoding files (an offline machine without ``TIKTOKEN_CACHE_DIR``), text is counted as one
token per two UTF-8 bytes, with one warning; see :func:`_fallback_count` for why.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeGuard

import orjson
import structlog

from ._media import audio_tokens, file_tokens, image_tokens

__all__ = [
    "TokenEstimator",
    "encoding_available",
    "encoding_name_for_model",
    "has_output",
    "output_cap",
    "output_reservation",
]

log = structlog.get_logger("scheduler")

Count = Callable[[str], int]

# Per-message framing of the chat format (OpenAI cookbook, "How to count tokens with tiktoken").
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# Function definitions (the cookbook's num_tokens_for_tools): the larger per-function figure of the two
# encodings (cl100k_base's 10, o200k_base's 7), the per-enum-item figure and the closing figure.
_FUNCTION_INIT = 10
_ENUM_ITEM = 3
_FUNCTIONS_END = 12
# A tool call in an assistant message: its framing, like a message's.
_TOOL_CALL = 3

_CACHED_TEXT_CHARS = 4096
_LOAD_TIMEOUT_S = 20.0
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o", "gpt-oss")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")

_TEXT_PARTS = frozenset({"text", "input_text", "output_text", "summary_text", "reasoning_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image"})
_FILE_PARTS = frozenset({"file", "input_file"})
_PART_TYPES = _TEXT_PARTS | _IMAGE_PARTS | _FILE_PARTS | {"input_audio"}
_INT_ONLY = {int}
# Body fields besides the messages that the model reads as prompt (chat completions and Responses API).
_SCHEMA_FIELDS = ("response_format", "tool_choice", "function_call")
_NO_OUTPUT_ENDPOINTS = ("embeddings", "moderations")
# Chat fields that need the general walk: a chat without them takes the fast path.
_CHAT_EXTRAS = frozenset({"tools", "functions", *_SCHEMA_FIELDS, "prediction"})
_COPIES = frozenset({"n", "best_of"})

_HOW_TO_FIX = "set TIKTOKEN_CACHE_DIR to a folder holding the tiktoken encodings (README: 'Offline machines')"
_warn_lock = threading.Lock()
_warned_unavailable = False


def encoding_name_for_model(model: str) -> str:
    """The tiktoken encoding of a model; o200k_base, the current models' encoding, for unknown names."""
    name = model.rsplit("/", 1)[-1].lower().removeprefix("ft:")  # "openai/gpt-4o" from routers; fine-tunes
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def _get_encoding(name: str, timeout_s: float) -> Any:
    """``tiktoken.get_encoding(name)``, waiting at most ``timeout_s``.

    tiktoken downloads a missing encoding with no timeout: where the network drops packets instead of refusing
    them, that would hang the pool's start. The load runs in a daemon thread that is left behind on timeout (if
    it finishes later, the next process finds the file in tiktoken's cache).

    Raises:
        TimeoutError: the load did not finish in time.
        Exception: whatever tiktoken raised (a network or cache error).
    """
    import tiktoken

    outcome: list[Any] = []

    def load() -> None:
        try:
            outcome.append(tiktoken.get_encoding(name))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            outcome.append(exc)

    thread = threading.Thread(target=load, name=f"tiktoken-load-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TimeoutError(f"loading took more than {timeout_s:g} s")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def encoding_available(name: str, timeout_s: float = _LOAD_TIMEOUT_S) -> bool:
    """Whether tiktoken can load the encoding here (from its cache, or by downloading it). Never raises."""
    try:
        _get_encoding(name, timeout_s)
    except Exception:
        return False
    return True


@functools.cache
def _load_encoder(name: str) -> Count | None:
    """The token counter of an encoding, or None (warned once per process) when it cannot be loaded."""
    try:
        encoding = _get_encoding(name, _LOAD_TIMEOUT_S)
    except Exception as exc:  # tiktoken raises plain exceptions (requests', OSError, ValueError) on failure
        _warn_unavailable(name, exc)
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


def _warn_unavailable(name: str, exc: Exception) -> None:
    """One warning per process (later encodings only at debug level), short and whole: what failed, what
    happens instead, how to fix it. The exception's own text is left out: requests' is hundreds of characters."""
    global _warned_unavailable
    with _warn_lock:
        first, _warned_unavailable = not _warned_unavailable, True
    # requests' errors derive from OSError, like the cache's file errors: no network, or an unreadable cache.
    cause = type(exc).__name__
    if isinstance(exc, OSError):
        cause += ": no network, or no readable cache?"
    emit = log.warning if first else log.debug
    emit(
        "tokenizer_unavailable",
        encoding=name,
        error=f"could not load the tiktoken encoding {name} ({cause})",
        fallback="token estimates count 1 token per 2 bytes of text, more than most texts have",
        fix=_HOW_TO_FIX,
    )


def _fallback_count(text: str) -> int:
    """Tokens of a text without the tokenizer: one per two UTF-8 bytes.

    Why not 4 characters a token (tiktoken's rule of thumb)? It holds for English prose only: digits, code, JSON,
    CJK and most non-Latin scripts have far fewer characters per token (o200k_base: CJK 1.3, Hindi 2.9, JSON
    2.3, random text 0.3), so it undercounts them up to tenfold, and an undercount means 429s. Every BPE token
    is at least one byte, so bytes never undercount; two bytes a token stays above the real count for prose
    (3.7 bytes a token), code (4.4), digits (2.5-3), JSON (2.3) and CJK (2.6-4 on either encoding), and is at
    most 2x high for English. Only high-entropy strings (base64, hex, random symbols: 1.05-1.75 bytes a token)
    come out low. The limiter learns the real ratio from the response headers within the first seconds.
    """
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (size + 1) // 2


def _no_count(text: str) -> int:
    return 0


class TokenEstimator:
    """Estimates the token cost of request bodies; one instance serves every model and endpoint.

    Every method accepts any JSON-like body (it is user input) and never raises.

    Args:
        default_output_tokens: the output reservation for requests without an output cap.
        tokenizer: counts the tokens of a text for every model instead of tiktoken (another provider's
            tokenizer; a deterministic one in tests).
    """

    __slots__ = ("_counters", "_tokenizer", "_warned_uncapped", "default_output_tokens")

    def __init__(self, default_output_tokens: int = 1024, *, tokenizer: Count | None = None) -> None:
        self.default_output_tokens = default_output_tokens
        self._tokenizer = tokenizer
        self._warned_uncapped = False
        # model name -> its encoding's counter: resolved once per model, not once per request
        self._counters: dict[str, Count] = {}

    @staticmethod
    def preload(model: str) -> None:
        """Load the model's encoding now (it takes a fraction of a second) rather than at the first request."""
        _load_encoder(encoding_name_for_model(model))

    def _count(self, model: str) -> Count:
        try:
            return self._counters[model]
        except KeyError:
            count = self._tokenizer or _load_encoder(encoding_name_for_model(model)) or _fallback_count
            self._counters[model] = count
            return count

    def has_encoding(self, model: str) -> bool:
        """Whether ``model``'s texts are counted with its real encoding (False: the offline fallback)."""
        return self._count(model) is not _fallback_count

    def text_tokens(self, text: str, model: str) -> int:
        """Tokens of a plain text in ``model``'s encoding."""
        return self._count(model)(text)

    def prompt_chars(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """The size of the prompt in characters: decides whether estimating is worth a thread.

        Chat messages with string contents, the common case, are summed without walking the body."""
        if type(body) is not dict and not isinstance(body, Mapping):
            return 0
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
        return _Prompt(len, _model(body), lower=False).body(endpoint, body)

    def estimate(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """Tokens the request costs against the token limit: prompt plus output reservation."""
        return self.prompt_tokens(endpoint, body) + self.output_tokens(endpoint, body)

    def prompt_tokens(self, endpoint: str, body: Mapping[str, Any], *, lower: bool = False) -> int:
        """Tokens of the request's prompt: everything it sends the model.

        Args:
            endpoint: the API path, e.g. ``/v1/chat/completions``.
            body: the request body.
            lower: the least the prompt can cost instead of the most: images of unknown size at their cheapest,
                audio of unknown length and files not at all, and no text at all without the real encoding.
                For checks that must not refuse a request that fits (the context window).
        """
        if type(body) is dict and not lower and endpoint.endswith("chat/completions"):
            plain = self._plain_chat(body)
            if plain is not None:
                return plain
        if not isinstance(body, Mapping):
            return 0
        model = _model(body)
        count = self._count(model)
        if lower and count is _fallback_count:
            count = _no_count
        return _Prompt(count, model, lower).body(endpoint, body)

    def _plain_chat(self, body: dict[str, Any]) -> int | None:
        """The prompt of a chat of string-only messages and nothing else to count, the common case, without the
        general walk (the estimate is on every request's path); None for any other body."""
        messages = body.get("messages")
        if type(messages) is not list or not _CHAT_EXTRAS.isdisjoint(body):
            return None
        count = self._count(_model(body))
        total = _REPLY_PRIMING
        for message in messages:
            if type(message) is not dict:
                return None
            total += _TOKENS_PER_MESSAGE
            for key, value in message.items():
                if type(value) is not str:
                    return None
                total += count(value)
                if key == "name":
                    total += _TOKENS_PER_NAME
        return total

    def message_tokens(self, message: Any, model: str, *, lower: bool = False) -> int:
        """Tokens of one chat message, its per-message framing included (see :meth:`prompt_tokens`)."""
        count = self._count(model)
        if lower and count is _fallback_count:
            count = _no_count
        return _TOKENS_PER_MESSAGE + _Prompt(count, model, lower).message(message)

    def input_tokens(self, body: Mapping[str, Any]) -> list[int]:
        """Tokens of each input of an embeddings body (a string or a token array is one input)."""
        if not isinstance(body, Mapping):
            return []
        prompt = _Prompt(self._count(_model(body)), _model(body), lower=False)
        inputs = body.get("input")
        if isinstance(inputs, list) and inputs and set(map(type, inputs)) != _INT_ONLY:
            return [prompt.value(item) for item in inputs]
        return [prompt.value(inputs)]

    def output_tokens(self, endpoint: str, body: Mapping[str, Any]) -> int:
        """The output reservation (see :func:`output_reservation`), with one warning per estimator the first time
        a request without an output cap gets the default."""
        if endpoint.endswith(_NO_OUTPUT_ENDPOINTS):
            return 0
        cap = output_cap(body)
        if cap is None:
            cap = self.default_output_tokens
            if not self._warned_uncapped:
                self._warned_uncapped = True
                log.warning(
                    "output_cap_missing",
                    reserved_tokens=cap,
                    detail=f"requests without max_tokens are charged {cap:,} output tokens each against the "
                    "tokens-per-minute limit, as OpenAI charges them: with a TPM limit this can make a run "
                    "several times slower than it needs to be. Set max_tokens (or max_completion_tokens) on the "
                    "requests to what their answers need, or Pool(default_max_tokens=...)",
                )
        return cap * _copies(body)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    return model if isinstance(model, str) else ""


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def output_cap(body: Mapping[str, Any]) -> int | None:
    """The request's own output cap (``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``) for
    one output, or None without a valid one."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    return cap if _is_int(cap) and cap > 0 else None


def has_output(endpoint: str) -> bool:
    """Whether the endpoint generates tokens: embeddings and moderations produce none."""
    return not endpoint.endswith(_NO_OUTPUT_ENDPOINTS)


def output_reservation(endpoint: str, body: Mapping[str, Any], default: int) -> int:
    """Output tokens a request may bill at most: its cap (``max_completion_tokens``, ``max_tokens`` or
    ``max_output_tokens``; ``default`` without one) times ``n`` (completions: the larger of ``n`` and
    ``best_of``, which the server generates and bills); 0 for embeddings and moderations, which produce no
    tokens (OpenAI counts only their input)."""
    if not has_output(endpoint):
        return 0
    cap = output_cap(body)
    return _copies(body) * (default if cap is None else cap)


def _copies(body: Mapping[str, Any]) -> int:
    """How many outputs the request asks for: ``n``, or ``best_of`` where larger (legacy completions)."""
    copies = 1
    if type(body) is dict:
        if _COPIES.isdisjoint(body):  # the common case, decided without two lookups
            return copies
    elif not isinstance(body, Mapping):
        return copies
    for key in _COPIES:
        value = body.get(key)
        if _is_int(value) and value > copies:
            copies = value
    return copies


class _Prompt:
    """One walk over a body's prompt, with one text counter and one bound (most, or least)."""

    __slots__ = ("count", "lower", "model")

    def __init__(self, count: Count, model: str, lower: bool) -> None:
        self.count = count
        self.model = model
        self.lower = lower

    def body(self, endpoint: str, body: Mapping[str, Any]) -> int:
        if endpoint.endswith("chat/completions"):
            return self.chat(body)
        if endpoint.endswith("responses"):
            return self.responses(body)
        if endpoint.endswith(("embeddings", "moderations")):
            return self.value(body.get("input"))
        if endpoint.endswith("completions"):
            return self.value(body.get("prompt")) + self.value(body.get("suffix"))
        # Any other endpoint: whatever text it carries where prompts go.
        return sum(self.value(body.get(key)) for key in ("messages", "input", "prompt", "instructions"))

    def chat(self, body: Mapping[str, Any]) -> int:
        total = _REPLY_PRIMING
        messages = body.get("messages")
        if isinstance(messages, list):
            for message in messages:
                total += _TOKENS_PER_MESSAGE + self.message(message)
        else:
            total += self.value(messages)
        total += self.functions(body.get("tools")) + self.functions(body.get("functions"))
        for key in _SCHEMA_FIELDS:
            value = body.get(key)
            if value is not None:
                total += self.json(value)
        prediction = body.get("prediction")  # predicted output: billed, so charged
        if isinstance(prediction, Mapping):
            total += self.value(prediction.get("content"))
        return total

    def responses(self, body: Mapping[str, Any]) -> int:
        total = _REPLY_PRIMING + self.value(body.get("instructions"))
        items = body.get("input")
        if isinstance(items, str):
            total += _TOKENS_PER_MESSAGE + self.count("user") + self.count(items)
        elif isinstance(items, list):
            for item in items:
                total += _TOKENS_PER_MESSAGE + self.message(item)
        else:
            total += self.value(items)
        total += self.functions(body.get("tools"))
        choice = body.get("tool_choice")
        if choice is not None:
            total += self.json(choice)
        text = body.get("text")
        if isinstance(text, Mapping) and text.get("format") is not None:
            total += self.json(text["format"])
        prompt = body.get("prompt")  # a stored prompt's variables (its template's size is not known here)
        if isinstance(prompt, Mapping):
            total += self.value(prompt.get("variables"))
        return total

    def message(self, message: Any) -> int:
        """A chat message (or Responses API input item), without the per-message framing."""
        if not isinstance(message, Mapping):
            return self.value(message)
        kind = message.get("type")
        if isinstance(kind, str) and kind in _PART_TYPES:  # a bare content part where an item was expected
            return self.value(message)
        count = self.count
        total = 0
        for key, value in message.items():
            if isinstance(value, str):
                total += count(value)
                if key == "name":
                    total += _TOKENS_PER_NAME
            elif value is None:
                continue
            elif key == "tool_calls" and isinstance(value, list):
                total += sum(_TOOL_CALL + self.value(call) for call in value)
            else:
                total += self.value(value)
        return total

    def functions(self, tools: Any) -> int:
        """Tool or function definitions, never below the cookbook's count (see the module docstring)."""
        if not isinstance(tools, list):
            return self.value(tools)
        if not tools:
            return 0
        total = _FUNCTIONS_END
        for tool in tools:
            if not isinstance(tool, Mapping):
                total += self.value(tool)
                continue
            function = tool.get("function")  # chat: {"type": "function", "function": {...}}; responses: flat
            definition = function if isinstance(function, Mapping) else tool
            total += _FUNCTION_INIT + self.json(definition) + _ENUM_ITEM * _enum_items(definition)
        return total

    def json(self, value: Any) -> int:
        """Tokens of a value's compact JSON text (how a schema reaches the model, give or take)."""
        try:
            text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()
        except (orjson.JSONEncodeError, UnicodeDecodeError):  # too deep, an int past 64 bits: count its texts
            return self.value(value)
        return self.count(text)

    def value(self, value: Any) -> int:
        """Any JSON-like value: its strings, token ids and media parts. Iterative: user input can nest deeply."""
        count, lower = self.count, self.lower
        total = 0
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                total += count(item)
            elif isinstance(item, Mapping):
                kind = item.get("type")
                if isinstance(kind, str):
                    if kind in _TEXT_PARTS and isinstance(item.get("text"), str):
                        total += count(item["text"])
                        continue
                    if kind in _IMAGE_PARTS:
                        total += image_tokens(item, self.model, lower)
                        continue
                    if kind == "input_audio":
                        total += audio_tokens(item, lower)
                        continue
                    if kind in _FILE_PARTS:
                        spec = item.get("file") if kind == "file" else item
                        if isinstance(spec, Mapping):
                            name = spec.get("filename")
                            total += file_tokens(spec, lower) + (count(name) if isinstance(name, str) else 0)
                        continue
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                if item and set(map(type, item)) == _INT_ONLY:  # a token array, counted without a Python loop
                    total += len(item)
                else:
                    stack.extend(item)
            elif _is_int(item):
                total += 1  # a token id of a token-array input
        return total


def _enum_items(schema: Any) -> int:
    """How many enum values a JSON schema lists, at any depth."""
    total = 0
    stack = [schema]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            enum = item.get("enum")
            if isinstance(enum, list):
                total += len(enum)
            stack.extend(value for value in item.values() if isinstance(value, Mapping | list))
        elif isinstance(item, list):
            stack.extend(value for value in item if isinstance(value, Mapping | list))
    return total
