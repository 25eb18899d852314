"""Responses API input items -> OpenAI chat messages, the common input of prompting.prepare_prompt.

Assistant-side items in the order the model produces them (reasoning, output message, function calls) merge into one
assistant message; a stored response's items come first (previous_response_id).
"""

from __future__ import annotations

import json
from typing import Any

from gptoss.server.errors import APIError


def _part_text(content: Any, where: str) -> str:
    """A content field (a string or a list of text parts) -> its text; where names it in errors."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: expected a string or a list of content parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or part.get("type") not in (
                "input_text", "output_text", "text", "reasoning_text", "summary_text"):
            raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"input_text\", \"text\": ...}}) are "
                           "supported", param=f"{where}[{j}]")
        texts.append(part["text"])
    return "\n".join(texts)


def items_to_messages(history: list[dict], items: list[dict]) -> list[dict]:
    """Responses input items (after the stored ones) -> OpenAI chat messages for build_conversation."""
    messages: list[dict] = []
    current: dict | None = None  # the assistant message being assembled

    def flush():
        nonlocal current
        if current is not None:
            messages.append(current)
            current = None

    call_ids: set[str] = set()  # of the function_call items so far: what a function_call_output may answer
    n_hist = len(history)
    for k, item in enumerate(history + items):
        where = f"input[{k - n_hist}]" if k >= n_hist else f"previous_response[{k}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an object", param=where)
        typ = item.get("type", "message")
        if typ == "message":
            role = item.get("role")
            text = _part_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                if current is None or current.get("content") or current.get("tool_calls"):
                    flush()
                    current = {"role": "assistant"}
                current["content"] = text
            elif role in ("user", "system", "developer"):
                flush()
                messages.append({"role": role, "content": text})
            else:
                raise APIError(400, f"{where}.role: expected user, assistant, system or developer, got {role!r}",
                               param=f"{where}.role")
        elif typ == "reasoning":
            text = _part_text(item.get("content"), f"{where}.content") or _part_text(
                item.get("summary"), f"{where}.summary")
            if current is not None and (current.get("content") or current.get("tool_calls")
                                        or current.get("reasoning_content")):
                flush()
            current = current or {"role": "assistant"}
            current["reasoning_content"] = text
        elif typ == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise APIError(400, f"{where}.{key}: expected a string", param=f"{where}.{key}")
            call_ids.add(item["call_id"])
            if current is None:
                current = {"role": "assistant"}
            current.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif typ == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise APIError(400, f"{where}.call_id: expected a string", param=f"{where}.call_id")
            if item["call_id"] not in call_ids:
                raise APIError(400, f"{where}.call_id: no earlier function_call item has call_id {item['call_id']!r}",
                               param=f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str):
                output = _part_text(output, f"{where}.output") if isinstance(output, list) else json.dumps(output)
            flush()
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise APIError(400, f"{where}.type: unsupported item type {typ!r} (message, reasoning, function_call, "
                           "function_call_output)", param=f"{where}.type")
    flush()
    return messages
