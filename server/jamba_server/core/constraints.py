"""Output constraints: what a request's `response_format` or vLLM's `structured_outputs` asks the
output to match, as one `OutputConstraint` (a kind, its value, the request field it came from).

Each is checked here as far as it can be without the grammar backend (sizes, nesting, a JSON schema
against its metaschema, a structural tag being a JSON object); the engine adapter then compiles it
with vLLM's own xgrammar validation (runtime/vllm_engine.py, `engine_params`), so a constraint the
backend cannot take is a 400 naming its field before admission, never an engine error.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for

from jamba_server.core.input_limits import MAX_JSON_NESTING, check_nesting, check_schema_limits
from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ResponseFormat, StructuredOutputs

ANY_OBJECT: dict[str, Any] = {"type": "object"}

ConstraintKind = Literal["json", "regex", "choice", "grammar", "structural_tag"]

STRUCTURAL_TAG_WRAPPER_NESTING = 6
"""Levels a structural tag may put above the JSON schemas it holds (vLLM's
`STRUCTURAL_TAG_WRAPPER_NESTING`, counted the same way)."""


@dataclass(frozen=True)
class OutputConstraint:
    """The grammar the output must match (vLLM structured outputs on xgrammar, no free whitespace).

    `value` by kind: `json` a JSON schema (dict); `regex`, `grammar` the text; `choice` a tuple of
    strings; `structural_tag` the tag as JSON text (what vLLM takes)."""

    kind: ConstraintKind
    value: Any
    param: str  # the request field it came from, for errors

    @property
    def is_json(self) -> bool:
        return self.kind == "json"

    @property
    def free_text_is_json(self) -> bool:
        """Whether all the output chooses freely is JSON: a schema, or a structural tag of JSON
        contents and fixed strings only (no free text, regex or grammar). Such output never needs a
        raw control character, which xgrammar 0.2.8's length-bounded JSON strings would admit."""
        if self.kind == "json":
            return True
        if self.kind != "structural_tag":
            return False
        tag = json.loads(self.value)
        if "structures" in tag:  # the legacy form: free text until a trigger
            return False
        return all(
            node.get("type") in _FIXED_OR_JSON and node.get("style", "json") == "json"
            for node in _format_nodes(tag.get("format"))
        )

    def vllm_fields(self) -> dict[str, Any]:
        """The constraint as `StructuredOutputsParams` keyword arguments."""
        return {self.kind: list(self.value) if self.kind == "choice" else self.value}


def check_schema(schema: dict[str, Any], param: str, max_nesting: int = MAX_JSON_NESTING) -> None:
    """Bounds first (no recursion), then jsonschema's metaschema check; whatever the checker cannot
    take is still the client's schema: a 400 naming `param`, never a 500."""
    check_schema_limits(schema, param, max_nesting=max_nesting)
    problem = metaschema_problem(schema)
    if problem is not None:
        raise InvalidRequestError(problem, param=param)


MEMO_ENTRIES = 512
MEMO_MAX_CHARS = 64 * 1024  # a bigger value is checked every time: the memo holds at most 32 MiB


