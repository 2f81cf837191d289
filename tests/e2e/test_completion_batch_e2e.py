"""/v1/completions with a list of prompts, through the openai client: prompt i's choice j has index
i*n + j, echo and token ids per prompt, usage summed, the stream interleaved with the right indexes,
and a bad prompt is a 400 naming its index."""

from __future__ import annotations

from collections import defaultdict

import openai
import pytest

from tests.support import MODEL_NAME

PROMPTS = ["Hello there", "The dog", "One two three four"]


def _ids(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_three_prompts_two_choices_each(client, http):
    done = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS, n=2, max_tokens=3, echo=True, temperature=1.0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert sorted(c.index for c in done.choices) == list(range(6))
    prompt_ids = [_ids(http, p) for p in PROMPTS]
    for choice in done.choices:
        prompt = choice.index // 2
        assert choice.text.startswith(PROMPTS[prompt]) and len(choice.token_ids) == 3
        assert choice.prompt_token_ids == prompt_ids[prompt]
    assert done.usage.prompt_tokens == sum(map(len, prompt_ids)) and done.usage.completion_tokens == 18


def test_three_prompts_two_choices_each_streamed(client):
    texts: dict[int, str] = defaultdict(str)
    finishes: dict[int, list[str]] = defaultdict(list)
    usage = None
    for chunk in client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS, n=2, max_tokens=3, echo=True, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "allowed_token_ids": [354, 584]},
    ):  # fmt: skip
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert sorted(texts) == list(range(6)) and all(finishes[i] == ["length"] for i in range(6))
    for index, text in texts.items():
        generated = text.removeprefix(PROMPTS[index // 2])
        assert generated != text and set(generated.split()) <= {"you", "dog"} and len(generated.split()) == 3
    assert usage.completion_tokens == 18


def test_token_id_prompts_and_a_bad_prompt_named_by_index(client, http):
    ids = [_ids(http, p) for p in PROMPTS[:2]]
    done = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=2, extra_body={"return_token_ids": True})
    assert [c.prompt_token_ids for c in sorted(done.choices, key=lambda c: c.index)] == ids
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL_NAME, prompt=[ids[0], [10**7]], max_tokens=2)
    assert refused.value.body["param"] == "prompt[1]"
