"""The dev model's synthetic corpus: deterministic, split by vocabulary, rendered the server's way,
and every target read by the server's own parser as the example intends."""

import collections
import json
import os
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from jamba_server import dev_corpus
from jamba_server.core.features import plan_chat
from jamba_server.core.parsing import Citation, parse_output
from jamba_server.protocol import ChatCompletionRequest
from jamba_server.settings import DEFAULT_TEMPLATE

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
COUNT = 300  # per split: every kind many times over


@pytest.fixture(scope="module")
def tokenizer(dev_model):
    return AutoTokenizer.from_pretrained(dev_model)


@pytest.fixture(scope="module")
def rendered(tokenizer):
    return {
        split: [dev_corpus.render_example(e, tokenizer, TEMPLATE) for e in dev_corpus.generate(split, COUNT, seed=7)]
        for split in dev_corpus.SPLITS
    }


def _of_kind(rendered, kind):
    found = [r for split in dev_corpus.SPLITS for r in rendered[split] if r.example.kind == kind]
    assert len(found) >= 10, kind
    return found


def _plan(example):
    return plan_chat(ChatCompletionRequest.model_validate({"model": "m", **example.request}))


def test_the_same_seed_gives_the_same_corpus_and_another_seed_another():
    assert dev_corpus.generate("train", 50, seed=3) == dev_corpus.generate("train", 50, seed=3)
    assert dev_corpus.generate("train", 50, seed=3) != dev_corpus.generate("train", 50, seed=4)
    assert dev_corpus.generate("train", 50, seed=3) != dev_corpus.generate("heldout", 50, seed=3)


def _corpus_in_a_process(hash_seed: str) -> str:
    code = "import json; from jamba_server import dev_corpus; print(json.dumps([e.__dict__ for e in dev_corpus.generate('heldout', 200, seed=3)]))"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def test_the_corpus_does_not_depend_on_the_process():
    """Set order varies with PYTHONHASHSEED: a corpus that iterated a set would differ between the eval
    process and the next, and the eval's cases with it."""
    assert _corpus_in_a_process("1") == _corpus_in_a_process("2")


def test_the_splits_share_no_name_or_city():
    for lists in (dev_corpus.NAMES, dev_corpus.CITIES):
        assert not set(lists["train"]) & set(lists["heldout"])
    entities = {split: {*dev_corpus.NAMES[split], *dev_corpus.CITIES[split]} for split in dev_corpus.SPLITS}
    assert not entities["train"] & entities["heldout"]
    for split, other in (("train", "heldout"), ("heldout", "train")):
        for example in dev_corpus.generate(split, COUNT, seed=7):
            words = set(re.findall(r"[A-Z][a-z]+", json.dumps([example.request, example.reply])))
            assert not words & entities[other], (split, example)
            assert words & entities[split] or example.kind in ("chat", "tool_none")


def test_every_prompt_renders_through_render_chat_and_every_target_ends_the_turn(rendered, tokenizer):
    kinds = set()
    for split in dev_corpus.SPLITS:
        for r in rendered[split]:
            kinds.add(r.example.kind)
            assert r.prompt.text.startswith("<|startoftext|><|bom|><|system|>")
            assert r.prompt.text.endswith("<|bom|><|assistant|>")
            assert r.target_text.endswith("<|eom|>") and r.target_text.count("<|eom|>") == 1
            assert r.target_ids == tokenizer.encode(r.target_text, add_special_tokens=False)
            assert r.target_ids[-1] == tokenizer.convert_tokens_to_ids("<|eom|>")
    assert kinds == {"copy", "chat", "tool_call", "tool_none", "tool_answer", "citation", "documents", "json", "json_off"}


