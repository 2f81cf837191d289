"""vLLM's token-level request options through the live server (extensions, sent with the openai
client's `extra_body`): allowed_token_ids, bad_words, stop_token_ids, include_stop_str_in_output,
skip_special_tokens; ids outside the vocabulary are 400s naming the field."""

from __future__ import annotations

import openai
import pytest

from tests.support import MODEL_NAME

PROMPT = "Hello there"


def _ids(http, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]


def test_allowed_token_ids_and_bad_words_shape_what_is_sampled(client, http):
    (a,), (b,) = _ids(http, " you"), _ids(http, " dog")
    allowed = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3,
        extra_body={"allowed_token_ids": [a, b], "ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert set(allowed.choices[0].token_ids) <= {a, b} and len(allowed.choices[0].token_ids) == 12
    only_dog = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3,
        extra_body={"allowed_token_ids": [a, b], "bad_words": ["you"], "ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert only_dog.choices[0].token_ids == [b] * 12 and only_dog.choices[0].text == " dog" * 12


def test_stop_token_ids_end_the_choice(client, http):
    (a,), (b,) = _ids(http, " you"), _ids(http, " dog")
    body = {"allowed_token_ids": [a, b], "logit_bias": {str(a): 100}, "return_token_ids": True}
    plain = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=body)
    assert plain.choices[0].token_ids == [a] * 6 and plain.choices[0].finish_reason == "length"
    stopped = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={**body, "stop_token_ids": [a]}
    )
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""


def test_include_stop_str_in_output(client, http):
    (a,) = _ids(http, " you")
    body = {"allowed_token_ids": [a], "ignore_eos": True}
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, stop=["you you"], extra_body=body)
    kept = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0, stop=["you you"], extra_body={**body, "include_stop_str_in_output": True}
    )
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (" ", "stop")
    assert (kept.choices[0].text, kept.choices[0].finish_reason) == (" you you", "stop")


def test_skip_special_tokens_false_shows_them_on_completions_only(client, http):
    (eom,) = _ids(http, "<|eom|>")
    body = {"allowed_token_ids": [eom], "ignore_eos": True}
    hidden = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0, extra_body=body)
    shown = client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={**body, "skip_special_tokens": False}
    )
    assert hidden.choices[0].text == "" and shown.choices[0].text == "<|eom|><|eom|>"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"skip_special_tokens": False}
        )
    assert refused.value.body["param"] == "skip_special_tokens"


@pytest.mark.parametrize("field", ["allowed_token_ids", "stop_token_ids"])
def test_token_ids_outside_the_vocabulary_are_400s(http, field):
    resp = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, field: [10**7]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == field
