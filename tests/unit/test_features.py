"""Chat features → template inputs, constraints and parsing; every 400 the plan raises."""

import jsonschema
import pytest

from jamba_server.core.features import TOOL_BLOCK_PREFIX, plan_chat
from jamba_server.errors import InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}},
            "required": ["city"],
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
MSG = [{"role": "user", "content": "hi"}]
DOCS = [{"text": "alpha", "title": "A"}, {"text": "beta", "source": "wiki"}]


def plan(**fields):
    return plan_chat(ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields}))


def test_plain_request_has_no_extras():
    p = plan()
    assert p.template_inputs == {"conversation": [{"role": "user", "content": "hi"}]}
    assert p.constraint is None and p.prompt_suffix == "" and p.banned_tokens == ()
    assert p.parser.tool_names is None and p.parser.citation_mode is False


def test_auto_renders_tools_and_stays_unconstrained():
    p = plan(tools=[WEATHER, ADD])
    assert [t["function"]["name"] for t in p.template_inputs["tools"]] == ["get_weather", "add"]
    assert p.constraint is None and p.parser.tool_names == {"get_weather", "add"}


def test_none_hides_tools_and_bans_the_tag():
    p = plan(tools=[WEATHER], tool_choice="none")
    assert "tools" not in p.template_inputs
    assert p.banned_tokens == ("<tool_calls>",) and p.parser.tool_names is None


def _valid(schema, value):
    try:
        jsonschema.validate(value, schema)
        return True
    except jsonschema.ValidationError:
        return False


def test_required_constrains_to_declared_calls():
    p = plan(tools=[WEATHER, ADD], tool_choice="required")
    schema = p.constraint.value
    assert p.prompt_suffix == TOOL_BLOCK_PREFIX and p.parser.starts_in_tool_block
    assert _valid(schema, [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "add", "arguments": {"a": 1}}])
    assert not _valid(schema, [])
    assert not _valid(schema, [{"name": "nope", "arguments": {}}])
    assert not _valid(schema, [{"name": "get_weather", "arguments": {"city": "Rome"}}])


def test_named_choice_and_parallel_false_allow_one_call():
    named = plan(tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}}).constraint.value
    assert _valid(named, [{"name": "add", "arguments": {"a": 3}}])
    assert not _valid(named, [{"name": "get_weather", "arguments": {"city": "Paris"}}])
    assert not _valid(named, [{"name": "add", "arguments": {}}] * 2)
    single = plan(tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    assert single.constraint.value["maxItems"] == 1 and not single.parser.parallel_tool_calls


def test_documents_and_knobs():
    p = plan(documents=DOCS, citation_mode="fast", response_format={"type": "json_object"})
    assert p.template_inputs["documents"] == [{"text": "alpha", "title": "A"}, {"text": "beta", "source": "wiki"}]
    assert p.template_inputs["knobs"] == {"citation_mode": "fast", "response_format": "json_object", "is_set": True}
    assert p.constraint.value == {"type": "object"}
    assert p.parser.document_titles == ("A", None) and p.parser.citation_mode
    assert set(p.feature_labels) == {"documents", "json_mode"}


def test_json_schema_is_the_constraint():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}
    p = plan(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert p.constraint.value == schema and p.template_inputs["knobs"]["response_format"] == "json_object"


def test_text_format_has_no_knob():
    assert "knobs" not in plan(response_format={"type": "text"}).template_inputs


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"citation_mode": "fast"}, "citation_mode"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools[0].function.parameters"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_feature_errors(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        plan(**fields)
    assert info.value.param == param


@pytest.mark.parametrize(
    "fields",
    [
        {"documents": [{"title": "no text"}]},
        {"documents": [{"text": "t", "year": 1999}]},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "xml"}},
        {"citation_mode": "slow"},
        {"messages": [{"role": "user", "content": "x", "citations": [0]}]},
    ],
)
def test_request_shape_errors(fields):
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields})
    assert type(info.value).__name__ == "ValidationError"


# ---------------------------------------------------------------- client input that gave 500s


