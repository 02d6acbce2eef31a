"""Context windows, and fitting a request into one: a check for every request, and trimming on request.

A request whose prompt and output cap cannot fit the model's context window fails at the server after waiting
its turn and spending rate limit; :func:`fit_request` fails it at once with :class:`~scheduler.RequestTooLarge`
naming the window, or, with a :class:`TrimPolicy`, drops the oldest messages of a chat until it fits.

Windows come from :data:`DEFAULT_WINDOWS` (current OpenAI models; a dated snapshot takes its longest listed
prefix, as prices do), extended or overridden with :meth:`ContextWindows.load`; an unknown model has no window
and is not checked. What must fit: prompt + output cap <= the window, and the prompt alone <= the model's input
limit where it has one (gpt-5: 272,000 of 400,000). The cap counts once, not times ``n``: each choice is its own
generation. Without a cap, nothing is set aside (the server then stops the output at the window's end).

The check refuses only what surely cannot fit: it measures with the estimator's lower bound (images of unknown
size at their cheapest; no text at all without the real tokenizer), while trimming drops messages until the
upper bound fits, so that what it sends fits too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError, RequestTooLarge
from .tokens import TokenEstimator, has_output, output_cap

__all__ = [
    "DEFAULT_WINDOWS",
    "ContextWindow",
    "ContextWindows",
    "Fitted",
    "TrimPolicy",
    "check_context",
    "fit_request",
    "prompt_limit",
    "trim_messages",
]

_CHAT = "/v1/chat/completions"
_KEPT_ROLES = frozenset({"system", "developer"})
_CALL_RESULT_ROLES = frozenset({"tool", "function"})


@dataclass(frozen=True, slots=True)
class ContextWindow:
    """A model's context window, in tokens."""

    #: prompt + output cap must fit in this (embeddings: all inputs of one request together)
    tokens: int
    #: the prompt alone may not exceed this, where the model has such a limit (gpt-5: 272,000)
    max_input: int | None = None
    #: each input of an embeddings request may not exceed this
    per_input: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "max_input", "per_input"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigurationError(f"ContextWindow.{name} must be a positive number of tokens, got {value!r}")


# OpenAI's published figures (the models' pages on platform.openai.com) at the time of writing (2026). They change:
# override with Pool(context_windows={...}).
DEFAULT_WINDOWS: Mapping[str, ContextWindow] = {
    "gpt-3.5-turbo": ContextWindow(16_385),
    "gpt-3.5-turbo-instruct": ContextWindow(4_096),
    "gpt-4": ContextWindow(8_192),
    "gpt-4-32k": ContextWindow(32_768),
    "gpt-4-turbo": ContextWindow(128_000),
    "gpt-4-0125": ContextWindow(128_000),  # gpt-4-0125-preview
    "gpt-4-1106": ContextWindow(128_000),  # gpt-4-1106-preview, gpt-4-1106-vision-preview
    "gpt-4-vision": ContextWindow(128_000),
    "gpt-4o": ContextWindow(128_000),  # and gpt-4o-mini, the audio and search previews
    "chatgpt-4o": ContextWindow(128_000),
    "gpt-4.1": ContextWindow(1_047_576),  # and gpt-4.1-mini, gpt-4.1-nano
    "gpt-4.5": ContextWindow(128_000),
    "o1": ContextWindow(200_000),  # and o1-pro
    "o1-mini": ContextWindow(128_000),
    "o1-preview": ContextWindow(128_000),
    "o3": ContextWindow(200_000),  # and o3-mini, o3-pro, o3-deep-research
    "o4-mini": ContextWindow(200_000),
    "codex-mini": ContextWindow(200_000),
    "computer-use-preview": ContextWindow(8_192),
    "gpt-oss": ContextWindow(131_072),
    # 272,000 input + 128,000 output tokens ("Introducing GPT-5 for developers"); and gpt-5-mini, -nano, -pro.
    "gpt-5": ContextWindow(400_000, max_input=272_000),
    "gpt-5-chat": ContextWindow(128_000),
    # Later gpt-5.x models: published windows range from 400,000 to 1,050,000 (gpt-5.4). The largest is taken,
    # so that the check never refuses a request that fits; the server refuses the rest, as without a table.
    "gpt-5.": ContextWindow(1_050_000),
    # Embeddings: 8,192 tokens per input, 300,000 summed over the inputs of one request.
    "text-embedding-3": ContextWindow(300_000, per_input=8_192),
    "text-embedding-ada-002": ContextWindow(300_000, per_input=8_192),
}


