"""Constraints beyond JSON through the live server: vLLM's `structured_outputs` (choice, regex,
grammar, json, structural_tag) on chat and completions, `response_format` on completions, sent with
the openai client's `extra_body`; bad regexes and grammars are 400s naming the field; streaming."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.support import MODEL_NAME, PERSON_SCHEMA, answer_tag

MSG = [{"role": "user", "content": "Answer please."}]
PROMPT = "The answer is"
CHOICES = ["yes", "no", "maybe later", "not sure"]
REGEX = r"[a-z]{2,6}-[0-9]{2,4}"
# A tiny list grammar, bounded (at most three items), in xgrammar's EBNF and in Lark.
LIST_EBNF = 'root ::= "[" item ("," item)? ("," item)? "]"\nitem ::= [a-z] [a-z]? [a-z]? | [0-9] [0-9]?'
LIST_LARK = 'start: "[" item ("," item)? ("," item)? "]"\nitem: /[a-z]{1,3}/ | /[0-9]{1,2}/'
TAG = answer_tag("person", PERSON_SCHEMA)
TAG_OUTPUT = re.compile(r"Answer: <person>(.*)</person>", re.S)


def parse_list(text: str) -> list[str]:
    """The tiny list grammar's parser (independent of the server's): `[item(,item){0,2}]`."""
    assert text.startswith("[") and text.endswith("]"), text
    items = text[1:-1].split(",")
    assert 1 <= len(items) <= 3, text
    for item in items:
        assert re.fullmatch(r"[a-z]{1,3}|[0-9]{1,2}", item), (item, text)
    return items


def chat(client, so, **kwargs):
    kwargs.setdefault("max_tokens", 40)
    return client.chat.completions.create(model=MODEL_NAME, messages=MSG, extra_body={"structured_outputs": so}, **kwargs)


def complete(client, extra, **kwargs):
    kwargs.setdefault("max_tokens", 40)
    return client.completions.create(model=MODEL_NAME, prompt=PROMPT, extra_body=extra, **kwargs)


def test_choice_is_one_of_the_choices_in_20_of_20_samples(client):
    """Temperature 1, twenty samples each on chat and completions (two requests of n=10: the
    server's max_n is 16)."""
    replies, texts = [], []
    for seed in (1, 2):
        replies += [c.message.content for c in chat(client, {"choice": CHOICES}, n=10, temperature=1.0, seed=seed).choices]
        texts += [c.text for c in complete(client, {"structured_outputs": {"choice": CHOICES}}, n=10, temperature=1.0, seed=seed).choices]
    assert len(replies) == len(texts) == 20
    assert set(replies) <= set(CHOICES), replies
    assert set(texts) <= set(CHOICES), texts


def test_regex_output_fullmatches(client):
    for choice in chat(client, {"regex": REGEX}, n=4, temperature=1.0).choices:
        assert re.fullmatch(REGEX, choice.message.content) and choice.finish_reason == "stop", choice
    for choice in complete(client, {"structured_outputs": {"regex": REGEX}}, n=4, temperature=1.0).choices:
        assert re.fullmatch(REGEX, choice.text) and choice.finish_reason == "stop", choice


@pytest.mark.parametrize("grammar", [LIST_EBNF, LIST_LARK], ids=["ebnf", "lark"])
def test_grammar_output_parses_under_the_grammar(client, grammar):
    for choice in complete(client, {"structured_outputs": {"grammar": grammar}}, n=4, temperature=1.0).choices:
        assert choice.finish_reason == "stop" and parse_list(choice.text)
    reply = chat(client, {"grammar": grammar}, temperature=1.0).choices[0]
    assert reply.finish_reason == "stop" and parse_list(reply.message.content)


def outside_strings(text: str) -> str:
    """The JSON text with every string literal emptied: the grammar bounds whitespace between tokens,
    not what a string holds (a sampled name may well have two spaces in a row)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}}},
        {"structured_outputs": {"json": PERSON_SCHEMA}},
        {"structured_outputs": {"json": json.dumps(PERSON_SCHEMA)}},
    ],
    ids=["response_format", "structured_outputs", "structured_outputs-string"],
)
def test_json_schema_on_completions_parses_and_validates(client, extra):
    for choice in complete(client, extra, n=3, temperature=1.0, max_tokens=80).choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.text), PERSON_SCHEMA)
        assert not re.search(r"\s", outside_strings(choice.text)), choice.text  # no free whitespace


def test_json_object_on_completions_and_in_structured_outputs(client):
    fmt = complete(client, {"response_format": {"type": "json_object"}}, max_tokens=60, temperature=1.0, n=2)
    so = complete(client, {"structured_outputs": {"json_object": True}}, max_tokens=60, temperature=1.0, n=2)
    for choice in fmt.choices + so.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.text), dict)
        else:  # an unbounded object may run to max_tokens; what there is is still an object's start
            assert choice.text.startswith("{")


def test_structural_tag_on_chat_and_completions(client):
    """vLLM 0.32's xgrammar structural tags run on CPU; the tag's JSON gets at most one whitespace
    character in a row between its tokens (xgrammar compiles it without the server's no-whitespace
    setting)."""
    outputs = [c.text for c in complete(client, {"structured_outputs": {"structural_tag": TAG}}, n=3, temperature=1.0, max_tokens=100).choices]
    outputs += [c.message.content for c in chat(client, {"structural_tag": json.dumps(TAG)}, n=3, temperature=1.0, max_tokens=100).choices]
    for text in outputs:
        match = TAG_OUTPUT.fullmatch(text)
        assert match, text
        jsonschema.validate(json.loads(match.group(1)), PERSON_SCHEMA)
        assert not re.search(r"\s\s", outside_strings(match.group(1))), text


@pytest.mark.parametrize(
    "so, param",
    [
        ({"regex": "(unclosed"}, "structured_outputs.regex"),
        ({"regex": "a(?=b)"}, "structured_outputs.regex"),
        ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar"),
        ({"grammar": 'root ::= "a" |'}, "structured_outputs.grammar"),
        ({"structural_tag": {"type": "structural_tag", "format": {"type": "bogus"}}}, "structured_outputs.structural_tag"),
        ({"json": {"type": "integer", "multipleOf": 2}}, "structured_outputs.json"),
        ({"regex": "a", "choice": ["a"]}, "structured_outputs"),
        ({"regex": "a", "backend": "outlines"}, "structured_outputs.backend"),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(client, so, param):
    for call in (lambda: chat(client, so), lambda: complete(client, {"structured_outputs": so})):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body


def test_conflicting_constraints_are_400s(client, http):
    both = {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}
    for path, body in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": PROMPT})):
        resp = http.post(path, json={"model": MODEL_NAME, "max_tokens": 4, **body, **both})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "structured_outputs", resp.text
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    resp = http.post(
        "/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": MSG, "tools": tools, "tool_choice": "required", "structured_outputs": {"regex": "a"}},
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "structured_outputs", resp.text


def test_streaming_constrained_output(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MSG, max_tokens=40, temperature=1.0, n=2, stream=True,
        extra_body={"structured_outputs": {"regex": REGEX}},
    )  # fmt: skip
    content, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for choice in chunk.choices:
            content[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert all(re.fullmatch(REGEX, text) for text in content.values()), content
    assert finish == {0: "stop", 1: "stop"}
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=40, temperature=1.0, stream=True,
        extra_body={"structured_outputs": {"choice": CHOICES}},
    )  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) in CHOICES


def test_a_constrained_reply_spelling_jambas_tags_is_content(client):
    """The grammar writes the tags as text; the chat reply returns them as content, not tool calls."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    literal = '<tool_calls>[{"name": "f", "arguments": {}}]</tool_calls>'
    reply = chat(client, {"choice": [literal]}, tools=tools, max_tokens=60).choices[0]
    assert reply.message.content == literal and not reply.message.tool_calls and reply.finish_reason == "stop"
