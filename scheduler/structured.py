"""Structured outputs: a pydantic model as a request's response format, and the answer parsed back into it.

``submit(prompt, response_format=MyModel)`` sends the strict JSON schema the openai SDK's own conversion makes
of the model (the very body ``client.chat.completions.parse`` sends), and the pool validates the answer with
pydantic. What the SDK's ``parse`` does, this module does too:

- a refusal (``message.refusal``; a ``refusal`` part of a Responses API message) is an answer, not a failure:
  ``parsed`` is None and ``refusal`` says why;
- an answer cut at the output cap (``finish_reason: length``, an ``incomplete`` response) or stopped by the
  content filter cannot be parsed, and asking again with the same cap or content would not help: it fails at
  once (the SDK raises ``LengthFinishReasonError``, ``ContentFilterFinishReasonError``);
- content that is not JSON, or JSON that does not validate, is a problem the pool asks again about
  (``parse_retries``) before failing the job with :class:`~scheduler.OutputInvalid`.

A plain dict ``response_format`` is sent as given and nothing is parsed. Chat completions take
``response_format``; the Responses API takes ``response_format`` or the SDK's ``text_format`` and gets the schema
as ``text.format``. With ``n`` > 1 the first choice is parsed, as :attr:`~scheduler.Result.text` reads it.

The SDK and pydantic are imported only once a class is given: importing the pool does not import them, so the
bulk-run CLI starts sooner.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    import pydantic

__all__ = ["Parsed", "Unparsed", "parse_answer", "prepare_body", "wants_parsing"]

_RESPONSES = "responses"
_CHAT = "chat/completions"
# How many validation errors a failure's message lists (the rest are counted).
_ERRORS_SHOWN = 3


@dataclass(frozen=True, slots=True)
class Parsed:
    """An answer that parsed: the model's instance, or the model's refusal."""

    #: an instance of the response format (None when the model refused)
    parsed: Any
    #: why the model refused, in its words (None when it answered)
    refusal: str | None = None


@dataclass(frozen=True, slots=True)
class Unparsed:
    """An answer that could not be parsed."""

    #: what is wrong, in a few words (the validation errors, without the answer's text)
    problem: str
    #: whether asking again may help (not for an answer cut at the output cap or stopped by the content filter)
    retry: bool = True


# Converted once per model class, not once per request: the SDK's conversion builds the schema anew each time.
# Bodies share the converted dict, which nothing changes.
_CHAT_FORMATS: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()
_TEXT_FORMATS: weakref.WeakKeyDictionary[type, dict[str, Any]] = weakref.WeakKeyDictionary()
_ADAPTERS: weakref.WeakKeyDictionary[type, pydantic.TypeAdapter[Any]] = weakref.WeakKeyDictionary()


def wants_parsing(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` asks for a parsed answer: its ``response_format`` (or ``text_format``) is a class."""
    return isinstance(body.get("response_format"), type) or isinstance(body.get("text_format"), type)


def prepare_body(endpoint: str, body: dict[str, Any]) -> tuple[dict[str, Any], type | None]:
    """Turn a model class given as the response format into the SDK's strict JSON schema.

    Args:
        endpoint: the API path.
        body: the request body (not changed: a converted body is a copy).

    Returns:
        The body to send, and the class to parse the answer into (None: nothing to parse; a dict
        ``response_format`` passes through as it is).

    Raises:
        ConfigurationError: the class is not one the SDK converts (a pydantic model, a dataclass, a TypedDict),
            or the endpoint has no structured output.
    """
    if not wants_parsing(body):
        return body, None
    path = endpoint.removeprefix("/").removeprefix("v1/")
    if path == _CHAT:
        model = body["response_format"]
        if "text_format" in body:
            raise ConfigurationError("text_format is the Responses API's: chat completions take response_format")
        return {**body, "response_format": _format(model, path)}, model
    if path == _RESPONSES:
        if isinstance(body.get("response_format"), type) and isinstance(body.get("text_format"), type):
            raise ConfigurationError("give the Responses API one of response_format= and text_format=, not both")
        model = body.get("text_format") or body["response_format"]
        text = body.get("text")
        if text is not None and not isinstance(text, Mapping):
            raise ConfigurationError(f"the body's 'text' must be an object, got {type(text).__name__}")
        shaped = {key: value for key, value in body.items() if key not in ("text_format", "response_format")}
        shaped["text"] = {**(text or {}), "format": _format(model, path)}
        return shaped, model
    raise ConfigurationError(f"a response format class is for chat completions and the Responses API, not {endpoint}")


