"""Reading API requests the way OpenAI does: what each costs, what to answer, and OpenAI's 400s."""

from __future__ import annotations

import math
import random
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import MockConfig

EMBEDDING_DIM = 8  # default vector length: small, so embeddings stay cheap to serve
_MAX_DIMENSIONS = 3_072  # text-embedding-3-large's length; more is refused
_TIERS = {"auto": "default", "default": "default", "flex": "flex", "scale": "scale", "priority": "priority"}
_BAD_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."


class BadRequest(Exception):
    """A 400 with OpenAI's invalid_request_error body (or another `type`)."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, type_: str = "invalid_request_error"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.type = type_


@dataclass(slots=True)
class Job:
    """A parsed API request: what it costs and what to answer."""

    endpoint: str  # "chat" | "embeddings" | "responses"
    model: str
    prompt_tokens: int
    completion_tokens: int  # per choice; shaping the answer may change it (max_output, JSON)
    n: int
    cap: int | None  # the caller's output cap per choice
    cost: int  # tokens charged up front by OpenAI-style limiters: prompt + reserve
    reserve: int  # output tokens reserved up front: the cap (or the uncapped answer) times n
    words: list[str]  # words the reply text is made from
    stream: bool = False
    include_usage: bool = False
    tier: str = "default"  # the service tier that serves it
    json_mode: bool = False  # response_format json_schema / json_object (text.format on responses)
    schema: Any = None  # the JSON schema to satisfy (None: any JSON object)
    schema_name: str = ""
    inputs: list[Any] | None = None  # embeddings: the inputs, each a string or a list of token ints
    dimensions: int = EMBEDDING_DIM
    cut: bool = False  # the answer stops for length without a cap of the caller's (max_output fault)

    @property
    def hit_cap(self) -> bool:
        """The answer stops for length: the caller's output cap, or the model's own limit."""
        return self.cut or (self.cap is not None and self.completion_tokens >= self.cap)


Parser = Callable[[dict[str, Any], MockConfig], Job]


def model_of(body: dict[str, Any]) -> str:
    """The body's model.

    Raises:
        BadRequest: no model.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model", "missing_required_parameter")
    return model


def _positive_int(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"Invalid '{name}': expected an integer >= 1, got {value!r}.", name, "invalid_value")
    return value


def _content_text(content: Any) -> str:
    """Text of a message content: a string, or the `text` of its parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def estimate(chars: int, cfg: MockConfig) -> int:
    """Prompt tokens as OpenAI's limiter estimates them: from characters, not a tokenizer."""
    return math.ceil(chars / cfg.chars_per_token)


def _tier(tier: Any) -> str:
    if tier is None:
        return "default"
    if tier not in _TIERS:
        raise BadRequest(
            f"Invalid value for 'service_tier': expected one of {', '.join(_TIERS)}, got {tier!r}.",
            "service_tier",
            "invalid_value",
        )
    return _TIERS[tier]


def _job(endpoint: str, model: str, chars: int, cap: int | None, n: int, text: str, cfg: MockConfig) -> Job:
    prompt = estimate(chars, cfg)
    uncapped = cfg.uncapped_tokens or cfg.completion_tokens
    out = uncapped if cap is None else min(cap, cfg.completion_tokens)
    reserve = (uncapped if cap is None else cap) * n
    # OpenAI charges the full output cap of every choice up front.
    return Job(endpoint, model, prompt, out, n, cap, prompt + reserve, reserve, text.split()[:64])


def _check_window(job: Job, cfg: MockConfig, where: str) -> None:
    window = cfg.context_windows.get(job.model)
    if window is None:
        return
    wanted = job.prompt_tokens + (job.cap or 0)
    if wanted > window:
        _too_long(job, window, wanted, where)


def _too_long(job: Job, window: int, wanted: int, where: str) -> None:
    if where == "input":  # the Responses API words it differently
        raise BadRequest(
            "Your input exceeds the context window of this model. Please adjust your input and try again.",
            "input",
            "context_length_exceeded",
        )
    if job.cap is None:
        message = (
            f"This model's maximum context length is {window} tokens. However, your messages resulted in "
            f"{job.prompt_tokens} tokens. Please reduce the length of the messages."
        )
    else:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested {wanted} tokens "
            f"({job.prompt_tokens} in the messages, {job.cap} in the completion). Please reduce the length of "
            "the messages or completion."
        )
    raise BadRequest(message, "messages", "context_length_exceeded")


def _json_format(fmt: Any, param: str, job: Job) -> None:
    """Read a response format: {"type": "json_schema", ...} or {"type": "json_object"} (or text)."""
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise BadRequest(f"Invalid '{param}': expected an object.", param, "invalid_type")
    kind = fmt.get("type")
    if kind in (None, "text"):
        return
    if kind == "json_object":
        job.json_mode = True
        return
    if kind != "json_schema":
        raise BadRequest(
            f"Invalid value for '{param}.type': expected one of text, json_object, json_schema, got {kind!r}.",
            f"{param}.type",
            "invalid_value",
        )
    # Chat nests the schema under "json_schema"; the Responses API puts it in the format itself.
    spec = fmt.get("json_schema", fmt) if param == "response_format" else fmt
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        where = f"{param}.json_schema.name" if param == "response_format" else f"{param}.name"
        raise BadRequest(f"Missing required parameter: '{where}'.", where, "missing_required_parameter")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise BadRequest(f"Invalid '{param}' schema: expected an object.", param, "invalid_type")
    job.json_mode = True
    job.schema = schema
    job.schema_name = spec["name"]