def nested_schema(depth):
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def nested_args(levels):
    """`levels` nested objects: {"a": {"a": ... {}}}."""
    args = {}
    for _ in range(levels - 1):
        args = {"a": args}
    return args


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


NESTED_GROUPS = "(" * 500 + "a" + ")" * 500
SCHEMA_PARAM = "response_format.json_schema.schema"
TOOL_PARAM = "tools[0].function.parameters"


def tool(parameters):
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


def tool_call_history(arguments):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": json_schema_format(nested_schema(150))}, SCHEMA_PARAM),
        ({"response_format": json_schema_format({"type": "string", "pattern": NESTED_GROUPS})}, SCHEMA_PARAM),
        ({"response_format": json_schema_format({"type": "object", "patternProperties": {NESTED_GROUPS: {}}})}, SCHEMA_PARAM),
        ({"response_format": json_schema_format({"type": "string", "pattern": "a{99999999999}"})}, SCHEMA_PARAM),
        ({"response_format": json_schema_format({"$schema": []})}, SCHEMA_PARAM),
        ({"tools": [tool(nested_schema(150))]}, TOOL_PARAM),  # checked with tool_choice auto too
        ({"tools": [tool(nested_schema(150))], "tool_choice": "required"}, TOOL_PARAM),
        ({"tools": [tool({"type": "string", "pattern": NESTED_GROUPS})], "tool_choice": {"type": "function", "function": {"name": "f"}}}, TOOL_PARAM),
        ({"tools": [tool({"$schema": {}})]}, TOOL_PARAM),
        ({"messages": tool_call_history(nested_args(900))}, "messages[1].tool_calls[0].function.arguments"),
    ],
)
def test_input_that_gave_500s_is_a_400_naming_the_field(fields, param):
    with pytest.raises(InvalidRequestError) as info:
        plan(**fields)
    assert info.value.param == param


def test_a_checker_running_out_of_stack_is_the_clients_400(monkeypatch):
    """Past our bounds, whatever a schema checker cannot take is still the client's schema."""
    import jamba_server.core.constraints as constraints

    class Exhausted:
        def check_schema(self, schema):
            raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(constraints, "validator_for", lambda schema: Exhausted())
    constraints.metaschema_problem.cache_clear()  # the memo must not answer for the checker
    try:
        with pytest.raises(InvalidRequestError) as info:
            plan(response_format=json_schema_format({"type": "object"}))
    finally:
        constraints.metaschema_problem.cache_clear()
    assert info.value.param == SCHEMA_PARAM and "recursion" not in info.value.message


def test_bounds_leave_room_for_the_tool_call_wrapper():
    """A forced tool call nests each tool's parameters inside its own schema; a tool schema within
    its bound must still be within vLLM's once wrapped (the deepest wrapping: several tools)."""
    from jamba_server.core.features import tool_calls_schema
    from jamba_server.core.input_limits import MAX_JSON_NESTING, MAX_TOOL_PARAMETERS_NESTING, exceeds_nesting

    deepest = nested_args(MAX_TOOL_PARAMETERS_NESTING)
    p = plan(tools=[tool(deepest), {**tool({}), "function": {"name": "g", "parameters": deepest}}], tool_choice="required")
    assert not exceeds_nesting(p.constraint.value, MAX_JSON_NESTING)
    assert exceeds_nesting(p.constraint.value, MAX_JSON_NESTING - 1)  # the bound is tight, not loose
    with pytest.raises(InvalidRequestError):
        plan(tools=[tool(nested_args(MAX_TOOL_PARAMETERS_NESTING + 1))])
    assert tool_calls_schema  # imported for the docstring's claim


def test_schemas_within_bounds_plan():
    from jamba_server.core.input_limits import MAX_JSON_NESTING

    deepest = nested_args(MAX_JSON_NESTING)
    p = plan(response_format=json_schema_format({"type": "object", "properties": {"a": {"type": "string", "pattern": "^(a(b(c)))$"}}, "x": deepest["a"]}))
    assert p.constraint is not None
    plan(messages=tool_call_history(nested_args(MAX_JSON_NESTING)))
