"""Service endpoints: tokenize and detokenize, health and readiness probes, version, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from jamba_server import __version__
from jamba_server.core.prepare import prepare_detokenize, prepare_tokenize
from jamba_server.errors import ServiceUnavailableError
from jamba_server.http.pipeline import prepare_job, server_of
from jamba_server.http.routes import ERRORS
from jamba_server.metrics import exposition_registry
from jamba_server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    """The prompt a request would get, through the same checks and rendering as generation."""
    server = server_of(request)
    server.check_model(body.model)
    server.readiness.check()
    server.admission.check_open()
    prompt = await prepare_job(request, prepare_tokenize, body, server.engine, server.settings, server.chat_template)
    return TokenizeResponse(
        tokens=prompt.token_ids,
        count=len(prompt.token_ids),
        max_model_len=server.engine.max_model_len,
        prompt=prompt.text,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    """The text of token ids, as the model's tokenizer decodes them (special tokens included)."""
    server = server_of(request)
    server.check_model(body.model)
    server.readiness.check()
    return DetokenizeResponse(prompt=await prepare_job(request, prepare_detokenize, body, server.engine))


@router.get("/health", responses=ERRORS)
async def health(request: Request) -> dict[str, str]:
    if not server_of(request).readiness.healthy:
        raise ServiceUnavailableError("The engine has failed.")
    return {"status": "ok"}


@router.get("/ready", responses=ERRORS)
async def ready(request: Request) -> dict[str, str]:
    server_of(request).readiness.check()
    return {"status": "ready"}


@router.get("/version", responses=ERRORS)
async def version(request: Request) -> dict[str, str]:
    return {"version": __version__, "vllm_version": server_of(request).engine_version}


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    return Response(generate_latest(exposition_registry()), media_type=CONTENT_TYPE_LATEST)