def parse_chat(body: dict[str, Any], cfg: MockConfig) -> Job:
    """A chat completions request.

    Raises:
        BadRequest: as OpenAI answers 400 (missing fields, bad values, context window exceeded).
    """
    model = model_of(body)
    messages = body.get("messages")
    if messages is None:
        raise BadRequest("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("Invalid 'messages': expected a non-empty array.", "messages", "invalid_value")
    chars = 0
    text = ""
    for m in messages:
        if not isinstance(m, dict):
            raise BadRequest("Invalid 'messages': each message must be an object.", "messages", "invalid_type")
        text = _content_text(m.get("content"))
        chars += len(text)
    cap = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    n = _positive_int(body, "n") or 1
    job = _job("chat", model, chars, cap, n, text, cfg)
    # The common request has neither: skip the calls.
    if "service_tier" in body:
        job.tier = _tier(body["service_tier"])
    if "response_format" in body:
        _json_format(body["response_format"], "response_format", job)
    if body.get("stream"):
        job.stream = True
        opts = body.get("stream_options")
        job.include_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
    _check_window(job, cfg, "messages")
    return job


def parse_responses(body: dict[str, Any], cfg: MockConfig) -> Job:
    """A Responses API request (not streamed).

    Raises:
        BadRequest: as OpenAI answers 400.
    """
    model = model_of(body)
    if body.get("stream"):
        raise BadRequest("The mock server does not stream the Responses API.", "stream", "unsupported_value")
    inp = body.get("input")
    instructions = body.get("instructions")
    chars = len(instructions) if isinstance(instructions, str) else 0
    if isinstance(inp, str):
        text = inp
        chars += len(inp)
    elif isinstance(inp, list):
        text = ""
        for item in inp:
            if isinstance(item, dict):
                text = _content_text(item.get("content", item.get("output")))
                chars += len(text)
    elif inp is None:
        raise BadRequest("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    else:
        raise BadRequest("Invalid 'input': expected a string or an array.", "input", "invalid_type")
    job = _job("responses", model, chars, _positive_int(body, "max_output_tokens"), 1, text, cfg)
    if "service_tier" in body:
        job.tier = _tier(body["service_tier"])
    fmt = body.get("text")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise BadRequest("Invalid 'text': expected an object.", "text", "invalid_type")
        _json_format(fmt.get("format"), "text.format", job)
    _check_window(job, cfg, "input")
    return job


def embedding_inputs(body: dict[str, Any]) -> list[Any]:
    """The inputs of an embeddings body, each a string or a list of token ints.

    Raises:
        BadRequest: no input, or not one of OpenAI's four forms.
    """
    inputs = body.get("input")
    if inputs is None:
        raise BadRequest("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(inputs, str):
        if inputs:
            return [inputs]
    elif isinstance(inputs, list) and inputs:
        if all(isinstance(s, str) and s for s in inputs):
            return inputs
        if all(isinstance(t, int) and not isinstance(t, bool) for t in inputs):
            return [inputs]  # one input given as tokens
        if all(isinstance(s, list) and s and all(isinstance(t, int) and not isinstance(t, bool) for t in s)
               for s in inputs):
            return inputs
    raise BadRequest(_BAD_INPUT)


def parse_embeddings(body: dict[str, Any], cfg: MockConfig) -> Job:
    """An embeddings request, with OpenAI's limits on inputs and tokens.

    Raises:
        BadRequest: as OpenAI answers 400 (bad input, too many inputs, an input or the request too long).
    """
    model = model_of(body)
    inputs = embedding_inputs(body)
    if len(inputs) > cfg.embedding_max_inputs:
        raise BadRequest(_BAD_INPUT)
    total = 0
    for i, item in enumerate(inputs):
        tokens = estimate(len(item), cfg) if isinstance(item, str) else len(item)
        if tokens > cfg.embedding_input_limit:
            where = "input" if isinstance(body["input"], str) or len(inputs) == 1 else f"input[{i}]"
            raise BadRequest(f"Invalid '{where}': maximum input length is {cfg.embedding_input_limit} tokens.")
        total += tokens
    if total > cfg.embedding_request_limit:
        raise BadRequest(
            f"Requested {total} tokens, max {cfg.embedding_request_limit} tokens per request",
            None,
            "max_tokens_per_request",
            "max_tokens_per_request",
        )
    dims = body.get("dimensions")
    if dims is not None and (
        not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= _MAX_DIMENSIONS
    ):
        raise BadRequest(f"Invalid 'dimensions': expected an integer from 1 to {_MAX_DIMENSIONS}, got {dims!r}.",
                         "dimensions", "invalid_value")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise BadRequest(f"Invalid value for 'encoding_format': expected float or base64, got {fmt!r}.",
                         "encoding_format", "invalid_value")
    job = Job("embeddings", model, total, 0, len(inputs), None, total, 0, [])
    job.inputs = inputs
    job.dimensions = dims or EMBEDDING_DIM
    return job


def embedding_of(value: str | Sequence[int], dimensions: int = EMBEDDING_DIM) -> list[float]:
    """The unit vector the mock answers for one embeddings input: it depends only on the input.

    A client checks that each vector landed on the right line by comparing it with ``embedding_of(text)``
    (or ``embedding_of(tokens)`` for an input given as token ints). Like OpenAI's `dimensions`, a shorter
    vector is the longer one cut and normalised again. The values are float32 numbers, so the vector is the
    same whether it travels as JSON floats or as base64 (the openai SDK asks for base64 by default).
    """
    key = value.encode() if isinstance(value, str) else ("tokens:" + ",".join(map(str, value))).encode()
    rnd = random.Random(zlib.crc32(key))
    vec = [rnd.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    fmt = f"<{dimensions}f"
    return list(struct.unpack(fmt, struct.pack(fmt, *(v / norm for v in vec))))
