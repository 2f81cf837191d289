"""Anthropic's Messages API: `/v1/messages` and `/v1/messages/count_tokens` (errors in Anthropic's
envelope: see errors.py, `protocol_for_path`)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from jamba_server.anthropic_protocol import AnthropicErrorResponse, CountTokensRequest, CountTokensResponse, MessagesRequest, MessagesResponse
from jamba_server.core.anthropic import prepare_count_tokens, prepare_messages
from jamba_server.http.pipeline import begin_generation, prepare_job, run_job, server_of
from jamba_server.http.routes import STREAMING_OK

router = APIRouter()
ERRORS = {status: {"model": AnthropicErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503, 504)}


@router.post("/v1/messages", response_model=MessagesResponse, responses={**STREAMING_OK, **ERRORS})
async def messages(body: MessagesRequest, request: Request):
    server = server_of(request)
    begin_generation(request, server, body.model)
    job = await prepare_job(request, prepare_messages, body, server.engine, server.settings, server.chat_template)
    return await run_job(request, server, job)


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse, responses=ERRORS)
async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    """The prompt tokens a Messages request would use, through the same checks and rendering."""
    server = server_of(request)
    server.check_model(body.model)
    server.readiness.check()
    prompt = await prepare_job(request, prepare_count_tokens, body, server.engine, server.settings, server.chat_template)
    return CountTokensResponse(input_tokens=len(prompt.token_ids))
