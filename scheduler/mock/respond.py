"""Small builders of HTTP answers shared by the mock's modules."""

from __future__ import annotations

import os
from typing import Any

import orjson
from aiohttp import web


def random_hex(digits: int) -> str:
    """`digits` random hex digits (`digits` even)."""
    return os.urandom(digits // 2).hex()


def request_id() -> str:
    """An OpenAI-style request id ("req_" and 32 hex digits)."""
    return "req_" + random_hex(32)


def json_response(obj: Any, status: int, headers: dict[str, str]) -> web.Response:
    """`obj` as a JSON answer."""
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def error_response(
    status: int, message: str, type_: str | None, param: str | None, code: Any, headers: dict[str, str]
) -> web.Response:
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return json_response(body, status, headers)


def invalid_key(headers: dict[str, str]) -> web.Response:
    """The 401 of a refused key. Never echoes the key back: the body may end up in logs."""
    message = "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
    return error_response(401, message, "invalid_request_error", None, "invalid_api_key", headers)


def ok(obj: Any) -> web.Response:
    return json_response(obj, 200, {"x-request-id": request_id()})


def bad_request(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return error_response(400, message, "invalid_request_error", param, code, {"x-request-id": request_id()})


def cursor_page(items: list[dict[str, Any]], query: Any, *, default_limit: int, max_limit: int) -> web.Response:
    """One cursor page: the items after the ``after`` id, at most ``limit`` of them."""
    try:
        limit = int(query.get("limit", default_limit))
    except ValueError:
        limit = -1
    if not 1 <= limit <= max_limit:
        return bad_request(f"Invalid 'limit': expected an integer between 1 and {max_limit}.", "limit", "invalid_value")
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    data = items[:limit]
    return ok({
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(items) > limit,
    })
