"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/responses, /v1/models, /health.

    app = create_app(engine, "gpt-oss-20b", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Per request: the request body is validated (request_models), its messages or input items (response_items) become
a harmony prompt plus an optional tool_choice prefill (prompting), and one AssistantTurn (turn) generates and
parses the reply, which chat_completions / responses (with response_builder) render as OpenAI objects or SSE
streams (sse). Errors are OpenAI-style (errors); client mistakes are 4xx, never 500, and malformed model output
never fails a request. A client that disconnects mid-stream or mid-request closes the engine's generator, which
cancels the request and frees its KV blocks (disconnects). app wires routes, auth and error handlers; serve is
the `gptoss serve` command.
"""

from gptoss.server.app import create_app
from gptoss.server.serve import cmd_serve

__all__ = ["create_app", "cmd_serve"]
