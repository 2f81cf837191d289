"""HTTP layer: thin FastAPI routes over the core and the engine adapter; errors mapped once."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from jamba_server import __version__
from jamba_server.core import prompt as prompts
from jamba_server.core.features import plan_chat
from jamba_server.core.responses import (
    ChatAccumulator,
    ChatStreamer,
    CompletionAccumulator,
    CompletionStreamer,
)
from jamba_server.core.sampling import sampling_spec
from jamba_server.engine import VLLM_VERSION, EngineAdapter
from jamba_server.errors import (
    APIError,
    InternalServerError,
    InvalidRequestError,
    ModelNotFoundError,
    NotFoundError,
    ServiceUnavailableError,
)
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

# Prompts longer than this are rendered and tokenized off the event loop.
_INLINE_PROMPT_CHARS = 16_384
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 404, 413, 429, 500, 503)
}

BUILD_INFO = Gauge(
    "jamba_build_info",
    "Build information of the running server (value is always 1).",
    ["version", "vllm_version", "model", "tensor_parallel_size", "quantization"],
)


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


def _sse(payload: str) -> bytes:
    return f"data: {payload}\n\n".encode()


_SSE_DONE = b"data: [DONE]\n\n"


class ServerState:
    """What the routes share: settings, the adapter, the chat template, lifecycle flags."""

    def __init__(self, settings: Settings, adapter: EngineAdapter):
        self.settings = settings
        self.adapter = adapter
        self.chat_template = settings.chat_template_text()
        self.model_name = settings.public_model_name
        self.model_aliases = {self.model_name, settings.model}
        self.start_error: BaseException | None = None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_aliases:
            raise ModelNotFoundError(
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                param="model",
            )

    def check_ready(self) -> None:
        if self.adapter.dead:
            raise ServiceUnavailableError("The engine has failed; the server is restarting.")
        if not self.adapter.ready:
            raise ServiceUnavailableError("The model is still loading; retry shortly.")


async def _off_loop_if_large(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    if size > _INLINE_PROMPT_CHARS:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def create_app(
    settings: Settings,
    adapter: EngineAdapter,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    state = ServerState(settings, adapter)

    def fatal(reason: str) -> None:
        logger.error("fatal: %s", reason)
        if on_fatal is not None:
            on_fatal(reason)

    async def start_engine() -> None:
        try:
            await asyncio.to_thread(adapter.start)
        except BaseException as exc:  # noqa: BLE001 - any start failure ends the process
            state.start_error = exc
            logger.exception("engine failed to start")
            fatal(f"engine failed to start: {exc}")
            return
        BUILD_INFO.labels(
            __version__,
            VLLM_VERSION,
            state.model_name,
            str(settings.tensor_parallel_size),
            settings.quantization or "none",
        ).set(1)
        logger.info("engine ready: %s (max_model_len=%d)", state.model_name, adapter.max_model_len)
        while True:
            await asyncio.sleep(1.0)
            if adapter.dead:
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

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.envelope(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc)
        return JSONResponse(error.envelope(), status_code=error.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFoundError(str(exc.detail)) if exc.status_code == 404 else InvalidRequestError(str(exc.detail))
        error.status_code = exc.status_code
        return JSONResponse(error.envelope(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        error = InternalServerError("The server had an error while processing your request.")
        return JSONResponse(error.envelope(), status_code=500)

    async def stream_events(
        request_id: str,
        steps: AsyncIterator[Any],
        on_step: Callable[[Any], Any],
        opening: Any | None,
        closing: Callable[[], Any] | None,
    ) -> AsyncIterator[bytes]:
        try:
            if opening is not None:
                yield _sse(opening.model_dump_json())
            async for step in steps:
                for chunk in on_step(step):
                    yield _sse(chunk.model_dump_json())
            if closing is not None:
                yield _sse(closing().model_dump_json())
        except APIError as exc:
            logger.warning("stream %s ended with error: %s", request_id, exc.message)
            yield _sse(ErrorResponse.model_validate(exc.envelope()).model_dump_json())
        finally:
            await steps.aclose()
        yield _SSE_DONE

    def streaming_response(body: AsyncIterator[bytes]) -> StreamingResponse:
        return StreamingResponse(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def first_step(steps: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pull the first step before answering, so request errors become HTTP errors."""
        try:
            first = await steps.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await steps.aclose()
            raise

        async def chained() -> AsyncIterator[Any]:
            try:
                if first is not None:
                    yield first
                async for step in steps:
                    yield step
            finally:
                await steps.aclose()

        return chained()

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERROR_RESPONSES},
    )
    async def chat_completions(body: ChatCompletionRequest):
        state.check_model(body.model)
        state.check_ready()
        plan = plan_chat(body)
        size = sum(len(m.text()) for m in body.messages) + sum(len(d.text) for d in body.documents or [])
        prompt = await _off_loop_if_large(
            size,
            prompts.render_chat,
            adapter.tokenizer,
            state.chat_template,
            plan.template_inputs,
            True,
            plan.prompt_suffix,
        )
        spec = sampling_spec(
            body,
            prompt_tokens=len(prompt.token_ids),
            max_model_len=adapter.max_model_len,
            vocab_size=adapter.vocab_size,
            json_schema=plan.constraint.schema if plan.constraint else None,
            json_schema_param=plan.constraint.param if plan.constraint else None,
            banned_tokens=plan.banned_tokens,
        )
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        steps = await first_step(adapter.generate(prompt.token_ids, spec, request_id))
        if body.stream:
            streamer = ChatStreamer(
                request_id,
                state.model_name,
                spec.n,
                body.logprobs,
                created=int(time.time()),
                parser=plan.parser,
            )
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streaming_response(
                stream_events(
                    request_id,
                    steps,
                    streamer.step,
                    streamer.opening(),
                    streamer.usage_chunk if include_usage else None,
                )
            )
        result = ChatAccumulator(request_id, state.model_name, spec.n, body.logprobs, plan.parser)
        async for step in steps:
            result.add(step)
        return result.build(prompt.token_ids if body.return_token_ids else None)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: {"content": {"text/event-stream": {}}}, **_ERROR_RESPONSES},
    )
    async def completions(body: CompletionRequest):
        state.check_model(body.model)
        state.check_ready()
        if isinstance(body.prompt, str):
            prompt = await _off_loop_if_large(
                len(body.prompt), prompts.encode_prompt, adapter.tokenizer, body.prompt
            )
        else:
            bad = [t for t in body.prompt if not 0 <= t < adapter.vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary", param="prompt"
                )
            text = adapter.tokenizer.decode(body.prompt) if body.echo else ""
            prompt = prompts.Prompt(text=text, token_ids=list(body.prompt))
        spec = sampling_spec(
            body,
            prompt_tokens=len(prompt.token_ids),
            max_model_len=adapter.max_model_len,
            vocab_size=adapter.vocab_size,
        )
        request_id = f"cmpl-{uuid.uuid4().hex}"
        want_logprobs = body.logprobs is not None
        echo_text = prompt.text if body.echo else ""
        steps = await first_step(adapter.generate(prompt.token_ids, spec, request_id))
        if body.stream:
            streamer = CompletionStreamer(
                request_id, state.model_name, spec.n, want_logprobs, created=int(time.time())
            )
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streaming_response(
                stream_events(
                    request_id,
                    steps,
                    streamer.step,
                    streamer.echo(echo_text) if echo_text else None,
                    streamer.usage_chunk if include_usage else None,
                )
            )
        result = CompletionAccumulator(
            request_id, state.model_name, spec.n, want_logprobs, echo_text=echo_text
        )
        async for step in steps:
            result.add(step)
        return result.build(prompt.token_ids if body.return_token_ids else None)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(
            data=[ModelCard(id=state.model_name, max_model_len=adapter.max_model_len or None)]
        )

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERROR_RESPONSES)
    async def model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return ModelCard(id=state.model_name, max_model_len=adapter.max_model_len or None)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        state.check_model(body.model)
        state.check_ready()
        if body.messages is not None:
            plan = plan_chat(body)
            prompt = prompts.render_chat(
                adapter.tokenizer,
                state.chat_template,
                plan.template_inputs,
                add_generation_prompt=body.add_generation_prompt,
                suffix=plan.prompt_suffix if body.add_generation_prompt else "",
            )
        else:
            prompt = prompts.encode_prompt(
                adapter.tokenizer, body.prompt or "", add_special_tokens=body.add_special_tokens
            )
        return TokenizeResponse(
            tokens=prompt.token_ids,
            count=len(prompt.token_ids),
            max_model_len=adapter.max_model_len,
            prompt=prompt.text,
        )

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, str]:
        if adapter.dead or state.start_error is not None:
            raise ServiceUnavailableError("The engine has failed.")
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    async def ready() -> dict[str, str]:
        state.check_ready()
        return {"status": "ready"}

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__, "vllm_version": VLLM_VERSION}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