def _format(model: type, path: str) -> dict[str, Any]:
    formats = _CHAT_FORMATS if path == _CHAT else _TEXT_FORMATS
    try:
        return formats[model]
    except KeyError:
        pass
    import pydantic
    from openai.lib._parsing._completions import type_to_response_format_param
    from openai.lib._parsing._responses import type_to_text_format_param
    from openai.lib._pydantic import is_basemodel_type, is_dataclass_like_type

    if not (is_basemodel_type(model) or is_dataclass_like_type(model)):
        raise ConfigurationError(
            f"response_format={model.__name__}: give a pydantic BaseModel subclass (or a dataclass or TypedDict), "
            "or a dict such as {'type': 'json_schema', 'json_schema': {...}}"
        )
    try:
        converted = type_to_response_format_param(model) if path == _CHAT else type_to_text_format_param(model)
    except (TypeError, ValueError, pydantic.PydanticUserError) as exc:
        raise ConfigurationError(f"response_format={model.__name__} cannot be made a strict JSON schema: {exc}"
                                 ) from exc
    formats[model] = found = dict(converted)  # type: ignore[arg-type]
    return found


def parse_answer(endpoint: str, body: Any, model: type) -> Parsed | Unparsed:
    """Parse a successful answer's content into ``model``, as the SDK's ``parse`` does.

    Args:
        endpoint: the API path (chat completions or responses).
        body: the answer's JSON body.
        model: the class given as the response format.
    """
    responses = endpoint.removeprefix("/").removeprefix("v1/") == _RESPONSES
    found = _responses_text(body) if responses else _chat_text(body)
    if isinstance(found, Unparsed | Parsed):
        return found
    import pydantic

    try:
        return Parsed(_validate(model, found))
    except pydantic.ValidationError as exc:
        return Unparsed(_describe(model, exc, found))


def _chat_text(body: Any) -> str | Parsed | Unparsed:
    choices = body.get("choices") if isinstance(body, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return Unparsed("the answer has no choices")
    choice = choices[0]
    reason = choice.get("finish_reason")
    if reason == "length":
        return Unparsed("the answer was cut at the output cap (finish_reason length): raise max_tokens", retry=False)
    if reason == "content_filter":
        return Unparsed("the content filter stopped the answer (finish_reason content_filter)", retry=False)
    message = choice.get("message")
    if not isinstance(message, Mapping):
        return Unparsed("the answer's first choice has no message")
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        return Parsed(None, refusal)
    content = message.get("content")
    if not isinstance(content, str) or not content:
        return Unparsed("the answer has no content")
    return content


def _responses_text(body: Any) -> str | Parsed | Unparsed:
    if not isinstance(body, Mapping):
        return Unparsed("the answer is not a response object")
    if body.get("status") == "incomplete":
        details = body.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, Mapping) else None
        return Unparsed(f"the response is incomplete ({reason or 'no reason given'}): raise max_output_tokens "
                        "if it was cut at the cap", retry=False)
    output = body.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, Mapping) or item.get("type") != "message":
            continue
        if item.get("phase") not in (None, "final_answer"):
            continue  # the SDK parses only final answers
        for part in item.get("content") or ():
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                return Parsed(None, part["refusal"])
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                return str(part["text"])
    return Unparsed("the response has no output text")


def _validate(model: type, content: str) -> Any:
    import pydantic
    from openai.lib._pydantic import is_basemodel_type

    if is_basemodel_type(model):
        return model.model_validate_json(content)
    adapter = _ADAPTERS.get(model)
    if adapter is None:
        adapter = _ADAPTERS[model] = pydantic.TypeAdapter(model)
    return adapter.validate_json(content)


def _describe(model: type, exc: pydantic.ValidationError, content: str) -> str:
    """The validation errors in a line: where and what, never the values (they may hold anything)."""
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    if problems and problems[0]["type"] == "json_invalid":
        return f"the answer is not valid JSON ({problems[0]['msg']}; {len(content):,} characters)"
    shown = "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or '(root)'}: {problem['msg']}" for problem in problems[:_ERRORS_SHOWN]
    )
    more = f" (and {len(problems) - _ERRORS_SHOWN} more)" if len(problems) > _ERRORS_SHOWN else ""
    return f"the answer does not validate against {model.__name__}: {shown}{more}"
