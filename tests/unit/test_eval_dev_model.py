"""eval_dev_model's scoring: one reply against one held-out case, pure; the case selection; the
stream put together; the rates table."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import pytest

from jamba_server import dev_corpus
from jamba_server.eval_dev_model import (
    CATEGORIES,
    Case,
    Outcome,
    Reply,
    Score,
    category_of,
    reply_of_chunks,
    reply_of_completion,
    same_calls_and_citations,
    score,
    select_cases,
    summarize,
    table,
)

CASES = select_cases(3, seed=0)


def case(category: str) -> Case:
    return next(c for c in CASES if c.category == category)


def expected_reply(c: Case) -> Reply:
    """The reply the case expects, as the server would return it."""
    reply = c.example.reply
    calls = tuple((t["function"]["name"], t["function"]["arguments"]) for t in reply.get("tool_calls", []))
    return Reply(reply["content"], calls, tuple(reply["citations"]) if "citations" in reply else None, "stop")


def two_call_case() -> Case:
    return next(c for c in select_cases(20, seed=0, categories=("tool_call",)) if len(c.example.reply["tool_calls"]) == 2)


def test_cases_are_deterministic_and_fill_every_category():
    assert select_cases(3, seed=0) == CASES
    assert [c.category for c in CASES] == [category for category in CATEGORIES for _ in range(3)]
    assert select_cases(3, seed=1) != CASES
    assert all(category_of(c.example) == c.category for c in CASES if c.category not in ("json_grammar",))
    # The JSON-knob examples are measured both ways: the same requests.
    assert [c.example for c in CASES if c.category == "json"] == [c.example for c in CASES if c.category == "json_grammar"]


@pytest.mark.parametrize("category", CATEGORIES)
def test_the_expected_reply_scores_right_and_exact(category):
    c = case(category)
    assert score(c, expected_reply(c)) == Score(ok=True, exact=True)


def test_a_tool_call_naming_another_function_is_wrong():
    c = case("tool_call")
    (name, arguments), *_ = expected_reply(c).tool_calls
    other = next(n for n in dev_corpus.TOOLS if n != name)
    assert score(c, Reply("", ((other, arguments),))).ok is False


def test_a_tool_call_with_arguments_off_the_schema_is_wrong():
    c = case("tool_call")
    name = expected_reply(c).tool_calls[0][0]
    for arguments in ('{"city": ', "[1]", '{"city": 3, "to": 4, "subject": 5, "name": 6}', "{}"):
        assert score(c, Reply("", ((name, arguments),))).ok is False, arguments


def test_a_valid_call_with_other_arguments_is_right_but_not_exact():
    c = case("tool_call")
    name = expected_reply(c).tool_calls[0][0]
    required = dev_corpus.TOOLS[name]["function"]["parameters"]["required"]
    arguments = json.dumps({key: "Elsewhere" for key in required})
    reply = Reply("", ((name, arguments),) + expected_reply(c).tool_calls[1:])
    assert score(c, reply) == Score(ok=True, exact=False)


def test_tool_calls_missing_one_or_answered_in_text_are_wrong():
    c = two_call_case()
    calls = expected_reply(c).tool_calls
    assert score(c, Reply("", calls)).exact is True
    assert score(c, Reply("", calls[:1])).ok is False
    assert score(c, Reply("", calls[::-1])) == Score(ok=True, exact=calls[::-1] == calls)  # any order, exact in order
    assert score(c, Reply(json.dumps([{"name": n, "arguments": json.loads(a)} for n, a in calls]))).ok is False


@pytest.mark.parametrize("category", ["tool_none", "chat", "documents", "json_off"])
def test_plain_text_cases_want_text_and_no_calls(category):
    c = case(category)
    assert score(c, Reply("Something else.")) == Score(ok=True, exact=False)
    assert score(c, Reply("  ")).ok is False
    assert score(c, Reply("", (("get_time", '{"city": "Bonn"}'),))).ok is False


def test_a_tool_result_turn_must_stop_without_calling():
    c = case("tool_answer")
    assert score(c, Reply("Anything.", finish_reason="stop")) == Score(ok=True, exact=False)
    assert score(c, Reply(expected_reply(c).content, finish_reason="length")).ok is False
    assert score(c, Reply("", (("get_time", '{"city": "Bonn"}'),), finish_reason="tool_calls")).ok is False


def test_citations_must_name_the_right_document():
    c = case("citation")
    (right,) = c.example.reply["citations"]
    wrong = next(i for i in range(len(c.example.request["documents"])) if i != right)
    content = c.example.reply["content"]
    assert score(c, Reply("Elsewhere.", citations=(right,))) == Score(ok=True, exact=False)
    assert score(c, Reply(content, citations=(right, right))).exact is True  # the server lists an id once anyway
    assert score(c, Reply(content, citations=(wrong,))).ok is False
    assert score(c, Reply(content, citations=(right, wrong))).ok is False
    assert score(c, Reply(content, citations=())).ok is False  # no citation block: the server says []
    assert score(c, Reply(content, citations=None)).ok is False


def test_a_question_no_document_answers_cites_none():
    c = case("citation_none")
    assert score(c, Reply(c.example.reply["content"], citations=())).exact is True
    assert score(c, Reply(c.example.reply["content"], citations=(0,))).ok is False


@pytest.mark.parametrize("category", ["json", "json_grammar"])
def test_json_must_parse_as_an_object(category):
    c = case(category)
    expected = json.loads(c.example.reply["content"])
    assert score(c, Reply(json.dumps(expected, indent=2) + "\n")) == Score(ok=True, exact=True)
    assert score(c, Reply(json.dumps({**expected, "name": "Somebody"}))) == Score(ok=True, exact=False)
    assert score(c, Reply(json.dumps({"name": expected["name"]}))) == Score(ok=True, exact=False)  # a field missing
    for bad in (c.example.reply["content"][:-1], "[1, 2]", '"text"', "", "Sure: " + c.example.reply["content"]):
        assert score(c, Reply(bad)) == Score(ok=False, exact=False), bad


def test_agreement_compares_calls_as_json_and_citations():
    call = ("get_time", '{"city": "Bonn"}')
    assert same_calls_and_citations(Reply("a", (call,)), Reply("b", (("get_time", '{"city":"Bonn"}'),)))
    assert not same_calls_and_citations(Reply("", (call,)), Reply("", ()))
    assert not same_calls_and_citations(Reply("", (call,)), Reply("", (("get_time", '{"city": "Bern"}'),)))
    assert same_calls_and_citations(Reply("x", citations=(1,)), Reply("y", citations=(1,)))
    assert same_calls_and_citations(Reply("x", citations=()), Reply("x", citations=None))
    assert not same_calls_and_citations(Reply("x", citations=(1,)), Reply("x", citations=(0,)))


def _chunk(finish=None, **delta):
    fields = {"content": None, "tool_calls": None, **delta}
    return NS(choices=[NS(delta=NS(**fields), finish_reason=finish)])


def _call_delta(index, name=None, arguments=None):
    return NS(index=index, function=NS(name=name, arguments=arguments))


def test_a_stream_is_put_together_as_the_response_would_be():
    chunks = [
        _chunk(content=" Lena"),
        _chunk(content=" lives in Zurich."),
        _chunk(tool_calls=[_call_delta(0, "get_time", '{"city": '), _call_delta(1, "get_phone", "")]),
        _chunk(tool_calls=[_call_delta(0, None, '"Bonn"}'), _call_delta(1, None, '{"name": "Dana"}')]),
        _chunk(citations=[{"document_id": 2, "title": "Lena"}]),
        _chunk(finish="stop"),
    ]
    assert reply_of_chunks(chunks) == Reply(
        " Lena lives in Zurich.", (("get_time", '{"city": "Bonn"}'), ("get_phone", '{"name": "Dana"}')), (2,), "stop"
    )
    assert reply_of_chunks([_chunk(content="Hi"), _chunk(finish="length")]) == Reply("Hi", (), None, "length")


def test_a_response_is_read_with_its_citations():
    call = NS(function=NS(name="get_time", arguments='{"city": "Bonn"}'))
    message = NS(content=None, tool_calls=[call], citations=None)
    assert reply_of_completion(NS(choices=[NS(message=message, finish_reason="tool_calls")])) == Reply(
        "", (("get_time", '{"city": "Bonn"}'),), None, "tool_calls"
    )
    message = NS(content="x", tool_calls=None, citations=[{"document_id": 1, "title": None}])
    assert reply_of_completion(NS(choices=[NS(message=message, finish_reason="stop")])).citations == (1,)


def test_rates_per_category_and_the_table():
    outcomes = [
        Outcome("tool_call", Score(True, True), True),
        Outcome("tool_call", Score(True, False), False),
        Outcome("tool_call", Score(False, False), True),
        Outcome("json", Score(True, False), None),
    ]
    rows = summarize(outcomes)
    assert [(r.category, r.cases, r.rate, r.exact, r.stream) for r in rows] == [
        ("tool_call", 3, 2 / 3, 1 / 3, 2 / 3),
        ("json", 1, 1.0, 0.0, None),
    ]
    lines = table(rows).splitlines()
    assert lines[0].split() == ["category", "cases", "rate", "exact", "stream"]
    assert lines[1].split() == ["tool_call", "3", "0.67", "0.33", "0.67"]
    assert lines[2].split() == ["json", "1", "1.00", "0.00", "-"]
