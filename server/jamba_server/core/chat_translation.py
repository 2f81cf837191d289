"""What the protocols that are translated into a chat request share (Anthropic's Messages API,
OpenAI's Responses API): validating the chat request they mean, and naming an error in the client's
own terms — each chat message remembers the param it came from (`origins`), and chat field paths are
renamed to the protocol's (`renames`)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from pydantic import ValidationError

from jamba_server.errors import APIError, InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest

Renames = Sequence[tuple[re.Pattern[str], str]]


def chat_request(fields: dict[str, Any], origins: list[str], renames: Renames) -> ChatCompletionRequest:
    """The validated chat request; a validation error is a 400 in the client's terms."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = re.sub(r"\.(\d+)", r"[\1]", ".".join(str(p) for p in first["loc"]))
        error = InvalidRequestError(str(first["msg"]).removeprefix("Value error, "), param=path or None)
        raise in_terms_of(error, origins, renames) from None


def in_terms_of(error: APIError, origins: list[str], renames: Renames) -> APIError:
    """`error`, raised about the chat request, renamed to the client request's params."""
    param = error.param
    if param is None:
        return error
    renamed = param
    if match := re.match(r"^messages\[(\d+)\]", param):
        index = int(match.group(1))
        renamed = origins[index] if index < len(origins) else param.split("[")[0]
    for pattern, replacement in renames:
        renamed = pattern.sub(replacement, renamed)
    if "." in param or "[" in param:  # a path in the message; a plain word (`stop`) may be prose
        error.message = error.message.replace(param, renamed)
    error.param = renamed
    return error
