"""OpenAI-style chat messages -> an openai_harmony Conversation -> prompt token ids.

Mapping (what gpt-oss expects):
* The harmony system message carries the reasoning effort (and the model identity, knowledge cutoff, channels).
* OpenAI "system" and "developer" messages become the harmony developer message's instructions (in order, joined
  by blank lines, after `system_prompt` if given); function tools go into the same developer message.
* user -> user message. assistant -> [analysis (its `reasoning_content` or `reasoning`)] + [its `content`: final
  channel, or a commentary preamble when it also has tool calls] + one commentary message to `functions.NAME`
  per tool call (content type `<|constrain|>json`).
* tool -> a message from `functions.NAME` to assistant on the commentary channel; NAME is found from the assistant
  tool call whose id equals `tool_call_id` (a legacy `name` field is used when there is no `tool_call_id`).
* Analysis is dropped for assistant messages up to and including the last one that gave a final answer (content
  without tool calls); it is kept after it, i.e. inside an unfinished tool-call chain.

Malformed input raises GptOssError with a one-line message naming the field (the server answers 400).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    HarmonyError,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    Role,
    SystemContent,
    ToolDescription,
)

from gptoss.errors import GptOssError

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_ROLES = ("system", "developer", "user", "assistant", "tool")


def _text(value: Any, where: str, *, optional: bool = False) -> str:
    """Message content: a string or a list of {type: "text", text} parts (joined by newlines)."""
    if value is None and optional:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise GptOssError(f"{where}: expected a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict):
            raise GptOssError(f"{where}[{j}]: expected an object like {{\"type\": \"text\", \"text\": \"...\"}}")
        if part.get("type") not in _TEXT_PART_TYPES:
            raise GptOssError(f"{where}[{j}].type: unsupported content part type {part.get('type')!r} (only 'text')")
        if not isinstance(part.get("text"), str):
            raise GptOssError(f"{where}[{j}].text: expected a string")
        texts.append(part["text"])
    return "\n".join(texts)


def _effort(value: Any) -> ReasoningEffort:
    if isinstance(value, ReasoningEffort):
        return value
    if value is None:
        return ReasoningEffort.MEDIUM
    if isinstance(value, str) and value.strip().lower() in ("low", "medium", "high"):
        return ReasoningEffort(value.strip().capitalize())
    raise GptOssError(f"reasoning_effort: expected 'low', 'medium' or 'high', got {value!r}")


def _tool_descriptions(tools: Sequence[Any]) -> list[ToolDescription]:
    if not isinstance(tools, (list, tuple)):
        raise GptOssError(f"tools: expected a list, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise GptOssError(f"tools[{i}]: expected an object")
        if tool.get("type", "function") != "function":
            raise GptOssError(f"tools[{i}].type: unsupported tool type {tool.get('type')!r} (only 'function')")
        fn, where = (tool["function"], f"tools[{i}].function") if "function" in tool else (tool, f"tools[{i}]")
        if not isinstance(fn, dict):
            raise GptOssError(f"{where}: expected an object")
        name, description, parameters = fn.get("name"), fn.get("description") or "", fn.get("parameters")
        if not isinstance(name, str) or not name:
            raise GptOssError(f"{where}.name: expected a non-empty string")
        if not isinstance(description, str):
            raise GptOssError(f"{where}.description: expected a string")
        if parameters is not None and not isinstance(parameters, dict):
            raise GptOssError(f"{where}.parameters: expected a JSON schema object")
        out.append(ToolDescription.new(name, description, parameters))
    return out


def _tool_calls(msg: dict, where: str) -> list[tuple[str | None, str, str]]:
    """An assistant message's tool calls as (id, name, arguments json)."""
    calls = msg.get("tool_calls") or []
    if not isinstance(calls, list):
        raise GptOssError(f"{where}.tool_calls: expected a list")
    out = []
    for j, call in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise GptOssError(f"{w}: expected an object")
        if call.get("type", "function") != "function":
            raise GptOssError(f"{w}.type: unsupported tool call type {call.get('type')!r} (only 'function')")
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise GptOssError(f"{w}.function: expected an object with name and arguments")
        name, args, call_id = fn.get("name"), fn.get("arguments"), call.get("id")
        if not isinstance(name, str) or not name:
            raise GptOssError(f"{w}.function.name: expected a non-empty string")
        if args is None:
            args = "{}"
        elif isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        elif not isinstance(args, str):
            raise GptOssError(f"{w}.function.arguments: expected a JSON string")
        if call_id is not None and not isinstance(call_id, str):
            raise GptOssError(f"{w}.id: expected a string")
        out.append((call_id, name, args))
    return out


