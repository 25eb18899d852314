"""The FastAPI app: routes, API-key auth and the exception handlers that turn every failure into an OpenAI error."""

from __future__ import annotations

import logging
import secrets

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss.errors import ContextLengthError, GptOssError
from gptoss.server.chat_completions import create_chat_completion
from gptoss.server.errors import APIError, error_response, validation_error
from gptoss.server.request_models import ChatCompletionRequest, ResponsesRequest, parse_request
from gptoss.server.responses import create_response
from gptoss.server.state import ServerState

log = logging.getLogger(__name__)


def check_auth(request: Request, api_key: str | None) -> None:
    """With an API key set, requests need `Authorization: Bearer <api_key>`."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken must not tell how much of the key was right
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       code="invalid_api_key")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers)

    @app.exception_handler(GptOssError)
    async def _gptoss_error(request: Request, exc: GptOssError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return error_response(400, str(exc), code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = validation_error(list(exc.errors()))
        return error_response(400, err.message, param=err.param, code=err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error")


def create_app(engine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the model id `model_name`; with api_key, /v1/* needs
    `Authorization: Bearer <api_key>` (/health stays open for probes)."""
    server = ServerState(engine, model_name, api_key)
    app = FastAPI(title="gptoss", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gptoss = server
    _add_error_handlers(app)

    async def authorized_body(request: Request, model: type[BaseModel]):
        check_auth(request, server.api_key)  # before reading the body: no work for unauthenticated clients
        return await parse_request(request, model, server.model_name)

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "gptoss"}

    @app.get("/health")
    async def health():
        try:
            stats = server.engine.stats()
        except Exception as e:  # never fail the probe on a stats bug
            stats = {"error": f"{type(e).__name__}: {e}"}
        return {"status": "ok", "model": server.model_name, "engine": stats}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request, server.api_key)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request, server.api_key)
        if model_id != server.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(server, request, await authorized_body(request, ChatCompletionRequest))

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await create_response(server, request, await authorized_body(request, ResponsesRequest))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        check_auth(request, server.api_key)
        stored = server.responses.get(response_id)
        if stored is None:
            raise APIError(404, f"response {response_id!r} not found", param="response_id", code="not_found")
        return stored["response"]

    return app