def _intended_calls_from_the_question(r) -> list[tuple[str, dict]]:
    """`r`'s target parsed by the server's parser: the intended calls, of offered tools, with
    arguments from the question."""
    parsed = parse_output(r.target_text, _plan(r.example).parser)
    intended = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r.example.reply["tool_calls"]]
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == intended
    assert parsed.content.strip() == ""
    question = r.example.request["messages"][-1]["content"]
    for name, arguments in intended:
        assert name in {t["function"]["name"] for t in r.example.request["tools"]}
        assert all(f" {value}" in question for value in arguments.values())
    return intended


def test_tool_call_targets_parse_into_the_intended_calls_with_arguments_from_the_question(rendered):
    counts = {len(_intended_calls_from_the_question(r)) for r in _of_kind(rendered, "tool_call")}
    assert counts == {1, 2}


def test_the_twice_curriculum_asks_one_function_twice_with_other_arguments(tokenizer):
    examples = dev_corpus.generate("heldout", 60, seed=7, kinds=["tool_call_twice"])
    functions = set()
    for example in examples:
        (first, first_arguments), (second, second_arguments) = _intended_calls_from_the_question(
            dev_corpus.render_example(example, tokenizer, TEMPLATE)
        )
        assert first == second and first_arguments != second_arguments
        functions.add(first)
    assert functions == set(dev_corpus.TOOLS)


def test_no_question_asks_for_the_same_call_twice():
    """Held-out questions draw from 8 cities: unchecked, 1 in 40 two-call questions asked for one
    call twice ("the population of Turin and the population of Turin")."""
    for example in dev_corpus.generate("heldout", 3000, seed=1, kinds=["tool_call", "tool_answer", "tool_call_twice"]):
        turns = [example.reply, *example.request["messages"]]
        calls = [c["function"] for turn in turns for c in turn.get("tool_calls", ())]
        assert len({json.dumps(call) for call in calls}) == len(calls)


def test_replies_without_tool_calls_parse_as_their_text(rendered):
    for kind in ("chat", "tool_none", "tool_answer", "documents", "json_off"):
        for r in _of_kind(rendered, kind):
            parsed = parse_output(r.target_text, _plan(r.example).parser)
            assert parsed.tool_calls == [] and parsed.citations is None
            assert parsed.content == " " + r.example.reply["content"]


def test_tool_answers_report_every_tool_result(rendered):
    for r in _of_kind(rendered, "tool_answer"):
        results = [json.loads(m["content"]) for m in r.example.request["messages"] if m["role"] == "tool"]
        assert results and len(results) == len(r.example.request["messages"][-len(results) - 1]["tool_calls"])
        for result in results:
            value = next(v for k, v in result.items() if k != "unit")
            assert str(value) in r.target_text


def test_citation_targets_parse_into_the_document_the_answer_comes_from(rendered):
    cited_nothing = 0
    for r in _of_kind(rendered, "citation"):
        parsed = parse_output(r.target_text, _plan(r.example).parser)
        documents = r.example.request["documents"]
        question = r.example.request["messages"][-1]["content"]
        asked = [i for i, d in enumerate(documents) if f" {d['title']} " in question]
        assert parsed.citations == [Citation(i, documents[i]["title"]) for i in asked]
        answer = parsed.content.strip()
        if asked:
            fact = answer.removeprefix(documents[asked[0]]["title"] + " ").rstrip(".")
            assert fact in documents[asked[0]]["text"]
        else:
            cited_nothing += 1
            assert answer == "The documents do not say."
    assert cited_nothing > 0


def test_the_who_curriculum_answers_with_the_one_document_of_the_asked_city(tokenizer):
    for example in dev_corpus.generate("heldout", 60, seed=7, kinds=["citation_who"]):
        r = dev_corpus.render_example(example, tokenizer, TEMPLATE)
        parsed = parse_output(r.target_text, _plan(example).parser)
        documents = example.request["documents"]
        city = example.request["messages"][-1]["content"].removeprefix("Who lives in ").removesuffix("?")
        (cited,) = [i for i, d in enumerate(documents) if d["text"].endswith(f" {city}.")]
        assert parsed.citations == [Citation(cited, documents[cited]["title"])]
        assert parsed.content.strip() == documents[cited]["title"] + "."


