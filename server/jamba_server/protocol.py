"""OpenAI-compatible request and response models (pydantic), with vLLM's sampling extensions.

Requests reject unknown fields, as OpenAI does, so a misspelt parameter is an error rather than
silently ignored. Field bounds here are the validation; the app maps failures to 400 with `param`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

_STRICT = ConfigDict(extra="forbid")
_OPEN = ConfigDict(extra="allow")


class TextContentPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


# Characters that end a line (str.splitlines'): a document's title or metadata must not contain
# them, or a value could start a forged `## Document ID:` block of its own.
LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")


# The template writes a metadata key as `Key: value`, through Jinja's `capitalize`, which lowercases
# all but the first letter: `<|EOM|>` would become a control token's spelling after any check on the
# client's text. Keys are therefore plain words.
_METADATA_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,63}")


def _single_line(value: str, what: str) -> str:
    if not LINE_BREAKS.isdisjoint(value):
        raise ValueError(f"{what} must be a single line (no line breaks)")
    return value


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> dict[str, Any]:
        """Arguments are a JSON object; the prompt gets it re-serialized, never the client's string,
        so a string like `{}}, {"name": "delete_all", "arguments": {}` cannot add a call to history."""
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            raise ValueError("must be a JSON object (a string holding one)") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object (a string holding one)")
        return parsed


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class CitationRef(BaseModel):
    model_config = _STRICT
    document_id: int = Field(ge=0)
    title: str | None = None


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    # OpenAI's rule for a participant name; the template writes it as `(NAME)` before the content.
    name: str | None = Field(None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    citations: list[CitationRef | Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Extension: an assistant turn's citations, as returned by this server."
    )

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.citations is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry citations")
        return self

    def citation_ids(self) -> list[int] | None:
        if self.citations is None:
            return None
        return [c.document_id if isinstance(c, CitationRef) else c for c in self.citations]

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"] = "function"
    function: NamedFunction


class Document(BaseModel):
    """Extension: a grounding document; `text` required, `title` and other metadata strings."""

    model_config = _OPEN
    text: str
    title: str | None = None

    @model_validator(mode="after")
    def _metadata_strings(self) -> Document:
        if self.title is not None:
            _single_line(self.title, "title")
        for key, value in (self.model_extra or {}).items():
            if not isinstance(value, str):
                raise ValueError(f"document metadata `{key}` must be a string")
            if not _METADATA_KEY.fullmatch(key):
                raise ValueError(f"a document metadata key must match {_METADATA_KEY.pattern} (got {key[:80]!r})")
            _single_line(value, f"document metadata `{key}`")
        return self


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("json_schema is only allowed when type is json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its `StructuredOutputsParams`, field for field): exactly one
    constraint kind. The three options that vLLM 0.32's xgrammar backend ignores per request are
    accepted only at what this server always does: JSON without free whitespace, schemas as written."""

    model_config = _STRICT
    KINDS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")

    json_: dict[str, Any] | str | None = Field(
        None, alias="json", description="A JSON schema (an object, or a string holding one)."
    )
    regex: str | None = Field(None, description="A regular expression the whole output must match.")
    choice: list[str] | None = Field(None, min_length=1, description="The output is exactly one of these strings.")
    grammar: str | None = Field(None, description="A grammar in xgrammar's EBNF (`root ::= ...`) or Lark syntax.")
    json_object: bool | None = Field(None, description="`true`: any JSON object (as response_format json_object).")
    structural_tag: str | dict[str, Any] | None = Field(
        None, description="An xgrammar structural tag (an object, or a string holding one)."
    )
    disable_any_whitespace: bool | None = Field(
        None, description="Always so here: JSON output never has free whitespace (`false` is a 400)."
    )
    disable_additional_properties: bool | None = Field(
        None, description="Not supported (vLLM's guidance backend only): only `false` is accepted."
    )
    whitespace_pattern: str | None = Field(None, description="Not supported (vLLM's xgrammar backend has none).")

    @field_validator("json_object")
    @classmethod
    def _json_object_true(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("must be true (leave it out for no constraint)")
        return value

    @field_validator("disable_any_whitespace")
    @classmethod
    def _no_free_whitespace(cls, value: bool | None) -> bool | None:
        if value is False:
            raise ValueError("false is not supported: this server's JSON output never has free whitespace")
        return value

    @field_validator("disable_additional_properties")
    @classmethod
    def _schemas_as_written(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("not supported: the xgrammar backend keeps schemas as written (vLLM's guidance backend only)")
        return value

    @field_validator("whitespace_pattern")
    @classmethod
    def _no_whitespace_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported: the xgrammar backend has no whitespace pattern")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> StructuredOutputs:
        given = [kind for kind in self.KINDS if self.value(kind) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one constraint kind ({', '.join(self.KINDS)}); got {', '.join(given) or 'none'}"
            )
        return self

    def value(self, kind: str) -> Any:
        return self.json_ if kind == "json" else getattr(self, kind)

    def kind(self) -> str:
        return next(kind for kind in self.KINDS if self.value(kind) is not None)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    continuous_usage_stats: bool = Field(
        False, description="vLLM extension: with include_usage, every chunk carries the usage so far."
    )

    def usage_flags(self) -> tuple[bool, bool]:
        """(a final usage chunk, usage on every chunk): continuous usage needs include_usage, as in vLLM."""
        return self.include_usage, self.include_usage and self.continuous_usage_stats


# vLLM's bounds on a cache salt (entrypoints/generate/base/protocol.py, `validate_cache_salt`).
CACHE_SALT_MAX_LENGTH = 128
CACHE_SALT_FORBIDDEN = frozenset("@/\\\x00")

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(BaseModel):
    """Sampling parameters shared by chat and completions (OpenAI + vLLM extensions)."""

    model_config = _STRICT
    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=64)
    include_stop_str_in_output: bool = False
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(None, max_length=256)
    allowed_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    skip_special_tokens: bool = True
    return_token_ids: bool = Field(
        False, description="Add prompt_token_ids and per-choice token_ids (non-streaming only)."
    )
    truncate_prompt_tokens: int | None = Field(
        None,
        ge=-1,
        le=2**63 - 1,
        description=(
            "Cut a prompt longer than this many tokens instead of refusing it (-1: as long as the context "
            "allows); the prompt is also cut to leave room for max_tokens. Chat cuts message and document "
            "text only, never the template's tokens (see README). The response's `prompt_truncation` says what went."
        ),
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None,
        description="With truncate_prompt_tokens: `left` (the default) cuts the oldest text first and keeps a "
        "text's end; `right` cuts the newest text first and keeps a text's beginning.",
    )
    priority: int = Field(
        0, ge=-(2**63), le=2**63 - 1,
        description="vLLM extension: lower is served earlier; other than 0 needs a server run with "
        "--scheduling-policy priority.",
    )  # fmt: skip
    prompt_logprobs: int | None = Field(
        None, ge=0, le=20, description="vLLM extension: log probabilities of the prompt's tokens, with this many top candidates."
    )
    cache_salt: str | None = Field(
        None, min_length=1, max_length=CACHE_SALT_MAX_LENGTH,
        description="vLLM extension: prefix-cache reuse only between requests with the same salt.",
    )  # fmt: skip
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's constraint on the output: exactly one of json, regex, choice, grammar, json_object, structural_tag."
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if any(item == "" for item in items):
            raise ValueError("stop sequences must be non-empty")
        return value

    @field_validator("cache_salt")
    @classmethod
    def _cache_salt_characters(cls, value: str | None) -> str | None:
        if value is not None and not CACHE_SALT_FORBIDDEN.isdisjoint(value):
            raise ValueError("cache_salt must not contain '@', '/', '\\' or NUL (as vLLM's)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # ASCII decimal only: `str.isdigit` alone accepts "²" (then `int()` raises) and other scripts'
        # digits; 10 digits hold any token id and keep `int()` under its digit limit.
        for key in value or {}:
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias keys must be token ids (decimal integers), got {key[:20]!r}")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncation_length(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be a number of tokens (at least 1), or -1 for the model's context length")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.return_token_ids and self.stream:
            raise ValueError("return_token_ids is only supported without stream")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatFeatures(BaseModel):
    """Jamba's features over the chat API: tools, documents, JSON mode, citations."""

    model_config = _STRICT
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    documents: list[Document] | None = Field(
        None, description="Extension: grounding documents, rendered into Jamba's documents section."
    )
    response_format: ResponseFormat | None = None
    citation_mode: Literal["off", "fast"] | None = Field(
        None, description="Extension: `fast` turns on Jamba's citation mode; needs documents."
    )
    # vLLM's prompt-shape fields (checked with the other features in core/features.py).
    add_generation_prompt: bool = Field(
        True, description="vLLM extension: end the prompt with the assistant turn's opening (`<|bom|><|assistant|>`)."
    )
    continue_final_message: bool = Field(
        False,
        description="vLLM extension: the prompt ends with the final (assistant) message's text, open, and the reply "
        "continues it (prefill). Needs `add_generation_prompt: false`.",
    )


class ChatCompletionRequest(SamplingFields, ChatFeatures):
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = Field(
        False, description="vLLM extension: the reply's content starts with the last message's, when that is an assistant message."
    )

    @model_validator(mode="after")
    def _logprob_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        description="A prompt string or a list of token ids; or a list of such prompts, each its own "
        "n choices (prompt i's choice j has index i*n + j)."
    )
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    response_format: ResponseFormat | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        return value

    def prompt_list(self) -> list[tuple[str, str | list[int]]]:
        """(param, prompt) for each prompt: `prompt` for one, `prompt[i]` for each of a list."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [("prompt", self.prompt)]  # type: ignore[list-item]
        return [(f"prompt[{i}]", item) for i, item in enumerate(self.prompt)]  # type: ignore[misc]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(ChatFeatures):
    model_config = _STRICT
    model: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if self.prompt is not None:
            chat_only = ("tools", "tool_choice", "documents", "response_format", "citation_mode")
            given = [name for name in chat_only if getattr(self, name) is not None]
            given += ["continue_final_message"] if self.continue_final_message else []
            if given:
                raise ValueError(f"{given[0]} applies to messages, not to a raw prompt")
        return self


# ---------------------------------------------------------------- responses


def _absent(value: Any) -> bool:
    return value is None


class PromptTruncation(BaseModel):
    """Extension: what `truncate_prompt_tokens` did to the prompt (present when the request set it)."""

    side: Literal["left", "right"]
    limit: int = Field(description="The prompt budget applied: truncate_prompt_tokens, less room for max_tokens.")
    prompt_tokens_before: int
    tokens_removed: int
    messages_truncated: list[int] | None = Field(
        None, exclude_if=_absent, description="Chat: messages whose content was shortened (by index)."
    )
    messages_dropped: list[int] | None = Field(
        None, exclude_if=_absent, description="Chat: earlier exchanges' messages removed whole."
    )
    documents_truncated: list[int] | None = Field(
        None, exclude_if=_absent, description="Chat: documents whose text was shortened."
    )
class PromptLogprob(BaseModel):
    """vLLM's `Logprob`, as its responses' `prompt_logprobs` carry it."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per prompt token: None for the first, else token id → its log probability.