def memoized_check(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    """`check` (pure: a JSON value → its problem, or None) remembered for the last `MEMO_ENTRIES`
    values by their JSON text. Production clients send the same tools and schemas request after
    request, and a metaschema or grammar check costs milliseconds: more than generating the reply's
    tokens costs the API process."""
    remembered = functools.lru_cache(maxsize=MEMO_ENTRIES)(lambda text: check(json.loads(text)))

    def run(value: Any) -> str | None:
        try:
            text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            return check(value)
        return remembered(text) if len(text) <= MEMO_MAX_CHARS else check(value)

    run.cache_clear = remembered.cache_clear  # type: ignore[attr-defined]
    return run


@memoized_check
def metaschema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON schema (jsonschema's metaschema check), or None."""
    if not isinstance(schema.get("$schema", ""), str):  # validator_for looks it up in a dict
        return "invalid JSON schema: `$schema` must be a URI string"
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return f"invalid JSON schema: {exc.message}"
    except RecursionError:
        return "invalid JSON schema: it nests too deeply to check"
    except OverflowError as exc:  # a regex repeat count past what Python's `re` takes
        return f"invalid JSON schema: a pattern cannot be compiled: {exc}"
    return None


def _json_object_text(value: str | dict[str, Any], param: str, what: str, nesting: int) -> dict[str, Any]:
    """A JSON object given as an object or as a string holding one, nesting bounded."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise InvalidRequestError(f"{what} nests too deeply", param=param) from None
        except ValueError as exc:
            raise InvalidRequestError(f"{what} is not valid JSON: {exc}", param=param) from None
        if not isinstance(value, dict):
            raise InvalidRequestError(f"{what} must be a JSON object", param=param)
    check_nesting(value, param, limit=nesting, what=what)
    return value


# Structural-tag formats that hold no free text: fixed strings, JSON, and their combinations.
_FIXED_OR_JSON = frozenset({"const_string", "json_schema", "sequence", "or", "tag", "tags_with_separator"})


def _format_nodes(root: Any) -> list[dict[str, Any]]:
    """Every format object in a structural tag's format tree (iteratively; not inside schemas)."""
    found: list[dict[str, Any]] = []
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            if "type" in node:
                found.append(node)
            # A schema holds no formats: only the format tree is walked.
            stack.extend(v for k, v in node.items() if k != "json_schema")
    return found


def _bounded_whitespace(tag: dict[str, Any]) -> dict[str, Any]:
    """The tag with each JSON content (a `json_schema` format in `json` style) that does not set
    `max_whitespace_cnt` given 1: xgrammar compiles a tag's JSON itself, without the server's
    no-free-whitespace setting, and takes no 0, so one whitespace character in a row is the nearest
    bound (a bounded schema stays bounded). A client's own `max_whitespace_cnt` is kept; the legacy
    `structures` form has no such field and keeps xgrammar's whitespace. Copies what it changes."""
    if "structures" in tag:
        return tag
    tag = copy.deepcopy(tag)
    for node in _format_nodes(tag.get("format")):
        if node.get("type") == "json_schema" and node.get("style", "json") == "json":
            node.setdefault("max_whitespace_cnt", 1)
    return tag


def response_format_constraint(fmt: ResponseFormat | None) -> OutputConstraint | None:
    """`text` (or none): no constraint; `json_object`: any object; `json_schema`: its schema, checked."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.json_schema is not None:
        param = "response_format.json_schema.schema"
        check_schema(fmt.json_schema.schema_, param)
        return OutputConstraint("json", fmt.json_schema.schema_, param)
    return OutputConstraint("json", ANY_OBJECT, "response_format")


def constraint_bytes(so: StructuredOutputs) -> int:
    """The size of a `structured_outputs` constraint's text (bounded by `max_schema_bytes`)."""
    value = so.value(so.kind())
    if isinstance(value, list):
        return sum(len(item.encode("utf-8")) for item in value)
    if isinstance(value, bool):
        return 0
    return len((value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)).encode("utf-8"))


def structured_outputs_constraint(so: StructuredOutputs) -> OutputConstraint:
    """vLLM's `structured_outputs` (one kind, already checked by the protocol model, its size by
    core/limits.py), checked as far as it can be without the grammar backend."""
    kind = so.kind()
    value = so.value(kind)
    param = f"structured_outputs.{kind}"
    if kind == "json_object":
        return OutputConstraint("json", ANY_OBJECT, param)
    if kind == "json":
        schema = _json_object_text(value, param, "the JSON schema", MAX_JSON_NESTING)
        check_schema(schema, param)
        return OutputConstraint("json", schema, param)
    if kind == "structural_tag":
        tag = _json_object_text(value, param, "the structural tag", MAX_JSON_NESTING + STRUCTURAL_TAG_WRAPPER_NESTING)
        return OutputConstraint("structural_tag", json.dumps(_bounded_whitespace(tag), ensure_ascii=False), param)
    if kind in ("regex", "grammar") and "\x00" in value:
        raise InvalidRequestError(f"{param} must not contain a NUL character", param=param)
    if kind in ("regex", "grammar") and not value.strip():
        raise InvalidRequestError(f"{param} is empty", param=param)
    return OutputConstraint(kind, tuple(value) if kind == "choice" else value, param)


def output_constraint(
    response_format: ResponseFormat | None, structured_outputs: StructuredOutputs | None
) -> OutputConstraint | None:
    """The request's one output constraint: `response_format` JSON and `structured_outputs` are two
    ways to say it, so both together are a 400 (a `text` response format constrains nothing)."""
    if structured_outputs is None:
        return response_format_constraint(response_format)
    if response_format is not None and response_format.type != "text":
        raise InvalidRequestError(
            f"structured_outputs cannot be combined with response_format {response_format.type}: "
            "give one output constraint",
            param="structured_outputs",
        )
    return structured_outputs_constraint(structured_outputs)
