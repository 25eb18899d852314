"""Request bodies of /v1/chat/completions and /v1/responses: pydantic models, JSON parsing and tool checks.

Unknown fields are ignored (clients send many OpenAI options we do not implement); wrong types (strictly: "5"
is not an integer, nor 1 a boolean, as OpenAI's API has it) or out-of-range values are 400s naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptoss.server.errors import APIError, validation_error

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")

# Sampling options shared by both endpoints (same names and ranges as OpenAI's).
Temperature = Annotated[float | None, Field(ge=0, le=2)]
TopP = Annotated[float | None, Field(ge=0, le=1)]
TopK = Annotated[int | None, Field(ge=0)]
Seed = Annotated[int | None, Field(ge=-(2 ** 63), lt=2 ** 64)]
MaxTokens = Annotated[int | None, Field(ge=1)]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]


class _IgnoreExtra(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


# --- /v1/chat/completions -------------------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # passed on to build_conversation as a dict, extras included
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(_IgnoreExtra):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_IgnoreExtra):
    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(_IgnoreExtra):
    name: str


class ChatNamedToolChoice(_IgnoreExtra):
    type: Literal["function"]
    function: _NamedFunction


class StreamOptions(_IgnoreExtra):
    include_usage: bool = False


class ChatCompletionRequest(_IgnoreExtra):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ChatNamedToolChoice | None = None
    reasoning_effort: ReasoningEffort | None = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    stop: str | list[str] | None = None
    seed: Seed = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)


# --- /v1/responses ----------------------------------------------------------------------------------------------------


class ResponsesTool(_IgnoreExtra):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesNamedToolChoice(_IgnoreExtra):
    type: Literal["function"]
    name: str


class ReasoningOptions(_IgnoreExtra):
    effort: ReasoningEffort | None = None
    summary: str | None = None


class ResponsesRequest(_IgnoreExtra):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | ResponsesNamedToolChoice | None = None
    reasoning: ReasoningOptions | None = None
    max_output_tokens: MaxTokens = None
    temperature: Temperature = None
    top_p: TopP = None
    top_k: TopK = None
    seed: Seed = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None


# --- parsing ------------------------------------------------------------------------------------------------------------


async def parse_request(request: Request, model: type[BaseModel], served_model: str):
    """The request body validated as `model`; a 404 unless it asks for the model this server serves."""
    body = await request.body()
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None
    if req.model != served_model:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {served_model!r}",
                       param="model", code="model_not_found")
    return req


# --- tool definitions -------------------------------------------------------------------------------------------------


def _check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """A light JSON-schema sanity check (harmony renders almost anything; malformed schemas are client bugs)."""
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}: expected a JSON schema object", param=where)
    if depth > 32:
        raise APIError(400, f"{where}: schema nested too deeply", param=where)
    typ = schema.get("type")
    if typ is not None and not isinstance(typ, str) and not (
            isinstance(typ, list) and all(isinstance(t, str) for t in typ)):
        raise APIError(400, f"{where}.type: expected a string or a list of strings", param=f"{where}.type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise APIError(400, f"{where}.properties: expected an object", param=f"{where}.properties")
        for key, sub in props.items():
            _check_schema(sub, f"{where}.properties.{key}", depth + 1)
    req = schema.get("required")
    if req is not None and not (isinstance(req, list) and all(isinstance(r, str) for r in req)):
        raise APIError(400, f"{where}.required: expected a list of strings", param=f"{where}.required")
    items = schema.get("items")
    if items is not None and not isinstance(items, (dict, bool)):
        raise APIError(400, f"{where}.items: expected a schema object", param=f"{where}.items")
    if isinstance(items, dict):
        _check_schema(items, f"{where}.items", depth + 1)
    enum = schema.get("enum")
    if enum is not None and not isinstance(enum, list):
        raise APIError(400, f"{where}.enum: expected a list", param=f"{where}.enum")


def check_tools(tools: list[dict], prefix: str) -> None:
    """tools: [{"name", "description", "parameters"}] (flattened); prefix: how the request names tools[i]."""
    seen = set()
    for i, fn in enumerate(tools):
        where = prefix.format(i=i)
        if not _TOOL_NAME.match(fn["name"]):
            raise APIError(400, f"{where}.name: {fn['name']!r} must be 1-64 letters, digits, '_' or '-'",
                           param=f"{where}.name")
        if fn["name"] in seen:
            raise APIError(400, f"{where}.name: duplicate tool name {fn['name']!r}", param=f"{where}.name")
        seen.add(fn["name"])
        if fn.get("parameters") is not None:
            _check_schema(fn["parameters"], f"{where}.parameters")
