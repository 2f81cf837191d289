"""/v1/completions end to end with the official `openai` client against the shared dev-model server:
text and token-id prompts, streaming, echo with logprobs; a raw prompt keeps its control tokens."""

from __future__ import annotations

from tests.support import MODEL_NAME


def test_completions_endpoint(client, http):
    resp = client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=8, temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 8
    ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    assert resp.usage.prompt_tokens == len(ids)
    by_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=8, temperature=0, stream=True)
        if c.choices
    )
    assert streamed == resp.choices[0].text
    echoed = client.completions.create(
        model=MODEL_NAME, prompt="Hello there", max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    assert echoed.choices[0].text.startswith("Hello there")
    assert len(echoed.choices[0].logprobs.tokens) == 3


def test_raw_completion_prompts_keep_control_tokens(http):
    """/v1/completions with a string prompt: the client owns the whole prompt, control tokens too."""
    body = http.post("/tokenize", json={"prompt": "<|bom|><|user|> hi<|eom|>", "add_special_tokens": False}).json()
    assert body["tokens"][:2] == [4, 7] and body["tokens"][-1] == 5
