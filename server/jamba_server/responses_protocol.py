"""OpenAI Responses API request and response models (pydantic), as the `openai` client and the
Agents SDK send and read them, with Jamba's `documents` and `citation_mode` as extensions.

Unknown fields are refused, as OpenAI refuses them. Fields OpenAI defines that this server cannot
honour get a 400 that says so (`UNSUPPORTED`); fields that only route or account a request on
OpenAI's side are accepted and ignored. The README's table lists both.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from jamba_server.protocol import Document

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"

UNSUPPORTED = {
    "background": "background responses are not available; send the request and wait (or stream)",
    "conversation": "conversations are not stored here; use previous_response_id",
    "prompt": "stored prompt templates are not available",
    "context_management": "server-side context editing is not available",
    "max_tool_calls": "max_tool_calls is not supported",
    "moderation": "moderation is not available",
    "image": "image generation is not available",
    "access_programs": "access programs are not available",
    "background_options": "background responses are not available",
}
BUILT_IN_TOOLS = "web search, file search, code interpreter, computer use, image generation, MCP and shell tools"


def _refuse_unsupported(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    for key, reason in UNSUPPORTED.items():
        if data.get(key) not in (None, False):
            raise ValueError(f"{key}: {reason}")
    if data.get("top_logprobs") not in (None, 0):
        raise ValueError("top_logprobs: logprobs are not available on this endpoint (use /v1/chat/completions)")
    if data.get("include"):
        raise ValueError("include: no additional output data is available")
    reasoning = data.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") not in (None, "none"):
        raise ValueError("reasoning: Jamba answers directly; only effort `none` (or no reasoning) is supported")
    return data


class InputText(BaseModel):
    model_config = _STRICT
    type: Literal["input_text"]
    text: str


class OutputTextPart(BaseModel):
    """An earlier answer's text, sent back as input (annotations are not rendered)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["output_text"]
    text: str


_SUPPORTED_PARTS = ("input_text", "output_text")


class MessageItem(BaseModel):
    model_config = _STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | OutputTextPart, Field(discriminator="type")]]
    id: str | None = None
    status: str | None = None
    phase: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _supported_parts(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        for part in parts if isinstance(parts, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in _SUPPORTED_PARTS:
                raise ValueError(f"content parts of type `{kind[:40]}` are not supported (only input_text and output_text)")
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def cited_documents(self) -> list[int]:
        """The documents an earlier answer's file citations name (`document-N`, as this server writes them)."""
        ids: list[int] = []
        for part in self.content if isinstance(self.content, list) else ():
            for annotation in (part.model_extra or {}).get("annotations") or () if isinstance(part, OutputTextPart) else ():
                file_id = annotation.get("file_id") if isinstance(annotation, dict) else None
                if isinstance(file_id, str) and re.fullmatch(r"document-\d{1,6}", file_id):
                    ids.append(int(file_id.removeprefix("document-")))
        return list(dict.fromkeys(ids))


class FunctionCallItem(BaseModel):
    model_config = _STRICT
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=_NAME)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = _STRICT
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(part.text for part in self.output)


def _item_kind(value: Any) -> str:
    """An item's type; a message may leave it out (OpenAI's "easy input message")."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]
_SUPPORTED_ITEMS = ("message", "function_call", "function_call_output")


class FunctionTool(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str = Field(pattern=_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    # Accepted and ignored: how OpenAI loads a tool, who may call it, what it returns.
    defer_loading: bool | None = None
    allowed_callers: list[str] | None = None
    output_schema: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _function_tools_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ValueError(f"built-in tools (`{kind[:40]}`) are not available here ({BUILT_IN_TOOLS}); give function tools")
        return data


class FunctionToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=_NAME)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_with_json_schema(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise ValueError("schema is given exactly when type is `json_schema`")
        if self.type == "json_schema" and self.name is None:
            raise ValueError("name is required when type is `json_schema`")
        return self


class TextConfig(BaseModel):
    model_config = _STRICT
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, ignored


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")
    effort: str | None = None


class ResponsesFeatures(BaseModel):
    model_config = _STRICT
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = Field(None, max_length=128)
    documents: list[Document] | None = Field(
        None, description="Extension: grounding documents, rendered into Jamba's documents section."
    )
    citation_mode: Literal["off", "fast"] | None = Field(
        None, description="Extension: `fast` turns on Jamba's citation mode; needs documents."
    )

    @model_validator(mode="before")
    @classmethod
    def _supported(cls, data: Any) -> Any:
        data = _refuse_unsupported(data)
        items = data.get("input") if isinstance(data, dict) else None
        if items == []:
            raise ValueError("input must not be empty")
        for i, item in enumerate(items if isinstance(items, list) else ()):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if isinstance(kind, str) and kind not in _SUPPORTED_ITEMS:
                raise ValueError(f"input[{i}]: items of type `{kind[:40]}` are not supported (message, function_call, function_call_output)")
        return data


class ResponsesRequest(ResponsesFeatures):
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None
    store: bool | None = True  # null means the default (true), as OpenAI takes it
    stream: bool | None = False
    # Accepted and ignored: they route or account requests on OpenAI's side.
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = Field(
        None,
        description="`auto`: a conversation longer than the context is cut to fit (oldest turns first, as chat's "
        "truncate_prompt_tokens -1); `disabled` (the default): it is a 400.",
    )
    reasoning: ReasoningConfig | None = None
    background: Literal[False] | None = None
    top_logprobs: Literal[0] | None = None

    @model_validator(mode="after")
    def _null_means_default(self) -> ResponsesRequest:
        self.store = True if self.store is None else self.store
        self.stream = bool(self.stream)
        return self


# ---------------------------------------------------------------- responses


class FileCitation(BaseModel):
    """Jamba cites whole documents: OpenAI's file citation, naming the document, at the end of the
    text it supports (`index`)."""

    type: Literal["file_citation"] = "file_citation"
    file_id: str
    filename: str
    index: int


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[FileCitation] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "failed", "in_progress", "incomplete"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponsesUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