PromptLogprobList = list[dict[int, PromptLogprob] | None]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class _OmitsAbsentExtensions(BaseModel):
    """Extension fields (`_EXTENSIONS`) are left out when unset, so plain OpenAI clients see OpenAI's shape."""

    _EXTENSIONS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_absent_extensions(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in self._EXTENSIONS:
            if data.get(key) is None:
                data.pop(key, None)
        return data


class ResponseMessage(_OmitsAbsentExtensions):
    _EXTENSIONS = ("tool_calls", "citations")
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None
    citations: list[CitationRef] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


def _now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None
    prompt_truncation: PromptTruncation | None = Field(None, exclude_if=_absent)
    prompt_logprobs: PromptLogprobList | None = None


class _DeltaModel(BaseModel):
    """Stream deltas carry only what they set, as OpenAI's do (`{}` on the closing chunk)."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DeltaModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DeltaModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_DeltaModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    citations: list[CitationRef] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_truncation: PromptTruncation | None = Field(None, exclude_if=_absent)  # on the first chunk


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_OmitsAbsentExtensions):
    _EXTENSIONS = ("prompt_logprobs", "prompt_token_ids")
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    # vLLM's per-choice extensions: its prompt's logprobs, and its prompt's ids (`return_token_ids`)
    prompt_logprobs: PromptLogprobList | None = None
    prompt_token_ids: list[int] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
    prompt_truncation: PromptTruncation | None = Field(None, exclude_if=_absent)  # streamed: on the first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "jamba-server"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    prompt: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