def _reasoning(msg: dict, where: str) -> str:
    key = "reasoning_content" if msg.get("reasoning_content") is not None else "reasoning"
    value = msg.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise GptOssError(f"{where}.{key}: expected a string")
    return value


def build_conversation(messages: Sequence[Any], *, tools: Sequence[Any] | None = None,
                       reasoning_effort: str | ReasoningEffort | None = "medium",
                       system_prompt: str | None = None, keep_last_turn_analysis: bool = False) -> Conversation:
    """Convert OpenAI-style chat messages (and function tools) into a harmony Conversation.

    system_prompt: extra developer instructions placed before those of the messages' system/developer entries.
    keep_last_turn_analysis: the trailing assistant messages (the turn a fine-tuning example trains) keep their
    analysis; the history rule applies to the messages before them.
    """
    if not isinstance(messages, (list, tuple)):
        raise GptOssError(f"messages: expected a list, got {type(messages).__name__}")
    effort = _effort(reasoning_effort)
    functions = _tool_descriptions(tools) if tools else []

    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise GptOssError(f"messages[{i}]: expected an object")
        if msg.get("role") not in _ROLES:
            raise GptOssError(f"messages[{i}].role: unknown role {msg.get('role')!r} "
                              f"(expected system, developer, user, assistant or tool)")

    # Analysis survives only after the last final answer (an unfinished tool-call chain).
    last_final = -1
    ruled = len(messages)
    while keep_last_turn_analysis and ruled > 0 and messages[ruled - 1]["role"] == "assistant":
        ruled -= 1
    for i, msg in enumerate(messages[:ruled]):
        if msg["role"] == "assistant" and not msg.get("tool_calls") and _text(
                msg.get("content"), f"messages[{i}].content", optional=True):
            last_final = i

    instructions = [system_prompt] if system_prompt else []
    body: list[Message] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        where, role = f"messages[{i}]", msg["role"]
        if role in ("system", "developer"):
            text = _text(msg.get("content"), f"{where}.content")
            if text:
                instructions.append(text)
        elif role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text(msg.get("content"), f"{where}.content")))
        elif role == "assistant":
            reasoning = _reasoning(msg, where)
            content = _text(msg.get("content"), f"{where}.content", optional=True)
            calls = _tool_calls(msg, where)
            if reasoning and i > last_final:
                body.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            if content:
                channel = "commentary" if calls else "final"
                body.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel))
            for call_id, name, args in calls:
                if call_id is not None:
                    call_names[call_id] = name
                body.append(Message.from_role_and_content(Role.ASSISTANT, args).with_channel("commentary")
                            .with_recipient(f"functions.{name}").with_content_type("<|constrain|>json"))
        else:  # tool
            call_id = msg.get("tool_call_id")
            if call_id is None and isinstance(msg.get("name"), str) and msg["name"]:
                name = msg["name"]
            elif not isinstance(call_id, str):
                raise GptOssError(f"{where}.tool_call_id: expected the id of an earlier assistant tool call")
            elif call_id not in call_names:
                raise GptOssError(f"{where}.tool_call_id: no earlier assistant tool call has id {call_id!r}")
            else:
                name = call_names[call_id]
            text = _text(msg.get("content"), f"{where}.content", optional=True)
            body.append(Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
                        .with_channel("commentary").with_recipient("assistant"))

    head = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))]
    if instructions or functions:
        developer = DeveloperContent.new()
        if instructions:
            developer = developer.with_instructions("\n\n".join(instructions))
        if functions:
            developer = developer.with_function_tools(functions)
        head.append(Message.from_role_and_content(Role.DEVELOPER, developer))
    return Conversation.from_messages(head + body)


def render_prompt(conversation: Conversation) -> list[int]:
    """Prompt token ids for the next assistant turn (ends with `<|start|>assistant`).

    Analysis is not dropped again here: build_conversation already applied the history rule.
    """
    return _render(lambda enc: enc.render_conversation_for_completion(
        conversation, Role.ASSISTANT, RenderConversationConfig(auto_drop_analysis=False)))


def render_for_training(conversation: Conversation) -> list[int]:
    """Token ids of a whole conversation whose last message is the assistant's (a fine-tuning example): as
    harmony renders it for training, the last message ending in `<|return|>` (or `<|call|>` for a tool call)."""
    return _render(lambda enc: enc.render_conversation_for_training(
        conversation, RenderConversationConfig(auto_drop_analysis=False)))


def _render(render) -> list[int]:
    from gptoss.tokenizer import get_harmony_encoding

    try:
        return list(render(get_harmony_encoding()))
    except HarmonyError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptOssError(f"messages: cannot render the conversation: {msg}") from e
