"""Structural bounds on client JSON: nesting and regex patterns, checked without recursion."""

import pytest

from jamba_server.core.input_limits import (
    MAX_JSON_NESTING,
    MAX_PATTERN_GROUP_NESTING,
    MAX_PATTERN_LENGTH,
    check_nesting,
    check_schema_limits,
    exceeds_nesting,
    pattern_group_depth,
)
from jamba_server.errors import InvalidRequestError


def chain(levels: int) -> dict:
    """`levels` nested objects: {"a": {"a": ... {}}}."""
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_nesting_counts_objects_and_arrays_from_one():
    assert not exceeds_nesting(chain(64), 64) and exceeds_nesting(chain(65), 64)
    assert not exceeds_nesting([[[]]], 3) and exceeds_nesting([[[[]]]], 3)
    assert not exceeds_nesting({"a": "x", "b": [1, 2]}, 2) and exceeds_nesting({"a": [{}]}, 2)
    assert not exceeds_nesting("scalar", 0) and not exceeds_nesting(None, 0)


def test_nesting_check_is_iterative():
    assert exceeds_nesting(chain(100_000), MAX_JSON_NESTING)  # far past Python's recursion limit


def test_nesting_matches_vllms_count():
    from vllm.sampling_params import MAX_STRUCTURED_OUTPUT_JSON_NESTING, _exceeds_json_nesting

    assert MAX_JSON_NESTING == MAX_STRUCTURED_OUTPUT_JSON_NESTING
    for value in (chain(64), chain(65), [[{"a": [1]}]], {"a": {"b": [], "c": {"d": {}}}}):
        for limit in (2, 3, 4, 64):
            assert exceeds_nesting(value, limit) == _exceeds_json_nesting(value, limit), (value, limit)


@pytest.mark.parametrize(
    "pattern, depth",
    [
        ("abc", 0),
        ("(a)(b)", 1),
        ("((a)|(?:b(c)))", 3),
        (r"\(\(\(", 0),  # escaped
        ("[(((]", 0),  # inside a class
        ("[]((]", 0),  # `]` first in a class is literal
        ("[^]((]", 0),
        (r"[\]((]", 0),
        ("(" * 500 + "a" + ")" * 500, 500),
    ],
)
def test_pattern_group_depth(pattern, depth):
    assert pattern_group_depth(pattern) == depth


def nested_object(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    "schema, says",
    [
        (nested_object(150), "nested too deeply"),
        ({"type": "string", "pattern": "(" * 500 + "a" + ")" * 500}, "groups nested"),
        ({"type": "string", "pattern": "(?:" * 500 + "a" + ")" * 500}, "groups nested"),
        ({"type": "string", "pattern": "a" * (MAX_PATTERN_LENGTH + 1)}, "characters long"),
        ({"type": "object", "patternProperties": {"(" * 500 + "a" + ")" * 500: {}}}, "groups nested"),
        ({"type": "object", "properties": {"x": {"type": "string", "pattern": "(" * 40 + ")" * 40}}}, "groups nested"),
    ],
)
def test_schema_limits_reject(schema, says):
    with pytest.raises(InvalidRequestError) as info:
        check_schema_limits(schema, "the.param")
    assert info.value.param == "the.param" and says in info.value.message


def test_schema_limits_accept_what_is_within_them():
    ok_pattern = "(" * MAX_PATTERN_GROUP_NESTING + "a" + ")" * MAX_PATTERN_GROUP_NESTING
    check_schema_limits({"type": "string", "pattern": ok_pattern}, "p")
    check_schema_limits(chain(MAX_JSON_NESTING), "p")
    # a property named "pattern" is a schema, not a regex
    check_schema_limits({"type": "object", "properties": {"pattern": {"type": "string"}}}, "p")
    with pytest.raises(InvalidRequestError):
        check_schema_limits(chain(MAX_JSON_NESTING), "p", max_nesting=MAX_JSON_NESTING - 1)


def test_check_nesting_names_the_param():
    check_nesting(chain(MAX_JSON_NESTING), "args")
    with pytest.raises(InvalidRequestError) as info:
        check_nesting(chain(MAX_JSON_NESTING + 1), "args")
    assert info.value.param == "args"
