"""OpenAI's Chat Completions, Completions and Models endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Request

from jamba_server.core.prepare import prepare_chat, prepare_completion
from jamba_server.http.pipeline import begin_generation, prepare_job, run_job, server_of
from jamba_server.http.routes import ERRORS, STREAMING_OK
from jamba_server.protocol import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ModelCard, ModelList

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={**STREAMING_OK, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    server = server_of(request)
    begin_generation(request, server, body.model)
    job = await prepare_job(request, prepare_chat, body, server.engine, server.settings, server.chat_template)
    return await run_job(request, server, job)


@router.post("/v1/completions", response_model=Completion, responses={**STREAMING_OK, **ERRORS})
async def completions(body: CompletionRequest, request: Request):
    server = server_of(request)
    begin_generation(request, server, body.model)
    job = await prepare_job(request, prepare_completion, body, server.engine, server.settings)
    return await run_job(request, server, job)


@router.get("/v1/models", response_model=ModelList, responses=ERRORS)
async def models(request: Request) -> ModelList:
    server = server_of(request)
    return ModelList(data=[ModelCard(id=server.model_name, max_model_len=server.engine.max_model_len or None)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
async def model(model_id: str, request: Request) -> ModelCard:
    server = server_of(request)
    server.check_model(model_id)
    return ModelCard(id=server.model_name, max_model_len=server.engine.max_model_len or None)
