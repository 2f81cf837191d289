"""Per-request size limits from the operator's settings (counts, lengths, schema sizes), each
naming its param. Checked first in `prepare`, before any rendering or tokenizing."""

from __future__ import annotations

import json

from jamba_server.core.constraints import constraint_bytes
from jamba_server.errors import InvalidRequestError, RequestTooLargeError
from jamba_server.protocol import ChatCompletionRequest, ChatFeatures, CompletionRequest, ResponseFormat, SamplingFields
from jamba_server.settings import Settings

def _too_many(what: str, count: int, limit: int, param: str) -> InvalidRequestError:
    return InvalidRequestError(f"too many {what}: {count} (limit {limit})", param=param)


def _check_sampling(request: SamplingFields, max_tokens: int | None, settings: Settings, param: str) -> None:
    if request.n > settings.max_n:
        raise _too_many("choices", request.n, settings.max_n, "n")
    if settings.max_tokens_limit is not None and max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise InvalidRequestError(
            f"{param} is {max_tokens}; this server allows at most {settings.max_tokens_limit}", param=param
        )
    stops = request.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise _too_many("stop sequences", len(stops), settings.max_stop_sequences, "stop")
    for stop in stops:
        if len(stop) > settings.max_stop_length:
            raise InvalidRequestError(
                f"a stop sequence is {len(stop)} characters (limit {settings.max_stop_length})", param="stop"
            )
    if request.structured_outputs is not None:
        size = constraint_bytes(request.structured_outputs)
        if size > settings.max_schema_bytes:
            param = f"structured_outputs.{request.structured_outputs.kind()}"
            raise RequestTooLargeError(f"{param} is {size} bytes (limit {settings.max_schema_bytes})", param=param)


def _check_response_format(fmt: ResponseFormat | None, settings: Settings) -> None:
    if fmt is not None and fmt.json_schema is not None:
        if _schema_bytes(fmt.json_schema.schema_) > settings.max_schema_bytes:
            raise RequestTooLargeError(
                f"response schema over {settings.max_schema_bytes} bytes", param="response_format.json_schema.schema"
            )


def _schema_bytes(schema: object) -> int:
    return len(json.dumps(schema, ensure_ascii=False).encode("utf-8"))


def check_chat_limits(request: ChatCompletionRequest, settings: Settings) -> None:
    max_param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
    _check_sampling(request, request.requested_max_tokens(), settings, max_param)
    check_chat_input_limits(request, settings)


def check_chat_input_limits(request: ChatFeatures, settings: Settings) -> None:
    """The limits on what a chat request renders into the prompt (also for /tokenize)."""
    if len(request.messages) > settings.max_messages:
        raise _too_many("messages", len(request.messages), settings.max_messages, "messages")
    tools = request.tools or []
    if len(tools) > settings.max_tools:
        raise _too_many("tools", len(tools), settings.max_tools, "tools")
    for i, tool in enumerate(tools):
        if tool.function.parameters is not None and _schema_bytes(tool.function.parameters) > settings.max_schema_bytes:
            raise RequestTooLargeError(
                f"tool schema over {settings.max_schema_bytes} bytes", param=f"tools[{i}].function.parameters"
            )
    _check_response_format(request.response_format, settings)
    documents = request.documents or []
    if len(documents) > settings.max_documents:
        raise _too_many("documents", len(documents), settings.max_documents, "documents")
    total = sum(len(d.text) for d in documents)
    if total > settings.max_document_chars:
        raise RequestTooLargeError(
            f"documents hold {total} characters of text (limit {settings.max_document_chars})", param="documents"
        )


def check_completion_limits(request: CompletionRequest, settings: Settings) -> None:
    _check_sampling(request, request.max_tokens, settings, "max_tokens")
    _check_response_format(request.response_format, settings)
