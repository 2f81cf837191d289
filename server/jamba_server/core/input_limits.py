"""Structural bounds on client JSON the server interprets: JSON schemas (a response format's, tool
parameters), their regex patterns, and tool-call arguments. Checked here, iteratively, before any
recursive consumer sees them.

Those consumers recurse per nesting level: jsonschema's metaschema check (several frames per
level; a 150-level schema exhausted Python's stack), Python's regex parser, which jsonschema runs on
every `pattern` (about two frames per group; 500 nested groups exhausted it), xgrammar, and the
prompt builder and chat template walking tool-call arguments. Past their limits they raised
RecursionError, a 500 with a ~150 KB traceback for a few KB of request. Each bound here is far
above what real schemas use and far below where those consumers fail.
"""

from __future__ import annotations

from typing import Any

from jamba_server.errors import InvalidRequestError

MAX_JSON_NESTING = 64
"""Objects and arrays may nest at most this many levels (the outermost is level 1). This is vLLM's
own bound on structured-output schemas (`MAX_STRUCTURED_OUTPUT_JSON_NESTING`, counted the same way;
a unit test keeps them equal), applied before jsonschema, which fails near 200 levels. OpenAI allows
10 levels of schema nesting, about 20 here (an object schema and its `properties` are 2 levels)."""

TOOL_CALL_WRAPPER_NESTING = 5
"""Levels a forced tool call's schema puts above a tool's parameters (`features.tool_calls_schema`
with several tools: array, `items`, `anyOf`, the call object, its `properties`)."""

MAX_TOOL_PARAMETERS_NESTING = MAX_JSON_NESTING - TOOL_CALL_WRAPPER_NESTING
"""A tool's parameters nest at most this deep, so a forced call's schema stays within vLLM's bound."""

MAX_PATTERN_GROUP_NESTING = 32
"""Regex groups (`(...)`, `(?:...)`) may nest at most this deep: real patterns nest a few; Python's
regex parser, at about two frames per group, stays far from the recursion limit."""

MAX_PATTERN_LENGTH = 4096
"""Characters in one `pattern` or `patternProperties` key: an email or date pattern is under 200."""

# Where a JSON schema holds regexes: the value of `pattern`, the keys of `patternProperties`.
_PATTERN_KEY = "pattern"
_PATTERN_MAP_KEY = "patternProperties"


def exceeds_nesting(value: Any, limit: int) -> bool:
    """Whether `value` nests objects and arrays more than `limit` levels deep. Breadth-first and
    stopping past `limit`, so any depth is safe to check."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
        if not level:
            return False
    return bool(level)


def check_nesting(value: Any, param: str, *, limit: int = MAX_JSON_NESTING, what: str = "the value") -> None:
    if exceeds_nesting(value, limit):
        raise InvalidRequestError(
            f"{what} is nested too deeply: objects and arrays may nest at most {limit} levels", param=param
        )


def pattern_group_depth(pattern: str) -> int:
    """How deep `pattern`'s groups nest, counting unescaped `(` outside character classes."""
    depth = deepest = 0
    in_class = False
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if in_class:
            if ch == "]":
                in_class = False
        elif ch == "[":
            in_class = True
            if pattern.startswith("^", i + 1):
                i += 1
            if pattern.startswith("]", i + 1):  # `]` first in a class is a literal
                i += 1
        elif ch == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif ch == ")":
            depth = max(depth - 1, 0)
        i += 1
    return deepest


def _check_pattern(pattern: str, param: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise InvalidRequestError(
            f"a regex pattern in the JSON schema is {len(pattern)} characters long (limit {MAX_PATTERN_LENGTH})",
            param=param,
        )
    depth = pattern_group_depth(pattern)
    if depth > MAX_PATTERN_GROUP_NESTING:
        raise InvalidRequestError(
            f"a regex pattern in the JSON schema has groups nested {depth} deep (limit {MAX_PATTERN_GROUP_NESTING})",
            param=param,
        )


def _patterns(schema: dict[str, Any]) -> list[str]:
    """Every regex in `schema` (iteratively; call after the nesting check)."""
    found: list[str] = []
    stack: list[Any] = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get(_PATTERN_KEY), str):
                found.append(node[_PATTERN_KEY])
            if isinstance(node.get(_PATTERN_MAP_KEY), dict):
                found.extend(node[_PATTERN_MAP_KEY])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def check_schema_limits(schema: dict[str, Any], param: str, *, max_nesting: int = MAX_JSON_NESTING) -> None:
    """Reject a JSON schema nested deeper than `max_nesting`, or holding a regex too long or too
    deeply grouped; `param` names the request field for the 400."""
    check_nesting(schema, param, limit=max_nesting, what="the JSON schema")
    for pattern in _patterns(schema):
        _check_pattern(pattern, param)