class ContextWindows:
    """Context windows by model name, matched by the longest listed prefix (case-insensitive; ``openai/``
    router prefixes and ``ft:`` ignored). Unknown models have none."""

    __slots__ = ("_found", "_windows")

    def __init__(self, windows: Mapping[str, ContextWindow] = DEFAULT_WINDOWS) -> None:
        self._windows = {name.lower(): window for name, window in windows.items()}
        # Bulk runs use a handful of model names: resolve each once, not once per request.
        self._found: dict[str, ContextWindow | None] = {}

    @classmethod
    def load(cls, source: ContextWindows | Mapping[str, ContextWindow | int] | None = None) -> ContextWindows:
        """The default windows, extended or overridden by ``source`` (model name -> :class:`ContextWindow`, or
        a number of tokens).

        Raises:
            ConfigurationError: an entry is not a window.
        """
        if isinstance(source, ContextWindows):
            return source
        windows = dict(DEFAULT_WINDOWS)
        for name, entry in (source or {}).items():
            if isinstance(entry, ContextWindow):
                windows[str(name)] = entry
            elif isinstance(entry, int) and not isinstance(entry, bool):
                windows[str(name)] = ContextWindow(entry)
            else:
                raise ConfigurationError(
                    f"the context window of {name!r} must be a number of tokens or a ContextWindow, got {entry!r}"
                )
        return cls(windows)

    def window(self, model: str) -> ContextWindow | None:
        """The context window of ``model`` (its longest listed prefix), or None when none matches."""
        try:
            return self._found[model]
        except KeyError:
            pass
        name = model.rsplit("/", 1)[-1].lower().removeprefix("ft:")
        best = max((prefix for prefix in self._windows if name.startswith(prefix)), key=len, default=None)
        found = self._windows[best] if best is not None else None
        self._found[model] = found
        return found


@dataclass(frozen=True, slots=True)
class TrimPolicy:
    """How to trim a chat that does not fit: drop its oldest messages, never a system or developer message,
    never the last user message nor anything after it, never the last ``keep_last`` messages. An assistant
    message with tool calls goes together with the tool messages answering it.
    """

    #: the most prompt tokens to send; None: what the model's context window leaves beside the output cap
    max_input_tokens: int | None = None
    #: the most recent messages that are never dropped
    keep_last: int = 1

    def __post_init__(self) -> None:
        limit = self.max_input_tokens
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ConfigurationError(f"TrimPolicy.max_input_tokens must be a positive integer or None, got {limit!r}")
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ConfigurationError(f"TrimPolicy.keep_last must be an integer >= 0, got {self.keep_last!r}")


@dataclass(frozen=True, slots=True)
class Fitted:
    """A request body that fits its context window."""

    #: the body to send: the one given, or a copy with fewer messages
    body: Mapping[str, Any]
    #: how many messages were dropped
    trimmed: int
    #: the estimator's (upper) count of the body's prompt tokens
    prompt_tokens: int


def prompt_limit(window: ContextWindow | None, output_tokens: int, max_input_tokens: int | None = None) -> int | None:
    """The most prompt tokens a request may have: ``max_input_tokens`` where given, else what the window leaves
    beside ``output_tokens`` (and at most its input limit); None when neither is known."""
    if max_input_tokens is not None:
        return max_input_tokens
    if window is None:
        return None
    limit = window.tokens - output_tokens
    return min(limit, window.max_input) if window.max_input is not None else limit