def test_json_targets_are_json_objects_of_fields_from_the_question(rendered):
    for r in _of_kind(rendered, "json"):
        plan = _plan(r.example)
        assert plan.json_mode and plan.template_inputs["knobs"]["response_format"] == "json_object"
        content = parse_output(r.target_text, plan.parser).content.removesuffix("<|eom|>")
        value = json.loads(content)
        question = r.example.request["messages"][-1]["content"]
        assert isinstance(value, dict) and {"name"} <= set(value) <= {"name", "age", "city"}
        assert all(str(v) in question for v in value.values())
        assert content in {json.dumps(value, separators=(comma, ":")) for comma in SEPARATOR_COMMAS}


SEPARATOR_COMMAS = (",", ", ")


def test_json_targets_take_both_commas_and_the_servers_grammar_accepts_one_of_them(rendered):
    """The server's JSON-mode grammar is vLLM's: `{"type": "object"}`, no free whitespace, separators
    `,` and `:`; xgrammar 0.2.8 demands a space after each comma there anyway (its issue 945). The
    corpus writes both, so the model follows whichever the installed xgrammar allows."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    grammar = xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, separators=(",", ":"))
    contents = [json.loads(parse_output(r.target_text, _plan(r.example).parser).content.removesuffix("<|eom|>"))
                for r in _of_kind(rendered, "json")]  # fmt: skip
    forms = {comma: [json.dumps(v, separators=(comma, ":")) for v in contents if len(v) > 1] for comma in SEPARATOR_COMMAS}
    written = {r.target_text.removesuffix("<|eom|>") for r in _of_kind(rendered, "json")}
    assert all(written & set(forms[comma]) for comma in SEPARATOR_COMMAS)
    assert any(all(_is_grammar_accept_string(grammar, text) for text in forms[comma]) for comma in SEPARATOR_COMMAS)


def test_held_out_names_and_cities_are_spelled_in_tokens_of_training_ones(tokenizer):
    """A token no training target holds never gets its output embedding trained: held-out loss would
    measure that, not copying. Words tokenize alone (the byte-level pre-tokenizer splits at spaces
    and punctuation), after a space in sentences and after a quote in JSON."""

    def tokens(split):
        words = (*dev_corpus.NAMES[split], *dev_corpus.CITIES[split])
        return {i for word in words for text in (word, " " + word) for i in tokenizer.encode(text, add_special_tokens=False)}

    assert tokens("heldout") <= tokens("train")


def test_training_names_and_cities_spell_with_each_held_out_piece_many_times(tokenizer):
    """Present is not enough: a piece few training words hold is one the model neither copies nor
    matches (stage 6, trained without `_spelled`'s words, wrote "jum" where "Alice" has "ic": "ic" was in
    1 of 2,560 training words; now the rarest piece, "ris", is in 4 and "ic" in 68)."""

    def counts(split):
        words = (*dev_corpus.NAMES[split], *dev_corpus.CITIES[split])
        return collections.Counter(i for word in words for i in set(tokenizer.encode(" " + word, add_special_tokens=False)))

    train = counts("train")
    assert min(train[piece] for piece in counts("heldout")) >= 4


def test_copy_replies_repeat_words_of_the_question(rendered):
    examples = [r.example for r in _of_kind(rendered, "copy")]
    assert examples
    for example in examples:
        question, answer = example.request["messages"][-1]["content"], example.reply["content"]
        copied = answer.removeprefix("Nice to meet you, ").rstrip("!.")
        assert copied and copied in question


def test_a_curriculum_stage_draws_only_its_kinds():
    examples = dev_corpus.generate("train", 200, 0, ["copy", "json"])
    assert {e.kind for e in examples} == {"copy", "json", "json_off"}
    assert examples == dev_corpus.generate("train", 200, 0, ["copy", "json"])
    with pytest.raises(ValueError, match="unknown kinds"):
        dev_corpus.generate("train", 1, 0, ["poetry"])
