"""OpenAI's Responses API: create (streaming or not), retrieve and delete stored responses."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from jamba_server.core.responses_api import prepare_responses
from jamba_server.errors import NotFoundError
from jamba_server.http.pipeline import begin_generation, prepare_job, run_job, server_of
from jamba_server.http.routes import ERRORS, STREAMING_OK
from jamba_server.responses_protocol import DeletedResponse, ResponseObject, ResponsesRequest

router = APIRouter()


@router.post("/v1/responses", response_model=ResponseObject, responses={**STREAMING_OK, **ERRORS})
async def create_response(body: ResponsesRequest, request: Request):
    server = server_of(request)
    begin_generation(request, server, body.model)
    job = await prepare_job(request, prepare_responses, body, server.engine, server.settings, server.chat_template, server.responses)
    return await run_job(request, server, job)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=ERRORS)
async def retrieve_response(response_id: str, request: Request) -> Response:
    stored = server_of(request).responses.get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return Response(stored.response, media_type="application/json")


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=ERRORS)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not server_of(request).responses.delete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(
        f"Response `{response_id[:128]}` was not found (never stored, expired or evicted; stored per server process).",
        param="response_id",
        code="response_not_found",
    )
