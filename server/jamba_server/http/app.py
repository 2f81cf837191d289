"""The FastAPI app: one `Server` (runtime/server.py), the request middleware, the error handlers and
one router per protocol. Everything a request does lives in those modules; this file wires them."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from jamba_server import __version__
from jamba_server.core.tenancy import cache_tenants
from jamba_server.http.auth import ApiKeyChecker
from jamba_server.http.errors import register_error_handlers
from jamba_server.http.middleware import RequestContextMiddleware
from jamba_server.http.routes import anthropic, openai, responses, service
from jamba_server.metrics import track_admission
from jamba_server.runtime.backend import Engine
from jamba_server.runtime.server import Server
from jamba_server.runtime.vllm_engine import VLLM_VERSION
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)
_REQUESTS_NAMING_THE_MODEL = (
    "ChatCompletionRequest", "CompletionRequest", "TokenizeRequest", "ResponsesRequest", "MessagesRequest",
    "CountTokensRequest", "DetokenizeRequest",
)  # fmt: skip


def create_app(settings: Settings, engine: Engine, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    server = Server(settings, engine, engine_version=VLLM_VERSION)
    server.admission.on_change = track_admission(lambda: server.admission.running, lambda: server.admission.queued)

    def fatal(reason: str) -> None:
        logger.error("fatal: %s", reason)
        if on_fatal is not None:
            on_fatal(reason)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(server.run_engine(fatal))
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(
        title="jamba-server",
        version=__version__,
        description="OpenAI-compatible API for AI21 Jamba 1.5 models, served by vLLM.",
        lifespan=lifespan,
    )
    app.state.server = server
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        auth=ApiKeyChecker(settings.api_keys, settings.metrics_require_auth),
        tenants=cache_tenants(settings.api_keys, settings.prefix_cache_isolation, settings.prefix_cache_groups),
    )
    register_error_handlers(app)
    for routes in (openai, responses, anthropic, service):
        app.include_router(routes.router)
    app.openapi = lambda: _openapi(app, server)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, server: Server) -> dict[str, Any]:
    """FastAPI's document, with `model` narrowed to the names this server accepts."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for name in _REQUESTS_NAMING_THE_MODEL:
            model_field = schema["components"]["schemas"][name]["properties"]["model"]
            model_field.pop("anyOf", None)
            model_field.update({"type": "string", "enum": sorted(server.model_aliases)})
        app.openapi_schema = schema
    return app.openapi_schema