def fit_request(
    endpoint: str,
    body: Mapping[str, Any],
    estimator: TokenEstimator,
    windows: ContextWindows | None,
    trim: TrimPolicy | None = None,
) -> Fitted:
    """Check a request against its model's context window and, with ``trim``, trim a chat to fit it.

    This is the pool's entry point: the estimate to charge is ``prompt_tokens`` plus
    ``estimator.output_tokens(endpoint, fitted.body)``. Other endpoints than chat completions are checked, not
    trimmed.

    Raises:
        RequestTooLarge: the request cannot fit, even trimmed as far as ``trim`` allows.
    """
    prompt = estimator.prompt_tokens(endpoint, body)
    max_input = trim.max_input_tokens if trim is not None else None
    window = windows.window(_model(body)) if windows is not None else None
    if window is None and max_input is None:
        return Fitted(body, 0, prompt)
    output = (output_cap(body) or 0) if has_output(endpoint) else 0
    if trim is not None and endpoint.endswith("chat/completions"):
        return trim_messages(body, estimator, window=window, output_tokens=output, policy=trim, prompt_tokens=prompt)
    check_context(
        endpoint, body, estimator, window=window, output_tokens=output, max_input_tokens=max_input,
        prompt_tokens=prompt,
    )
    return Fitted(body, 0, prompt)


def check_context(
    endpoint: str,
    body: Mapping[str, Any],
    estimator: TokenEstimator,
    *,
    window: ContextWindow | None,
    output_tokens: int,
    max_input_tokens: int | None = None,
    prompt_tokens: int | None = None,
) -> None:
    """Raise when the request surely cannot fit: its least possible prompt is over :func:`prompt_limit`, or
    (embeddings) one input is over the window's ``per_input``.

    Args:
        endpoint: the API path.
        body: the request body.
        estimator: counts the tokens.
        window: the model's context window (None: only ``max_input_tokens`` is checked).
        output_tokens: the output cap that must fit beside the prompt (0 without one).
        max_input_tokens: an explicit limit on the prompt, instead of the window's.
        prompt_tokens: the prompt's upper count, when the caller has it already: saves counting again in the
            common case, a prompt that fits.

    Raises:
        RequestTooLarge: the message names the window and the sizes.
    """
    prompt = estimator.prompt_tokens(endpoint, body) if prompt_tokens is None else prompt_tokens
    limit = prompt_limit(window, output_tokens, max_input_tokens)
    if limit is not None and prompt > limit:
        least = estimator.prompt_tokens(endpoint, body, lower=True)
        if least > limit:
            chat = endpoint.endswith("chat/completions")
            advice = " (trim=True, or --trim, drops the oldest messages)" if chat else ""
            raise RequestTooLarge(
                f"the prompt needs {least:,} tokens{_beside(output_tokens)}: more than "
                f"{_describe(body, window, output_tokens, max_input_tokens)}{advice}"
            )
    if window is not None and window.per_input is not None and prompt > window.per_input:
        for index, tokens in enumerate(estimator.input_tokens(body)):
            if tokens > window.per_input:
                raise RequestTooLarge(
                    f"input {index} needs {tokens:,} tokens: more than {_model(body) or 'the model'}'s limit of "
                    f"{window.per_input:,} tokens per input"
                )


