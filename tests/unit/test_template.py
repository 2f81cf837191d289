"""The shipped Jamba 1.5 template against the golden cases, through the server's render path."""

import pytest
from transformers import AutoTokenizer

from jamba_server.core.features import plan_chat
from jamba_server.core.prompt import render_chat
from jamba_server.protocol import ChatCompletionRequest
from jamba_server.settings import DEFAULT_TEMPLATE
from tests.support import case_to_request, golden_cases

CASES = golden_cases()
TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(dev_model):
    return AutoTokenizer.from_pretrained(dev_model)


def test_there_are_sixteen_cases():
    assert len(CASES) == 16


def test_dev_model_ships_the_project_template(tokenizer):
    assert tokenizer.chat_template == TEMPLATE


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_through_template(tokenizer, case):
    inputs = {"conversation": case["messages"]}
    for key in ("tools", "documents", "knobs"):
        if key in case:
            inputs[key] = case[key]
    prompt = render_chat(tokenizer, TEMPLATE, inputs, case.get("add_generation_prompt", False))
    assert prompt.text == case["expected"]
    # exactly one BOS, and it is the template's
    assert prompt.token_ids.count(tokenizer.bos_token_id) == 1
    assert prompt.token_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case_through_api_request(tokenizer, case):
    """Every golden case, expressed as an API request, renders to the same bytes."""
    request = ChatCompletionRequest.model_validate({"model": "m", **case_to_request(case)})
    plan = plan_chat(request)
    prompt = render_chat(tokenizer, TEMPLATE, plan.template_inputs, case["add_generation_prompt"])
    assert prompt.text == case["expected"]


def test_assistant_citations_round_trip(tokenizer):
    request = ChatCompletionRequest.model_validate({
        "model": "m", "documents": [{"text": "a"}, {"text": "b"}], "citation_mode": "fast",
        "messages": [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "ans", "citations": [{"document_id": 1, "title": None}, 0]},
            {"role": "user", "content": "q2"},
        ],
    })  # fmt: skip
    text = render_chat(tokenizer, TEMPLATE, plan_chat(request).template_inputs).text
    assert "<|bom|><|assistant|> ans<citations>[1, 0]</citations><|eom|>" in text


def test_special_tokens_are_single_tokens(tokenizer):
    for token in ["<|bom|>", "<|eom|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>",
                  "<tool_calls>", "</tool_calls>", "<citations>", "</citations>"]:  # fmt: skip
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, token
    assert [tokenizer.convert_ids_to_tokens(i) for i in range(4)] == [
        "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|unk|>",
    ]  # fmt: skip


def test_lone_surrogates_are_a_400_not_a_crash(tokenizer):
    from jamba_server.core.prompt import encode_prompt
    from jamba_server.errors import InvalidRequestError

    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "a\ud800b"}]})
    with pytest.raises(InvalidRequestError) as info:
        render_chat(tokenizer, TEMPLATE, plan_chat(request).template_inputs)
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequestError):
        encode_prompt(tokenizer, "x\udfffy")
