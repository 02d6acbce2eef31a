"""``scheduler run --endpoints FILE``: several keys, deployments or servers as one pool, read from a TOML file.

::

    [[endpoint]]
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_KEY_PROJECT_A"   # the name of an environment variable, never a key
    rpm = 5000                              # optional: learned from the headers when left out
    tpm = 4000000
    models = ["gpt-4o-mini", "gpt-4o"]      # optional: what this endpoint serves; default all
    weight = 1.0                            # optional: its share when several endpoints can take a job
    dialect = "azure"                       # optional: how to read its headers; default recognised from them
    name = "project-a"                      # optional: its name in output lines, logs and metrics

    [endpoint.model_limits]                 # optional: limits of particular models on this endpoint
    "gpt-4o" = { rpm = 500, tpm = 30000 }

Every field is checked before anything is sent; an error names the file, the endpoint (counted from 1) and the
field. A file holding something that looks like an API key is refused: keys live in the environment, and the
file names the variable (``api_key_env``), so the file can be committed and shared.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dialects import DIALECTS, Dialect
from ..endpoints import Endpoint
from ..limits import Limits
from ..logs import register_secret
from .options import NO_KEY, UsageError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

    from ..transport import Transport

__all__ = ["EndpointEntry", "EndpointsFileError", "build_endpoints", "read_endpoints"]

_FIELDS = ("base_url", "api_key_env", "rpm", "tpm", "itpm", "otpm", "models", "weight", "dialect", "name",
           "model_limits")
_LIMITS = ("rpm", "tpm", "itpm", "otpm")
#: field names that would hold a key itself
_KEY_FIELDS = frozenset({"api_key", "apikey", "key", "secret", "token", "authorization", "password"})
# OpenAI (sk-..., sk-proj-...) and Anthropic (sk-ant-...) keys, bearer tokens, Google's AIza... keys.
_KEY_SHAPE = re.compile(r"(?:^|[^A-Za-z0-9])(?:sk-[A-Za-z0-9_\-]{8,}|Bearer\s+\S{8,}|AIza[0-9A-Za-z_\-]{30,})")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_USE_ENV = ("never put a key in this file: put it in an environment variable and give that variable's name as "
            "api_key_env (e.g. api_key_env = \"OPENAI_KEY_PROJECT_A\")")


class EndpointsFileError(UsageError):
    """The endpoints file cannot be used (the run exits 2, nothing sent); the message names file, endpoint, field."""


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    """One ``[[endpoint]]`` of the file, checked, with its key read from the environment."""

    base_url: str | None
    #: the environment variable the key came from (None: a server that needs no key)
    api_key_env: str | None
    limits: Limits | None
    model_limits: Mapping[str, Limits]
    models: tuple[str, ...] | None
    weight: float
    dialect: Dialect | None
    name: str | None
    #: the key itself: never shown (not in repr), registered for redaction when read
    key: str = field(repr=False, default=NO_KEY)


def read_endpoints(
    path: Path, *, environ: Mapping[str, str] | None = None, reserve: Mapping[int, float] | None = None
) -> list[EndpointEntry]:
    """Read and check an endpoints file; the keys come from the environment variables it names.

    Args:
        path: the TOML file.
        environ: where the keys are read (default: ``os.environ``).
        reserve: capacity held for urgent work, added to every endpoint's limits (``--reserve``).

    Raises:
        EndpointsFileError: the file cannot be read, is not TOML, holds a key, or a field is wrong (the message
            names the file, the endpoint and the field); an environment variable it names is not set.
    """
    env = os.environ if environ is None else environ
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise EndpointsFileError(f"cannot read the endpoints file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EndpointsFileError(f"{path} is not valid TOML: {exc}") from None
    _refuse_keys(path, document, ())
    unknown = sorted(set(document) - {"endpoint"})
    if unknown:
        raise EndpointsFileError(f"{path}: unknown top-level key(s) {', '.join(map(repr, unknown))}: the file holds "
                                 "[[endpoint]] tables only")
    tables = document.get("endpoint")
    if not isinstance(tables, list) or not tables:
        raise EndpointsFileError(f"{path} names no endpoint: give one [[endpoint]] table per key, deployment or "
                                 "server (see the module's docstring or the README, \"Endpoints\")")
    entries = [_entry(_Where(path, index), table, env, reserve or {}) for index, table in enumerate(tables, 1)]
    _check_distinct(path, entries)
    return entries


@dataclass(frozen=True, slots=True)
class _Where:
    path: Path
    index: int

    def error(self, name: str, problem: str) -> EndpointsFileError:
        return EndpointsFileError(f"{self.path}: [[endpoint]] {self.index}: {name}: {problem}")


def _refuse_keys(path: Path, value: Any, trail: tuple[str | int, ...]) -> None:
    """Refuse any field named like a key and any string shaped like one, wherever it is (without echoing it)."""
    if isinstance(value, dict):
        for name, item in value.items():
            if str(name).lower().replace("-", "_") in _KEY_FIELDS:
                raise EndpointsFileError(f"{path}: {_place(trail)}the field {name!r} would hold an API key: "
                                         f"{_USE_ENV}")
            _refuse_keys(path, item, (*trail, name))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _refuse_keys(path, item, (*trail, position))
    elif isinstance(value, str) and _looks_like_key(value, trail):
        raise EndpointsFileError(f"{path}: {_place(trail)}the field {_field_name(trail)!r} holds something that "
                                 f"looks like an API key: {_USE_ENV}")


def _looks_like_key(text: str, trail: tuple[str | int, ...]) -> bool:
    if _KEY_SHAPE.search(text):
        return True
    # A key pasted where its variable's name belongs: long, mixed letters and digits, no word breaks.
    return (bool(trail) and trail[-1] == "api_key_env" and len(text) >= 24 and "_" not in text
            and any(c.isdigit() for c in text) and any(c.islower() for c in text))


def _place(trail: tuple[str | int, ...]) -> str:
    if len(trail) >= 2 and trail[0] == "endpoint" and isinstance(trail[1], int):
        return f"[[endpoint]] {trail[1] + 1}: "
    return ""


def _field_name(trail: tuple[str | int, ...]) -> str:
    names = [str(part) for part in trail if isinstance(part, str)]
    return ".".join(names[1:] if names[:1] == ["endpoint"] else names) or "?"


def _entry(where: _Where, table: Any, env: Mapping[str, str], reserve: Mapping[int, float]) -> EndpointEntry:
    if not isinstance(table, dict):
        raise EndpointsFileError(f"{where.path}: [[endpoint]] {where.index} is not a table")
    unknown = sorted(set(table) - set(_FIELDS))
    if unknown:
        raise where.error(unknown[0], f"unknown field; the fields are {', '.join(_FIELDS)}")
    base_url = table.get("base_url")
    if base_url is not None and (not isinstance(base_url, str) or not re.match(r"https?://[^/\s]+", base_url)):
        raise where.error("base_url", f"must be an http:// or https:// URL, got {base_url!r}")
    key_env = table.get("api_key_env")
    key = NO_KEY
    if key_env is not None:
        if not isinstance(key_env, str) or not _ENV_NAME.fullmatch(key_env):
            raise where.error("api_key_env", f"must be the name of an environment variable, got {key_env!r}")
        key = env.get(key_env, "")
        if not key:
            raise where.error("api_key_env", f"the environment variable {key_env} is not set (or empty): set it to "
                              "this endpoint's API key")
        register_secret(key)
    elif base_url is None:
        raise where.error("api_key_env", "required for OpenAI's API (no base_url given): name the environment "
                          "variable that holds the key")
    limits = _limits(where, table, "", reserve)
    model_limits = _model_limits(where, table.get("model_limits"), reserve)
    models = table.get("models")
    if models is not None:
        if (not isinstance(models, list) or not models
                or not all(isinstance(model, str) and model.strip() for model in models)):
            raise where.error("models", f"must be a non-empty list of model names, got {models!r}")
        models = tuple(models)
    weight = table.get("weight", 1.0)
    if (not isinstance(weight, int | float) or isinstance(weight, bool) or not math.isfinite(weight)
            or not weight > 0):
        raise where.error("weight", f"must be a positive number, got {weight!r}")
    dialect = table.get("dialect")
    if dialect is not None and dialect not in DIALECTS:
        raise where.error("dialect", f"must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    name = table.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise where.error("name", f"must be a non-empty string, got {name!r}")
    return EndpointEntry(base_url, key_env, limits, model_limits, models, float(weight), dialect, name, key)


def _limits(where: _Where, table: Mapping[str, Any], prefix: str, reserve: Mapping[int, float]) -> Limits | None:
    values: dict[str, int] = {}
    for name in _LIMITS:
        value = table.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise where.error(prefix + name, f"must be a positive integer (per minute), got {value!r}")
        values[name] = value
    if not values:
        return None
    return Limits(rpm=values.get("rpm"), tpm=values.get("tpm"), itpm=values.get("itpm"), otpm=values.get("otpm"),
                  reserve=dict(reserve))


def _model_limits(where: _Where, value: Any, reserve: Mapping[int, float]) -> dict[str, Limits]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error("model_limits", 'must be a table of models, e.g. "gpt-4o" = { rpm = 500, tpm = 30000 }')
    out: dict[str, Limits] = {}
    for model, limits in value.items():
        prefix = f"model_limits.{model}."
        if not isinstance(limits, dict):
            raise where.error(f"model_limits.{model}", f"must be a table like {{ rpm = 500, tpm = 30000 }}, got "
                              f"{limits!r}")
        unknown = sorted(set(limits) - set(_LIMITS))
        if unknown:
            raise where.error(prefix + unknown[0], f"unknown field; a model's limits are {', '.join(_LIMITS)}")
        found = _limits(where, limits, prefix, reserve)
        if found is None:
            raise where.error(f"model_limits.{model}", "gives no limit")
        out[model] = found
    return out


def _check_distinct(path: Path, entries: Sequence[EndpointEntry]) -> None:
    seen_names: dict[str, int] = {}
    seen_keys: dict[tuple[str | None, str], int] = {}
    for index, entry in enumerate(entries, 1):
        if entry.name is not None:
            if entry.name in seen_names:
                raise EndpointsFileError(f"{path}: [[endpoint]] {index}: name: {entry.name!r} is the name of "
                                         f"[[endpoint]] {seen_names[entry.name]} too; names must differ")
            seen_names[entry.name] = index
        identity = (entry.base_url, entry.key)
        if identity in seen_keys and entry.key != NO_KEY:
            raise EndpointsFileError(
                f"{path}: [[endpoint]] {index}: api_key_env: the same key at the same base_url as [[endpoint]] "
                f"{seen_keys[identity]}: one key's limits are one budget; list it once (with every model it serves)")
        seen_keys.setdefault(identity, index)


def build_endpoints(
    entries: Sequence[EndpointEntry], make_client: Callable[..., AsyncOpenAI],
    wrap: Callable[[Transport], Transport] | None = None,
) -> list[Endpoint]:
    """The pool's endpoints: a client for each entry (``make_client(api_key=..., base_url=...)``), its transport
    wrapped by ``wrap(transport)`` if given (the CLI notes its first send there)."""
    from ..transport import OpenAITransport

    endpoints = []
    for entry in entries:
        client = make_client(api_key=entry.key, base_url=entry.base_url)
        transport: Transport = OpenAITransport(client)
        if wrap is not None:
            transport = wrap(transport)
        endpoints.append(Endpoint(client=client, limits=entry.limits, model_limits=entry.model_limits or None,
                                  models=entry.models, weight=entry.weight, dialect=entry.dialect, name=entry.name,
                                  transport=transport))
    return endpoints
