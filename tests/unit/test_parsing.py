"""The output parser: tool-call blocks, citations, special tokens; streaming = one-shot, any split."""

import json
import string

from hypothesis import given, settings, strategies as st

from jamba_server.core.parsing import (
    _MARKERS,
    _held_prefix_len,
    Citation,
    OutputParser,
    ParseDelta,
    ParserConfig,
    parse_output,
)

TOOLS = ParserConfig(tool_names=frozenset({"get_weather", "add"}))
DOCS = ParserConfig(document_titles=("A", None, "C"), citation_mode=True)


def test_plain_text():
    assert parse_output("hello world", TOOLS) == ParseDelta(content="hello world")


def test_tool_block_becomes_calls():
    out = parse_output(
        'Let me check. <tool_calls>[\n    {"name": "get_weather", "arguments": {"city": "Paris"}},\n'
        '    {"name": "add", "arguments": "{\\"a\\": 2}"}\n]</tool_calls>',
        TOOLS,
    )
    assert out.content == "Let me check. "
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 2}),
    ]
    ids = [c.id for c in out.tool_calls]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2


def test_parallel_false_keeps_first_call():
    config = ParserConfig(tool_names=frozenset({"add"}), parallel_tool_calls=False)
    out = parse_output('<tool_calls>[{"name": "add", "arguments": {}}, {"name": "add", "arguments": {"a": 1}}]</tool_calls>', config)
    assert len(out.tool_calls) == 1 and out.tool_calls[0].arguments == "{}"


def test_malformed_or_unknown_tool_block_falls_back_to_content():
    for block in ['[{"name": "get_weather", "arguments": {]', '[{"name": "nope", "arguments": {}}]', "[]", '{"name": "add"}', '[{"name": "add", "arguments": 3}]']:
        out = parse_output(f"x<tool_calls>{block}</tool_calls>y", TOOLS)
        assert out.tool_calls == []
        assert out.content == f"x{block}y"


def test_tool_block_without_tools_is_content_without_tags():
    out = parse_output('<tool_calls>[{"name": "add", "arguments": {}}]</tool_calls>', ParserConfig())
    assert out.tool_calls == [] and out.content == '[{"name": "add", "arguments": {}}]'


def test_forced_block_may_end_without_closing_tag():
    config = ParserConfig(tool_names=frozenset({"add"}), starts_in_tool_block=True)
    out = parse_output('[{"name":"add","arguments":{"a":1}}]', config)
    assert [c.name for c in out.tool_calls] == ["add"] and out.content == ""


def test_citations_are_parsed_filtered_and_titled():
    out = parse_output("Rowling wrote it.<citations>[0, 2, 7, 0, true]</citations>", DOCS)
    assert out.content == "Rowling wrote it."
    assert out.citations == [Citation(0, "A"), Citation(2, "C")]


def test_citation_mode_without_tag_gives_empty_list():
    assert parse_output("no sources", DOCS).citations == []
    assert parse_output("no sources", ParserConfig()).citations is None


def test_special_tokens_never_reach_content():
    out = parse_output("a<|bom|>b<|eom|>c<|assistant|><|endoftext|>", ParserConfig())
    assert out.content == "abc"


def test_tag_prefix_is_held_back_until_resolved():
    parser = OutputParser(TOOLS)
    assert parser.feed("hello <tool").content == "hello "
    assert parser.feed("box").content == "<toolbox"
    assert parser.feed("<|e").content == ""
    assert parser.feed("om|> end").content == " end"


# ---- property test: any split of any output streams to the one-shot parse

FRAGMENTS = [
    "<tool_calls>", "</tool_calls>", "<citations>", "</citations>", "<|eom|>", "<|bom|>", "<", "|", ">",
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', '[{"name": "add", "arguments": {"a": 1}}, ',
    '{"name": "add", "arguments": "{}"}]', "[0, 2]", "[1]", "[", "]", "{", "}", '"', ",", " ",
    "<tool_", "<citat", "</tool", "calls>",
]  # fmt: skip
outputs = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=string.printable, max_size=6)), max_size=14
).map("".join)


