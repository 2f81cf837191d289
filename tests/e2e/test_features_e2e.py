"""Jamba's features through the live server: tools, documents + citations, JSON mode and schemas."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.support import MODEL_NAME, PERSON_SCHEMA, case_to_request, golden_cases

SAMPLES = 20  # sampled requests per constrained mode (temperature 1, seeds 0..19)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Jerusalem"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two small integers",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What's the weather like in Paris?"}]
CITY_ONLY = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London"]}}, "required": ["city"],
    "additionalProperties": False}}}  # fmt: skip
DOCS = [{"text": "Harry Potter is by J. K. Rowling.", "title": "HP"}, {"text": "Dogs bark.", "source": "wiki"}]






def token_id(http, token: str) -> int:
    ids = http.post("/tokenize", json={"prompt": token, "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1
    return ids[0]


def assert_valid_calls(calls, allowed: set[str]):
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


# ---- request → prompt


@pytest.mark.parametrize("case", golden_cases(), ids=[c["name"] for c in golden_cases()])
def test_golden_prompts_through_tokenize(http, case):
    body = {**case_to_request(case), "add_generation_prompt": case["add_generation_prompt"]}
    resp = http.post("/tokenize", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"] == case["expected"]


def test_tokenize_shows_forced_tool_block(http):
    prompt = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "tool_choice": "required"}).json()["prompt"]
    assert prompt.endswith("<|bom|><|assistant|> <tool_calls>")
    none = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "tool_choice": "none"}).json()["prompt"]
    assert "<tool_definitions>" not in none


# ---- constrained outputs: validity over sampled requests


def test_required_tool_calls_always_valid(client):
    valid = 0
    for seed in range(SAMPLES):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
            temperature=1.0, seed=seed, max_tokens=1000,
        )  # fmt: skip
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert_valid_calls(choice.message.tool_calls, {"get_weather", "add"})
        assert choice.message.content is None
        valid += 1
    assert valid == SAMPLES


def test_named_tool_call_always_valid(client):
    for seed in range(SAMPLES):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
            temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls, {"add"})


def test_parallel_false_gives_one_call(client):
    for seed in range(5):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip
        assert len(resp.choices[0].message.tool_calls) == 1


def test_json_schema_always_valid(client):
    for seed in range(SAMPLES):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Describe the first American president."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}},
            temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)


def test_json_object_finished_outputs_parse(client):
    finished = 0
    for seed in range(SAMPLES):
        resp = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Alice is 30. Give JSON."}],
            response_format={"type": "json_object"}, temperature=1.0, seed=seed, max_tokens=200,
        )  # fmt: skip
        choice = resp.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # cut by max_tokens: still a JSON object prefix, never free text
            assert choice.message.content.startswith("{")
    assert finished >= SAMPLES // 2


# ---- tool_choice none / auto


def test_none_never_returns_tool_calls(client, http):
    opener = token_id(http, "<tool_calls>")
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8,
        logit_bias={str(opener): 100},
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason != "tool_calls"


def test_auto_malformed_block_falls_back_to_content(client, http):
    opener = token_id(http, "<tool_calls>")
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, temperature=0, max_tokens=12,
        logit_bias={str(opener): 100}, extra_body={"min_tokens": 12},
    )  # fmt: skip
    choice = resp.choices[0]
    # the model opens a block on every token and never writes valid JSON in it
    assert choice.message.tool_calls is None
    assert "<tool_calls>" not in (choice.message.content or "")
    assert choice.finish_reason == "length"


def test_special_tags_never_leak(client, http):
    tags = ["<tool_calls>", "</tool_calls>", "<citations>", "</citations>", "<|bom|>", "<|user|>", "<|assistant|>"]
    bias = {str(token_id(http, t)): 8 for t in tags}
    for stream in (False, True):
        kwargs = dict(
            model=MODEL_NAME, messages=ASK, tools=TOOLS, temperature=1.0, seed=5, max_tokens=40,
            logit_bias=bias, extra_body={"documents": DOCS},
        )  # fmt: skip
        if stream:
            text = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
            )
        else:
            text = client.chat.completions.create(**kwargs).choices[0].message.content or ""
        for tag in tags:
            assert tag not in text


# ---- documents and citations


def test_citation_mode_returns_citations_list(client):
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Who wrote Harry Potter?"}], temperature=0,
        max_tokens=16, extra_body={"documents": DOCS, "citation_mode": "fast"},
    )  # fmt: skip
    message = resp.choices[0].message.model_dump()
    assert isinstance(message["citations"], list)
    for citation in message["citations"]:
        assert 0 <= citation["document_id"] < len(DOCS)
    plain = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, temperature=0, max_tokens=4, extra_body={"documents": DOCS}
    )
    assert "citations" not in plain.choices[0].message.model_dump(exclude_none=True)


def test_forced_citation_tag_never_in_content(client, http):
    cite = token_id(http, "<citations>")
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, temperature=0, max_tokens=10, logit_bias={str(cite): 100},
        extra_body={"documents": DOCS, "citation_mode": "fast"},
    )  # fmt: skip
    message = resp.choices[0].message.model_dump()
    assert "<citations>" not in (message["content"] or "")
    assert message["citations"] == []


# ---- streaming agrees with non-streaming


def _assemble(stream):
    content, calls, citations, finish = "", {}, None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                assert entry["id"] is None, "id sent twice"
                entry["id"] = call.id
                entry["name"] = call.function.name
            entry["arguments"] += call.function.arguments or ""
        extra = delta.model_dump().get("citations")
        if extra is not None:
            citations = extra
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], citations, finish


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tools": TOOLS, "tool_choice": "required"},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}},
        {"extra_body": {"documents": DOCS, "citation_mode": "fast"}},
        {"tools": TOOLS},
    ],
    ids=["required", "named", "json_schema", "citations", "auto"],
)
def test_streamed_equals_non_streamed(client, kwargs):
    args = dict(model=MODEL_NAME, messages=ASK, temperature=0, max_tokens=120, **kwargs)
    whole = client.chat.completions.create(**args).choices[0]
    content, calls, citations, finish = _assemble(client.chat.completions.create(stream=True, **args))
    assert content == (whole.message.content or "")
    assert finish == whole.finish_reason
    expected_calls = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls or []]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected_calls
    assert all(c["id"] and c["id"].startswith("call_") for c in calls)
    assert citations == whole.message.model_dump().get("citations")


def test_a_tool_call_cut_by_max_tokens_returns_the_calls_that_completed(client):
    """The LangChain case (`bind_tools(..., tool_choice="any")`, a small max_tokens): a forced, parallel
    call list cut mid-call. The calls that completed come back as tool_calls with finish_reason
    "length"; the cut one is dropped, never returned as content in the protocol's own syntax."""
    args = dict(model=MODEL_NAME, messages=ASK, tools=[CITY_ONLY], tool_choice="required", temperature=0, max_tokens=48)
    whole = client.chat.completions.create(**args).choices[0]  # greedy: the dev model repeats the call
    assert whole.finish_reason == "length" and whole.message.content is None
    assert whole.message.tool_calls
    for call in whole.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), CITY_ONLY["function"]["parameters"])
    content, calls, _, finish = _assemble(client.chat.completions.create(stream=True, **args))
    assert content == "" and finish == "length"
    expected = [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == expected


# ---- multi-turn tool use with the official client


def test_multi_turn_tool_round_trip(client, http):
    first = client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=3, max_tokens=200,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = http.post("/tokenize", json={"messages": messages, "tools": TOOLS}).json()["prompt"]
    rendered_call = f'{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}'
    assert f"<|bom|><|assistant|> <tool_calls>[\n    {rendered_call}\n]</tool_calls><|eom|>" in prompt
    assert prompt.endswith("<|bom|><|tool|> 18 degrees<|eom|><|bom|><|assistant|>")


# ---- what cannot be honoured is a 400


BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nonsense"}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "#/definitions/missing"}}}}, "response_format.json_schema.schema"),
    ({"citation_mode": "fast"}, "citation_mode"),
    ({"documents": [{"title": "no text"}]}, "documents[0].text"),
    ({"documents": [{"text": "t", "year": 1999}]}, "documents[0]"),
]


@pytest.mark.parametrize("fields, param", BAD)
def test_feature_errors_are_400(http, fields, param):
    resp = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": ASK, "max_tokens": 4, **fields})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    ok = http.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": ASK, "max_tokens": 1})
    assert ok.status_code == 200
