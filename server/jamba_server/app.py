"""HTTP layer: thin FastAPI routes over the core, the admission controller and the engine adapter.
Typed errors are mapped to OpenAI's envelope once, here."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from jamba_server import __version__
from jamba_server.admission import check_chat_input_limits
from jamba_server.auth import ApiKeyChecker
from jamba_server.core import prompt as prompts
from jamba_server.core.features import plan_chat
from jamba_server.engine import VLLM_VERSION, EngineAdapter
from jamba_server.errors import (
    APIError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from jamba_server.lifecycle import ServerState
from jamba_server.metrics import BUILD_INFO, GenerationMetrics, record_outcome, record_rejection, track_admission
from jamba_server.middleware import RequestContextMiddleware, request_info
from jamba_server.prepare import GenerationJob, prepare_chat, prepare_completion
from jamba_server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)

ENGINE_DEATH_EXIT_DELAY_S = 2.0
# Requests larger than this (body bytes; for /tokenize, rendered characters) are prepared off the event loop.
_INLINE_PROMPT_CHARS = 16_384
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 499, 500, 503, 504)
}
_STREAMING_OK: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}}}}



def _param_path(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p != "body"]
    if not parts or not isinstance(parts[0], str):
        return None
    path = parts[0]
    for part in parts[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {first.get('msg')}")
    param = _param_path(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status_code, headers=error.headers)


def _body_size(request: Request) -> int:
    """The request body's size, as a measure of the work preparing it takes (no length: assume large)."""
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else _INLINE_PROMPT_CHARS + 1