def stream(text: str, cuts: list[int], config: ParserConfig) -> ParseDelta:
    parser = OutputParser(config)
    total = ParseDelta()
    points = sorted({c % (len(text) + 1) for c in cuts})
    start = 0
    for point in [*points, len(text)]:
        total.extend(parser.feed(text[start:point]))
        start = point
    total.extend(parser.finish())
    return total


def comparable(result: ParseDelta):
    return (
        result.content,
        [(c.name, json.loads(c.arguments), c.id.startswith("call_")) for c in result.tool_calls],
        result.citations,
    )


@settings(max_examples=400, deadline=None)
@given(
    outputs,
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    st.sampled_from([TOOLS, DOCS, ParserConfig(), ParserConfig(tool_names=frozenset({"add"}), starts_in_tool_block=True, parallel_tool_calls=False)]),
)
def test_streaming_equals_one_shot_parse(text, cuts, config):
    assert comparable(stream(text, cuts, config)) == comparable(parse_output(text, config))


# The model emits tags and special tokens as single tokens; its plain text pieces are modelled here
# without "<", so every tag in these outputs is a whole token, as from the engine.
TOKENS = ["<tool_calls>", "</tool_calls>", "<citations>", "</citations>", "<|eom|>", "<|bom|>", "<|user|>"]
token_outputs = st.lists(
    st.one_of(
        st.sampled_from(TOKENS),
        st.sampled_from([f for f in FRAGMENTS if "<" not in f]),
        st.text(alphabet=string.printable.replace("<", ""), max_size=6),
    ),
    max_size=14,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(token_outputs, st.sampled_from([TOOLS, DOCS, ParserConfig()]))
def test_no_tag_or_special_token_leaks_into_content(text, config):
    content = parse_output(text, config).content
    assert "<" not in content


def test_markers_start_with_their_only_lt():
    """The parser's fast paths rely on it: text without `<` holds no marker and no marker prefix."""
    assert all(m.startswith("<") and m.count("<") == 1 for m in _MARKERS)


def _held_prefix_reference(text: str) -> int:
    """The definition, by brute force: the longest suffix that is a proper prefix of a marker."""
    return max(
        (size for m in _MARKERS for size in range(1, min(len(m) - 1, len(text)) + 1) if text.endswith(m[:size])),
        default=0,
    )


@given(st.lists(st.sampled_from(["a", "<", "|", "/", "b", "o", "m", "<|bo", "<tool_", "</cit", "<<|"]), max_size=12))
def test_held_prefix_matches_its_definition(parts):
    text = "".join(parts)
    assert _held_prefix_len(text) == _held_prefix_reference(text)


def test_a_cut_tool_block_gives_the_calls_that_completed():
    """The LangChain case: `tool_choice="any"`, `max_tokens` cuts the second call. The first call is a
    call, the cut one is dropped, and no protocol syntax becomes content."""
    cut = '<tool_calls>[{"name":"get_weather","arguments":{"city":"London"}},{"name":"get_weather","arg'
    out = parse_output(cut, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == [("get_weather", {"city": "London"})]
    assert out.content == ""
    forced = ParserConfig(tool_names=frozenset({"add"}), starts_in_tool_block=True)
    for nothing_complete in ('[{"name": "add", "argu', "[", "[ ", ""):
        out = parse_output(nothing_complete, forced)
        assert out == ParseDelta(), nothing_complete


def test_an_unfinished_block_that_is_not_a_call_array_stays_content():
    for text in ("<tool_calls>I would call a tool", "<tool_calls>[maybe later"):
        assert parse_output(text, TOOLS) == ParseDelta(content=text.removeprefix("<tool_calls>"))
