"""OpenAI-style errors: the {"error": {"message", "type", "param", "code"}} body and the exception that carries it.

Client mistakes are 4xx, never 500: handlers raise APIError and the app's exception handler renders it.
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An error the client should see as-is: HTTP status plus the fields of OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def client_disconnected_response() -> JSONResponse:
    # 499 (nginx's "client closed request"): nobody reads it, but it keeps access logs honest.
    return error_response(499, "client disconnected")


# What pydantic puts in an error's location after a union field: the member it tried ("str", "list[...]",
# "literal['auto',...]", "ChatNamedToolChoice"), which is not part of the client's field name.
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[\]'(]|^[A-Z]")


def _loc_to_param(loc) -> str | None:
    """A pydantic error location ("body", "messages", 0, "role") -> the OpenAI param name ("messages[0].role")."""
    out = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and _UNION_MEMBER.search(part)):
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's error list -> one 400 APIError naming the most specific offending field."""
    if not errors:
        return APIError(400, "invalid request body")
    # the deepest location: of a union's members, the one that matched the input's shape got furthest
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    param = _loc_to_param(err.get("loc", ()))
    # A union (e.g. str | list) reports one error per member: name the field once.
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        msg = "required field is missing"
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)