async def _off_loop_if_large(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if size > _INLINE_PROMPT_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def freeze_startup_heap() -> None:
    """Take everything alive once the engine is up (torch, transformers, the tokenizer, vLLM's
    client) out of the garbage collector's reach, as vLLM's own server does. Without this, each
    full collection walks that heap with the event loop stopped: 250-420 ms pauses were seen on
    the dev model, stalling every stream and every arrival behind them."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings,
    adapter: EngineAdapter,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    state = ServerState(settings, adapter)
    track_admission(lambda: state.admission.running, lambda: state.admission.queued)

    def fatal(reason: str) -> None:
        logger.error("fatal: %s", reason)
        if on_fatal is not None:
            on_fatal(reason)

    async def start_engine() -> None:
        try:
            await asyncio.to_thread(adapter.start)
            freeze_startup_heap()
        except BaseException as exc:  # noqa: BLE001 - any start failure ends the process
            state.start_error = exc
            logger.exception("engine failed to start")
            fatal(f"engine failed to start: {exc}")
            return
        state.engine_started()
        BUILD_INFO.labels(
            __version__,
            VLLM_VERSION,
            state.model_name,
            str(settings.tensor_parallel_size),
            settings.quantization or "none",
        ).set(1)
        logger.info("engine ready: %s (max_model_len=%d)", state.model_name, adapter.max_model_len)
        while True:
            await asyncio.sleep(0.5)
            if adapter.dead:
                # Stay up briefly so in-flight requests get their 503s and probes see /health fail,
                # then exit non-zero for the orchestrator to restart us.
                logger.error("the engine died; exiting in %.0fs", ENGINE_DEATH_EXIT_DELAY_S)
                await asyncio.sleep(ENGINE_DEATH_EXIT_DELAY_S)
                fatal("the engine died")
                return

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(start_engine())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(adapter.shutdown)

    app = FastAPI(
        title="jamba-server",
        version=__version__,
        description="OpenAI-compatible API for AI21 Jamba 1.5 models, served by vLLM.",
        lifespan=lifespan,
    )
    app.state.server = state
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        auth=ApiKeyChecker(settings.api_keys, settings.metrics_require_auth),
    )

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with `model` narrowed to the names this server accepts."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("ChatCompletionRequest", "CompletionRequest", "TokenizeRequest"):
                model_field = schema["components"]["schemas"][name]["properties"]["model"]
                model_field.pop("anyOf", None)
                model_field.update({"type": "string", "enum": sorted(state.model_aliases)})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        record_rejection(exc.status_code, exc.code)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error: APIError
        if exc.status_code == 404:
            error = NotFoundError(str(exc.detail))
        elif exc.status_code == 413:
            error = RequestTooLargeError(str(exc.detail))
        else:
            error = InvalidRequestError(str(exc.detail))
            error.status_code = exc.status_code
        error.headers = dict(exc.headers or {}) or None
        return _error_response(error)

    # An exception no handler above maps is the request middleware's: Starlette would run a handler
    # for `Exception` outside every middleware (no request id, counted as 499, logged twice).

    def note(request: Request, **fields: Any) -> None:
        request_info(request.scope).update(fields)

    def begin_generation(request: Request, model: str) -> None:
        """Checks every generation request passes first, cheapest first, before any tokenizing."""
        note(request, model=state.model_name)
        state.check_model(model)
        state.check_ready()
        state.admission.check_open()

    def generation_metrics(request: Request, prompt_tokens: int, features: tuple[str, ...]) -> GenerationMetrics:
        metrics = GenerationMetrics(state.model_name, request_info(request.scope)["arrived"], features)
        metrics.prompt(prompt_tokens)
        return metrics

    def outcome_note(request: Request, prompt_text: str, result: Any, json_mode: bool = False) -> Callable[[], None]:
        """At the end of a request: outcome metrics, token counts for the access-log line, and
        prompt and raw outputs with `log_request_content`."""

        def record() -> None:
            record_outcome(state.model_name, result.outcomes(), getattr(result, "parsers", ()), json_mode)
            note(request, completion_tokens=result.usage().completion_tokens)
            if settings.log_request_content:
                note(request, prompt=prompt_text, outputs=["".join(c.text) for c in result.choices])

        return record

    async def run_job(request: Request, job: GenerationJob) -> Any:
        """The one generation pipeline, whatever the protocol: ids and access-log facts, metrics,
        then the runner streams or collects, and the job's renderers shape the output."""
        request_id = f"{job.id_prefix}-{uuid.uuid4().hex}"
        prompt_ids = job.prompt.token_ids
        note(request, engine_request_id=request_id, prompt_tokens=len(prompt_ids), stream=job.stream)
        metrics = generation_metrics(request, len(prompt_ids), job.features + (("stream",) if job.stream else ()))
        if job.stream:
            streamer = job.renderers.streamer(request_id, state.model_name)
            return await state.stream(
                request,
                request_id,
                prompt_ids,
                job.spec,
                streamer.step,
                job.renderers.opening(streamer),
                streamer.usage_chunk if job.include_usage else None,
                metrics,
                on_finish=outcome_note(request, job.prompt.text, streamer, job.json_mode),
            )
        result = job.renderers.accumulator(request_id, state.model_name)
        await state.collect(request, request_id, prompt_ids, job.spec, result.add, metrics)
        response = result.build(prompt_ids if job.return_token_ids else None)
        outcome_note(request, job.prompt.text, result, job.json_mode)()
        return response

    @app.post("/v1/chat/completions", response_model=ChatCompletion, responses={**_STREAMING_OK, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        begin_generation(request, body.model)
        job = await _off_loop_if_large(_body_size(request), prepare_chat, body, adapter, settings, state.chat_template)
        return await run_job(request, job)

    @app.post("/v1/completions", response_model=Completion, responses={**_STREAMING_OK, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request):
        begin_generation(request, body.model)
        job = await _off_loop_if_large(_body_size(request), prepare_completion, body, adapter, settings)
        return await run_job(request, job)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=adapter.max_model_len or None)])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
    async def model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return ModelCard(id=state.model_name, max_model_len=adapter.max_model_len or None)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        """The prompt a request would get, through the same checks and rendering as generation."""
        state.check_model(body.model)
        state.check_ready()
        state.admission.check_open()
        if body.messages is not None:
            check_chat_input_limits(body, settings)
            plan = plan_chat(body)
            prompt = await _off_loop_if_large(
                prompts.text_size(plan.template_inputs),
                prompts.render_chat,
                adapter.tokenizer,
                state.chat_template,
                plan.template_inputs,
                body.add_generation_prompt,
                plan.prompt_suffix if body.add_generation_prompt else "",
            )
        else:
            text = body.prompt or ""
            prompt = await _off_loop_if_large(
                len(text), prompts.encode_prompt, adapter.tokenizer, text, body.add_special_tokens
            )
        return TokenizeResponse(
            tokens=prompt.token_ids,
            count=len(prompt.token_ids),
            max_model_len=adapter.max_model_len,
            prompt=prompt.text,
        )

    @app.get("/health", responses=_ERRORS)
    async def health() -> dict[str, str]:
        if adapter.dead or state.start_error is not None:
            raise ServiceUnavailableError("The engine has failed.")
        return {"status": "ok"}

    @app.get("/ready", responses=_ERRORS)
    async def ready() -> dict[str, str]:
        state.check_ready()
        return {"status": "ready"}

    @app.get("/version", responses=_ERRORS)
    async def version() -> dict[str, str]:
        return {"version": __version__, "vllm_version": VLLM_VERSION}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