def trim_messages(
    body: Mapping[str, Any],
    estimator: TokenEstimator,
    *,
    window: ContextWindow | None,
    output_tokens: int,
    policy: TrimPolicy = TrimPolicy(),
    prompt_tokens: int | None = None,
) -> Fitted:
    """Drop a chat's oldest messages (as ``policy`` allows) until its prompt fits beside ``output_tokens``.

    Pure: the body given is not changed; a trimmed body is a shallow copy with a new ``messages`` list.

    Args:
        body: a chat completions body.
        estimator: counts the tokens.
        window: the model's context window (None: only ``policy.max_input_tokens`` limits the prompt).
        output_tokens: the output cap that must fit beside the prompt (0 without one).
        policy: which messages may go, and an explicit prompt limit.
        prompt_tokens: the body's prompt count, when the caller has it already.

    Raises:
        RequestTooLarge: even with every message the policy allows dropped, the prompt surely cannot fit.
    """
    prompt = estimator.prompt_tokens(_CHAT, body) if prompt_tokens is None else prompt_tokens
    limit = prompt_limit(window, output_tokens, policy.max_input_tokens)
    if limit is None or prompt <= limit:
        return Fitted(body, 0, prompt)
    messages = body.get("messages")
    dropped: set[int] = set()
    if isinstance(messages, list):
        model = _model(body)
        for group in _droppable_groups(messages, policy.keep_last):
            if prompt <= limit:
                break
            dropped.update(group)
            # Message counts add up to the prompt's: the per-message framing is in each.
            prompt -= sum(estimator.message_tokens(messages[index], model) for index in group)
    fitted = body
    if dropped:
        assert isinstance(messages, list)
        fitted = {**body, "messages": [message for index, message in enumerate(messages) if index not in dropped]}
    if prompt > limit:
        least = estimator.prompt_tokens(_CHAT, fitted, lower=True)
        if least > limit:
            gone = f"even after dropping the {len(dropped)} messages that may go" if dropped else "with none to drop"
            raise RequestTooLarge(
                f"{gone}, the prompt needs {least:,} tokens{_beside(output_tokens)}: more than "
                f"{_describe(body, window, output_tokens, policy.max_input_tokens)} (system and developer "
                f"messages, the last user message and what follows it are kept)"
            )
    return Fitted(fitted, len(dropped), prompt)


def _droppable_groups(messages: list[Any], keep_last: int) -> list[list[int]]:
    """Indices of the messages that may be dropped, in groups that go together, oldest first."""
    end = len(messages) - keep_last
    last_user = max((i for i, message in enumerate(messages) if _role(message) == "user"), default=None)
    if last_user is not None:
        end = min(end, last_user)
    groups: list[list[int]] = []
    i = 0
    while i < end:
        role = _role(messages[i])
        if role in _KEPT_ROLES:
            i += 1
            continue
        group = [i]
        i += 1
        calls = isinstance(messages[group[0]], Mapping) and (
            messages[group[0]].get("tool_calls") or messages[group[0]].get("function_call")
        )
        if calls or role in _CALL_RESULT_ROLES:  # a call and its results, or results whose call is gone
            while i < end and _role(messages[i]) in _CALL_RESULT_ROLES:
                group.append(i)
                i += 1
            if i == end and i < len(messages) and _role(messages[i]) in _CALL_RESULT_ROLES:
                continue  # results of this call are kept: dropping the call would orphan them
        groups.append(group)
    return groups


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, Mapping) else None


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model") if isinstance(body, Mapping) else None
    return model if isinstance(model, str) else ""


def _beside(output_tokens: int) -> str:
    return f" beside an output cap of {output_tokens:,}" if output_tokens else ""


def _describe(
    body: Mapping[str, Any], window: ContextWindow | None, output_tokens: int, max_input_tokens: int | None
) -> str:
    """Which limit binds, in words: 'gpt-4o's context window of 128,000 tokens'."""
    if max_input_tokens is not None:
        return f"the limit of {max_input_tokens:,} input tokens (max_input_tokens)"
    assert window is not None
    model = _model(body) or "the model"
    if window.max_input is not None and window.max_input <= window.tokens - output_tokens:
        return f"{model}'s limit of {window.max_input:,} input tokens (context window: {window.tokens:,})"
    return f"{model}'s context window of {window.tokens:,} tokens"
