"""Anthropic Messages API request and response models (pydantic), as the `anthropic` client sends and
reads them, with Jamba's `documents` and `citation_mode` as extensions.

Unknown fields are refused, as Anthropic's API refuses them. Fields Anthropic defines that this
server cannot honour get a 400 that says so (`UNSUPPORTED`); fields that only route or account a
request on Anthropic's side are accepted and ignored (`IGNORED`). The README's table lists both.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jamba_server.protocol import Document

_STRICT = ConfigDict(extra="forbid", populate_by_name=True)
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"

UNSUPPORTED = {
    "container": "code execution containers are not available",
    "mcp_servers": "MCP servers are not available",
    "context_management": "server-side context editing is not available",
    "inference_geo": "this server runs where it is deployed",
    "speed": "there is one speed",
    "diagnostics": "diagnostics are not available",
}
IGNORED = ("metadata", "service_tier", "cache_control", "user_profile_id", "workspace_id")
SUPPORTED_BLOCKS = ("text", "tool_use", "tool_result")


def _refuse_unsupported(data: Any) -> Any:
    if isinstance(data, dict):
        for key, reason in UNSUPPORTED.items():
            if data.get(key) is not None:
                raise ValueError(f"{key} is not supported by this server: {reason}")
    return data


class TextBlockParam(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # ignored: vLLM caches prefixes by itself
    citations: list[dict[str, Any]] | None = None  # of an earlier answer; not rendered


class ToolUseBlockParam(BaseModel):
    model_config = _STRICT
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=_NAME)
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlockParam(BaseModel):
    model_config = _STRICT
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[TextBlockParam] | None = None
    is_error: bool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


ContentBlockParam = Annotated[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam, Field(discriminator="type")]


class MessageParam(BaseModel):
    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[ContentBlockParam]

    @model_validator(mode="before")
    @classmethod
    def _supported_blocks(cls, data: Any) -> Any:
        blocks = data.get("content") if isinstance(data, dict) else None
        for block in blocks if isinstance(blocks, list) else ():
            kind = block.get("type") if isinstance(block, dict) else None
            if isinstance(kind, str) and kind not in SUPPORTED_BLOCKS:
                raise ValueError(f"content blocks of type `{kind[:40]}` are not supported (only text, tool_use, tool_result)")
        return data


class ToolParam(BaseModel):
    model_config = _STRICT
    type: Literal["custom"] | None = None
    name: str = Field(pattern=_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    cache_control: dict[str, Any] | None = None
    # Accepted and ignored: how Anthropic's API streams or loads a tool's definition.
    eager_input_streaming: bool | None = None
    defer_loading: bool | None = None
    input_examples: list[dict[str, Any]] | None = None

    @model_validator(mode="before")
    @classmethod
    def _client_tools_only(cls, data: Any) -> Any:
        kind = data.get("type") if isinstance(data, dict) else None
        if isinstance(kind, str) and kind != "custom":
            raise ValueError(f"server tools (`{kind[:40]}`) are not available; give client tools with an input_schema")
        return data


class ToolChoiceParam(BaseModel):
    model_config = _STRICT
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoiceParam:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("name is given exactly when type is `tool`")
        return self


class JsonOutputFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = _STRICT
    format: JsonOutputFormat | None = None
    effort: str | None = Field(None, description="Not supported: Jamba has no effort setting.")

    @model_validator(mode="after")
    def _no_effort(self) -> OutputConfig:
        if self.effort is not None:
            raise ValueError("effort is not supported: Jamba has no effort setting")
        return self


class ThinkingDisabled(BaseModel):
    """Jamba answers without a thinking phase: only `{"type": "disabled"}` is accepted."""

    model_config = ConfigDict(extra="allow")
    type: str

    @model_validator(mode="after")
    def _disabled(self) -> ThinkingDisabled:
        if self.type != "disabled" or self.model_extra:
            raise ValueError("extended thinking is not available: Jamba answers directly (omit thinking)")
        return self


class Metadata(BaseModel):
    model_config = _STRICT
    user_id: str | None = Field(None, max_length=256)


class MessagesFeatures(BaseModel):
    """What renders into the prompt: shared by generation and `count_tokens`."""

    model_config = _STRICT
    model: str
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    output_config: OutputConfig | None = None
    thinking: ThinkingDisabled | None = None
    documents: list[Document] | None = Field(
        None, description="Extension: grounding documents, rendered into Jamba's documents section."
    )
    citation_mode: Literal["off", "fast"] | None = Field(
        None, description="Extension: `fast` turns on Jamba's citation mode; needs documents."
    )
    # Accepted and ignored (see IGNORED).
    cache_control: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported_fields(cls, data: Any) -> Any:
        return _refuse_unsupported(data)


class MessagesRequest(MessagesFeatures):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    user_profile_id: str | None = None
    workspace_id: str | None = None


class CountTokensRequest(MessagesFeatures):
    pass


class CountTokensResponse(BaseModel):
    input_tokens: int


# ---------------------------------------------------------------- responses


class DocumentCitation(BaseModel):
    """Jamba cites whole documents: the location is the cited document, from its first character to
    its last (Anthropic's `char_location` shape)."""

    type: Literal["char_location"] = "char_location"
    cited_text: str
    document_index: int
    document_title: str | None = None
    start_char_index: int = 0
    end_char_index: int


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str
    citations: list[DocumentCitation] | None = None


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessagesUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessagesResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[TextBlock | ToolUseBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessagesUsage


class AnthropicErrorBody(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorBody
