"""Output constraints beyond chat's JSON mode: vLLM's `structured_outputs` (json, regex, choice,
grammar, json_object, structural_tag) on chat and completions, `response_format` on completions; the
one-constraint rule, the conflicts with chat's other constraints, the size limit, and the grammar
backend's compile check (vLLM's own xgrammar validation, run here without an engine)."""

from __future__ import annotations

import json

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from jamba_server.core.constraints import OutputConstraint, output_constraint
from jamba_server.core.features import plan_chat
from jamba_server.core.parsing import ParserConfig, parse_output
from jamba_server.core.prepare import prepare_chat, prepare_completion
from jamba_server.errors import InvalidRequestError, RequestTooLargeError
from jamba_server.http.errors import validation_error
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest, StructuredOutputs
from jamba_server.runtime.vllm_engine import EngineAdapter
from jamba_server.settings import DEFAULT_TEMPLATE, Settings
from tests.support import answer_tag

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
SPECIAL = set(range(14))  # the dev tokenizer's control tokens; 2 and 5 end a turn
CONTROL_CHARACTER = 210  # a dev-tokenizer token whose text is a control character (checked below)
SETTINGS = Settings(model="m", max_tokens_limit=64)
MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TAG = answer_tag("f", SCHEMA)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MSG, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def wire_error(body: dict, model: type = ChatCompletionRequest) -> InvalidRequestError:
    """The 400 the app returns for a body the protocol model rejects."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    return validation_error(RequestValidationError(errors))


# ---------------------------------------------------------------- the request object


@pytest.mark.parametrize(
    "so, param",
    [
        ({}, "structured_outputs"),  # no kind
        ({"regex": "a", "choice": ["a"]}, "structured_outputs"),  # two kinds
        ({"json": SCHEMA, "json_object": True}, "structured_outputs"),
        ({"grammar": "root ::= \"a\"", "structural_tag": TAG}, "structured_outputs"),
        ({"regex": "a", "backend": "guidance"}, "structured_outputs.backend"),  # unknown field
        ({"regex": "a", "_backend": "xgrammar"}, "structured_outputs._backend"),
        ({"json_object": False}, "structured_outputs.json_object"),
        ({"regex": "a", "disable_any_whitespace": False}, "structured_outputs.disable_any_whitespace"),
        ({"regex": "a", "disable_additional_properties": True}, "structured_outputs.disable_additional_properties"),
        ({"regex": "a", "whitespace_pattern": " ?"}, "structured_outputs.whitespace_pattern"),
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": "red"}, "structured_outputs.choice"),
        ({"json": 5}, "structured_outputs.json"),
        ("regex", "structured_outputs"),
    ],
)
@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_the_request_object_is_one_kind_with_known_fields(so, param, model):
    base = {"model": "m", "messages": MSG} if model is ChatCompletionRequest else {"model": "m", "prompt": "hi"}
    error = wire_error({**base, "structured_outputs": so}, model)
    assert error.param.split(".dict[")[0] == param and error.message.startswith(param), error.message  # a union adds its member


def test_vllms_field_names_and_the_options_this_server_always_has():
    """Field for field vLLM 0.32's StructuredOutputsParams (its private `_backend` fields aside)."""
    from dataclasses import fields

    from vllm.sampling_params import StructuredOutputsParams

    wire = {f.alias or name for name, f in StructuredOutputs.model_fields.items()}
    assert wire == {f.name for f in fields(StructuredOutputsParams) if not f.name.startswith("_")}
    accepted = chat(structured_outputs={"regex": "a", "disable_any_whitespace": True, "disable_additional_properties": False})
    assert accepted.structured_outputs.kind() == "regex"


# ---------------------------------------------------------------- kinds → constraints


@pytest.mark.parametrize(
    "so, expected",
    [
        ({"json": SCHEMA}, OutputConstraint("json", SCHEMA, "structured_outputs.json")),
        ({"json": json.dumps(SCHEMA)}, OutputConstraint("json", SCHEMA, "structured_outputs.json")),
        ({"json_object": True}, OutputConstraint("json", {"type": "object"}, "structured_outputs.json_object")),
        ({"regex": "[a-z]+"}, OutputConstraint("regex", "[a-z]+", "structured_outputs.regex")),
        ({"choice": ["a", "b"]}, OutputConstraint("choice", ("a", "b"), "structured_outputs.choice")),
        ({"grammar": 'root ::= "a"'}, OutputConstraint("grammar", 'root ::= "a"', "structured_outputs.grammar")),
    ],
)
def test_each_kind_becomes_one_constraint(so, expected):
    assert output_constraint(None, StructuredOutputs.model_validate(so)) == expected
    assert output_constraint(None, StructuredOutputs.model_validate(so)).vllm_fields() == {
        expected.kind: list(expected.value) if expected.kind == "choice" else expected.value
    }


def test_a_structural_tag_object_or_string_becomes_its_json_text_with_bounded_whitespace():
    as_object = output_constraint(None, StructuredOutputs.model_validate({"structural_tag": TAG}))
    as_string = output_constraint(None, StructuredOutputs.model_validate({"structural_tag": json.dumps(TAG)}))
    assert as_object == as_string and as_object.kind == "structural_tag"
    content = json.loads(as_object.value)["format"]["elements"][1]["content"]
    # xgrammar compiles a tag's JSON without the server's no-free-whitespace setting and takes no 0.
    assert content["max_whitespace_cnt"] == 1 and content["json_schema"] == SCHEMA
    assert "max_whitespace_cnt" not in TAG["format"]["elements"][1]["content"]  # the request is not changed
    own = json.loads(json.dumps(TAG))
    own["format"]["elements"][1]["content"]["max_whitespace_cnt"] = 4
    kept = output_constraint(None, StructuredOutputs.model_validate({"structural_tag": own}))
    assert json.loads(kept.value)["format"]["elements"][1]["content"]["max_whitespace_cnt"] == 4
    legacy = {"structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f>"]}
    assert json.loads(output_constraint(None, StructuredOutputs.model_validate({"structural_tag": legacy})).value) == legacy


def test_control_characters_are_banned_where_all_free_output_is_json(engine):
    """xgrammar 0.2.8's length-bounded JSON strings admit raw control characters: output whose free
    part is all JSON (a schema, a tag of JSON and fixed strings) is steered off them, as JSON mode
    is; a regex, grammar or a tag with free text may need a newline, and keeps them."""
    free_text = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<f>"], "tags": [TAG["format"]["elements"][1]]}}
    any_text = json.loads(json.dumps(TAG))
    any_text["format"]["elements"][1]["content"] = {"type": "any_text"}
    legacy = {"structures": [{"begin": "<f>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f>"]}
    cases = [({"json": SCHEMA}, True), ({"structural_tag": TAG}, True), ({"structural_tag": free_text}, False),
             ({"structural_tag": any_text}, False), ({"structural_tag": legacy}, False), ({"regex": "[a-z]+"}, False),
             ({"grammar": 'root ::= "a"'}, False), ({"choice": ["a"]}, False)]  # fmt: skip
    for so, expected in cases:
        constraint = output_constraint(None, StructuredOutputs.model_validate(so))
        assert constraint.free_text_is_json is expected, so
        job = prepare_completion(completion(structured_outputs=so), engine, SETTINGS)
        assert (CONTROL_CHARACTER in job.engine_params.logit_bias) is expected, so


@pytest.mark.parametrize(
    "so, param, words",
    [
        ({"json": "{not json"}, "structured_outputs.json", "not valid JSON"),
        ({"json": "[1, 2]"}, "structured_outputs.json", "JSON object"),
        ({"json": {"type": "nonsense"}}, "structured_outputs.json", "invalid JSON schema"),
        ({"json": json.dumps({"type": "object", "properties": {"a": {"minimum": "x"}}})}, "structured_outputs.json", "invalid JSON schema"),
        ({"json": "[" * 5000 + "]" * 5000}, "structured_outputs.json", "nest"),
        ({"structural_tag": "nope"}, "structured_outputs.structural_tag", "not valid JSON"),
        ({"structural_tag": "[]"}, "structured_outputs.structural_tag", "JSON object"),
        ({"regex": ""}, "structured_outputs.regex", "empty"),
        ({"regex": "a\x00b"}, "structured_outputs.regex", "NUL"),
        ({"grammar": "  \n"}, "structured_outputs.grammar", "empty"),
    ],
)
def test_what_can_be_checked_before_the_grammar_backend_is_a_400_naming_the_kind(so, param, words):
    with pytest.raises(InvalidRequestError) as info:
        output_constraint(None, StructuredOutputs.model_validate(so))
    assert info.value.param == param and words in info.value.message


def test_response_format_and_structured_outputs_are_one_constraint_not_two():
    from jamba_server.protocol import ResponseFormat

    so = StructuredOutputs.model_validate({"regex": "a"})
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}):
        with pytest.raises(InvalidRequestError) as info:
            output_constraint(ResponseFormat.model_validate(fmt), so)
        assert info.value.param == "structured_outputs" and fmt["type"] in info.value.message
    assert output_constraint(ResponseFormat(type="text"), so).kind == "regex"


# ---------------------------------------------------------------- chat


def test_chat_with_structured_outputs_returns_the_reply_verbatim():
    plan = plan_chat(chat(structured_outputs={"choice": ["<tool_calls>[]</tool_calls>", "plain"]}))
    assert plan.constraint.kind == "choice" and plan.parser.verbatim and not plan.json_mode
    assert plan.feature_labels == ("structured_outputs",)
    assert "knobs" not in plan.template_inputs  # the prompt is the client's: no JSON-mode knob
    # A reply that spells Jamba's tags is still content, exactly as generated.
    parsed = parse_output("<tool_calls>[]</tool_calls> <citations>[0]</citations>", plan.parser)
    assert parsed.content == "<tool_calls>[]</tool_calls> <citations>[0]</citations>" and not parsed.tool_calls


def test_json_mode_replies_are_verbatim_too():
    """A JSON string holding `<tool_calls>[...]</tool_calls>` was turned into a tool call (tools with
    auto) or lost its tags; a constrained reply is content."""
    for fields in ({"response_format": {"type": "json_object"}}, {"structured_outputs": {"json": SCHEMA}}):
        plan = plan_chat(chat(tools=[TOOL], **fields))
        assert plan.parser.verbatim and plan.json_mode
        text = '{"a":"<tool_calls>[{\\"name\\":\\"f\\",\\"arguments\\":{}}]</tool_calls>"}'
        parsed = parse_output(text.replace('\\"', '"'), plan.parser)
        assert parsed.content == text.replace('\\"', '"') and parsed.tool_calls == []


def test_a_forced_tool_call_is_still_parsed():
    plan = plan_chat(chat(tools=[TOOL], tool_choice="required"))
    assert plan.constraint.param == "tools" and not plan.parser.verbatim and not plan.json_mode


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}, "response_format"),
        ({"documents": [{"text": "d"}], "citation_mode": "fast"}, "citation"),
    ],
)
def test_chat_conflicts_are_400s_naming_structured_outputs(fields, words):
    with pytest.raises(InvalidRequestError) as info:
        plan_chat(chat(structured_outputs={"regex": "[a-z]+"}, **fields))
    assert info.value.param == "structured_outputs" and words in info.value.message


def test_what_goes_with_structured_outputs_on_chat():
    """tool_choice none (tools hidden), auto (as with response_format JSON: the constraint holds the
    reply, so the model cannot call a tool this turn), text response_format, documents without
    citation mode."""
    so = {"structured_outputs": {"choice": ["yes", "no"]}}
    none = plan_chat(chat(tools=[TOOL], tool_choice="none", **so))
    assert "tools" not in none.template_inputs and none.parser.verbatim
    auto = plan_chat(chat(tools=[TOOL], **so))
    assert auto.constraint.kind == "choice" and auto.parser.verbatim
    assert plan_chat(chat(response_format={"type": "text"}, **so)).constraint.kind == "choice"
    grounded = plan_chat(chat(documents=[{"text": "d"}], citation_mode="off", **so))
    assert grounded.template_inputs["documents"] == [{"text": "d"}] and grounded.parser.verbatim


# ---------------------------------------------------------------- prepare, limits, the engine check


class CheckingEngine:
    """What preparing a request needs of the engine, with the dev tokenizer and, for its
    parameters, the real adapter's mapping and compile check (vLLM's xgrammar validation: no engine)."""

    def __init__(self, dev_model):
        self.adapter = EngineAdapter(Settings(model=str(dev_model)))
        self.tokenizer = self.adapter.load_tokenizer()
        self.max_model_len, self.vocab_size = 1024, len(self.tokenizer)

    def engine_params(self, spec):
        return self.adapter.engine_params(spec)


@pytest.fixture(scope="module")
def engine(dev_model):
    return CheckingEngine(dev_model)


def test_completions_take_response_format_as_chat_does(engine):
    assert CONTROL_CHARACTER in engine.adapter._control_token_ids
    job = prepare_completion(completion(response_format={"type": "json_object"}), engine, SETTINGS)
    assert job.spec.constraint == OutputConstraint("json", {"type": "object"}, "response_format")
    assert job.json_mode and job.features == ("json_mode",)
    assert job.engine_params.structured_outputs.json == {"type": "object"}
    banned = {i for i, bias in job.engine_params.logit_bias.items() if bias == -100.0}
    # Tokens holding control characters, as in chat's JSON mode, and the control tokens but the end-of-turn ones.
    assert banned == set(engine.adapter._control_token_ids) | (SPECIAL - {2, 5}) and CONTROL_CHARACTER in banned
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    job = prepare_completion(completion(response_format=schema), engine, SETTINGS)
    assert job.spec.constraint.param == "response_format.json_schema.schema" and job.features == ("json_schema",)
    job = prepare_completion(completion(response_format={"type": "text"}), engine, SETTINGS)
    assert job.spec.constraint is None and not job.json_mode


def test_completions_take_structured_outputs(engine):
    job = prepare_completion(completion(structured_outputs={"regex": "[0-9]{3}"}), engine, SETTINGS)
    assert job.engine_params.structured_outputs.regex == "[0-9]{3}" and not job.json_mode
    # A regex may ask for a newline: only the control tokens are banned (xgrammar would match them
    # against the text they spell, and a detokenizer skipping special tokens then drops it).
    assert set(job.engine_params.logit_bias) == SPECIAL - {2, 5}
    assert job.features == ("structured_outputs",)
    job = prepare_completion(completion(structured_outputs={"choice": ["a", "b"]}), engine, SETTINGS)
    # Checked on a copy: vLLM's add_request validates the request's parameters itself and rewrites
    # the choice as a grammar there (the choice e2e test shows it takes effect).
    assert job.engine_params.structured_outputs.choice == ["a", "b"]
    with pytest.raises(InvalidRequestError) as info:
        prepare_completion(
            completion(structured_outputs={"regex": "a"}, response_format={"type": "json_object"}), engine, SETTINGS
        )
    assert info.value.param == "structured_outputs"


def test_a_constrained_chat_reply_is_detokenized_without_special_tokens(engine):
    plain = prepare_chat(chat(), engine, SETTINGS, TEMPLATE)
    constrained = prepare_chat(chat(structured_outputs={"regex": "[a-z]+"}), engine, SETTINGS, TEMPLATE)
    assert plain.spec.keep_special_tokens and not constrained.spec.keep_special_tokens
    ends = prepare_chat(chat(structured_outputs={"regex": "[a-z]+"}, stop_token_ids=[4]), engine, SETTINGS, TEMPLATE)
    assert 4 not in ends.engine_params.logit_bias  # a client's stop token still ends the output
    assert constrained.engine_params.skip_special_tokens and not plain.engine_params.skip_special_tokens


@pytest.mark.parametrize(
    "so, param, words",
    [
        ({"regex": "(abc"}, "structured_outputs.regex", "parenthesis is not closed"),
        ({"regex": "a(?=b)"}, "structured_outputs.regex", "Lookahead"),
        ({"grammar": "root ::= undefined_rule"}, "structured_outputs.grammar", "undefined_rule"),
        ({"grammar": 'root ::= "a" |'}, "structured_outputs.grammar", "EBNF"),
        ({"json": {"type": "integer", "multipleOf": 3}}, "structured_outputs.json", "not supported by xgrammar"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}}, "structured_outputs.structural_tag", "structural tag"),
        ({"structural_tag": {"type": "not_a_tag"}}, "structured_outputs.structural_tag", "structural tag"),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_what_the_grammar_backend_cannot_compile_is_a_400_naming_the_kind(engine, so, param, words, endpoint):
    with pytest.raises(InvalidRequestError) as info:
        if endpoint == "chat":
            prepare_chat(chat(structured_outputs=so), engine, SETTINGS, TEMPLATE)
        else:
            prepare_completion(completion(structured_outputs=so), engine, SETTINGS)
    assert info.value.param == param and words in info.value.message, info.value.message
    assert "[" not in info.value.message.split(":")[0]  # xgrammar's time and source location are dropped


@pytest.mark.parametrize(
    "so",
    [
        {"grammar": 'root ::= num ("+" num)*\nnum ::= [1-9] [0-9]?'},
        {"grammar": 'start: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'},  # Lark
        {"regex": "[a-z]{3,8}-[0-9]{2}"},
        {"choice": ["", "a\"b", "line\nbreak"]},
        {"structural_tag": TAG},
        {"json": SCHEMA},
        {"json_object": True},
    ],
)
def test_what_the_grammar_backend_compiles(engine, so):
    job = prepare_completion(completion(structured_outputs=so), engine, SETTINGS)
    assert job.engine_params.structured_outputs is not None


@pytest.mark.parametrize(
    "so",
    [
        {"regex": "a" * 2000},
        {"grammar": 'root ::= "' + "a" * 2000 + '"'},
        {"choice": ["a" * 100] * 20},
        {"json": {"type": "object", "description": "a" * 2000}},
        {"structural_tag": {**TAG, "pad": "a" * 2000}},
    ],
)
def test_every_kind_is_bounded_by_max_schema_bytes(engine, so):
    small = Settings(model="m", max_schema_bytes=1024)
    kind = next(iter(so))
    for prepare in (
        lambda: prepare_chat(chat(structured_outputs=so), engine, small, TEMPLATE),
        lambda: prepare_completion(completion(structured_outputs=so), engine, small),
    ):
        with pytest.raises(RequestTooLargeError) as info:
            prepare()
        assert info.value.param == f"structured_outputs.{kind}"


def test_completion_response_format_schema_is_bounded_too(engine):
    small = Settings(model="m", max_schema_bytes=1024)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "description": "a" * 2000}}}
    with pytest.raises(RequestTooLargeError) as info:
        prepare_completion(completion(response_format=fmt), engine, small)
    assert info.value.param == "response_format.json_schema.schema"


def test_tokenize_is_not_a_generation_request():
    from jamba_server.protocol import TokenizeRequest

    error = wire_error({"messages": MSG, "structured_outputs": {"regex": "a"}}, TokenizeRequest)
    assert error.param == "structured_outputs"


def test_verbatim_parser_keeps_citation_mode_empty_list():
    """JSON mode with citation mode (accepted before structured_outputs) reports no citations."""
    parsed = parse_output('{"a":1}', ParserConfig(verbatim=True, citation_mode=True, document_titles=("t",)))
    assert parsed.content == '{"a":1}' and parsed.citations == []


# --- the checks' memo ---------------------------------------------------------------------------------


def test_memoized_check_runs_once_per_value_and_answers_alike():
    """Same JSON value → the check runs once, valid or not; a different value, or one too big to
    remember, is checked on its own."""
    from jamba_server.core import constraints

    seen = []

    @constraints.memoized_check
    def problem(value):
        seen.append(value)
        return None if value.get("ok") else "bad"

    assert [problem({"ok": True}), problem({"ok": True}), problem({"ok": False}), problem({"ok": False})] == [None, None, "bad", "bad"]
    assert seen == [{"ok": True}, {"ok": False}]
    big = {"ok": True, "pad": "x" * constraints.MEMO_MAX_CHARS}
    problem(big), problem(big)
    assert len(seen) == 4
    problem({"ok": True, "nan": float("nan")})  # not JSON text: checked, not remembered
    assert len(seen) == 5


def test_a_remembered_schema_or_grammar_answers_as_the_check_did(monkeypatch):
    """Through the real checks: a repeat of a valid and of an invalid schema (and grammar) gets the
    same outcome and the same 400 without running the checker again."""
    import jamba_server.core.constraints as constraints
    import jamba_server.runtime.vllm_engine as engine

    calls = {"metaschema": 0, "grammar": 0}
    real_validator_for, real_validate = constraints.validator_for, engine.validate_xgrammar_grammar

    def counting_validator_for(schema):
        calls["metaschema"] += 1
        return real_validator_for(schema)

    def counting_validate(params):
        calls["grammar"] += 1
        return real_validate(params)

    monkeypatch.setattr(constraints, "validator_for", counting_validator_for)
    monkeypatch.setattr(engine, "validate_xgrammar_grammar", counting_validate)
    constraints.metaschema_problem.cache_clear(), engine.grammar_problem.cache_clear()
    try:
        bad_schema = {"type": "object", "properties": {"a": {"type": 7}}}
        outcomes = []
        for schema in (SCHEMA, SCHEMA, bad_schema, bad_schema):
            try:
                constraints.check_schema(schema, "p")
                outcomes.append(None)
            except InvalidRequestError as exc:
                outcomes.append((exc.param, exc.message))
        assert outcomes[:2] == [None, None] and outcomes[2] == outcomes[3] and outcomes[2][0] == "p"
        assert calls["metaschema"] == 2
        regex = OutputConstraint("regex", "(unclosed", "structured_outputs.regex")
        errors = []
        for _ in range(2):
            with pytest.raises(InvalidRequestError) as info:
                engine.check_constraint(regex)
            errors.append((info.value.param, info.value.message))
        engine.check_constraint(OutputConstraint("choice", ("a", "b"), "structured_outputs.choice"))
        engine.check_constraint(OutputConstraint("choice", ("a", "b"), "structured_outputs.choice"))
        assert errors[0] == errors[1] and errors[0][0] == "structured_outputs.regex"
        assert calls["grammar"] == 2
    finally:
        constraints.metaschema_problem.cache_clear(), engine.grammar_problem.cache_clear()
