"""Greedy tokens from the server equal transformers' JambaForCausalLM.generate on the trained dev model, with
prefix caching on (the dev preset) whether a prompt is computed from scratch or mostly read from the
prefix cache (attention blocks and the Mamba state saved at a block boundary)."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, JambaForCausalLM

from tests.support import MODEL_NAME, assert_logprobs_close, start_server

# The trained model (issue 18): with learned weights the Mamba state moves the logits, so a state
# restored wrong shows in the tokens as well as the logprobs.

PROMPTS = [
    "The quick brown fox",
    "What's the weather like right now in Jerusalem and in London?",
    "<|bom|><|user|> Hello!<|eom|><|bom|><|assistant|>",
    # ~650 tokens: five of the CPU backend's 128-token cache blocks, for the cache-hit checks
    " ".join(f"Note {i}: the ferry leaves the north pier at dawn." for i in range(20)),
]
LONG = len(PROMPTS) - 1
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(trained_model):
    """(prompt ids, greedy continuation) per prompt, from transformers in float32."""
    tokenizer = AutoTokenizer.from_pretrained(trained_model)
    model = JambaForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()
    # As the server's `ignore_eos`: an end token neither stops nor is barred. (`min_new_tokens` would
    # mask them: where greedy picks `<|eom|>`, as on the long prompt, transformers would pick another.)
    model.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True, return_dict_in_generate=True
    )
    cases = []
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, generation_config=config)
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        logprobs = [float(torch.log_softmax(step[0], -1)[t]) for step, t in zip(out.logits, tokens)]
        cases.append((ids[0].tolist(), tokens, logprobs))
    return cases


def server_greedy(base_url: str, prompt_ids: list[int], cache_salt: str | None = None) -> tuple[list[int], list[float]]:
    """The server's greedy tokens and their logprobs."""
    body = {
        "model": MODEL_NAME, "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0, "logprobs": 1,
        "ignore_eos": True, "return_token_ids": True, **({"cache_salt": cache_salt} if cache_salt else {}),
    }  # fmt: skip
    resp = httpx.post(base_url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def assert_matches(got: tuple[list[int], list[float]], tokens: list[int], logprobs: list[float]) -> None:
    assert got[0] == tokens
    assert_logprobs_close(got[1], logprobs)


def test_reference_is_not_degenerate(reference):
    continuations = [tuple(c) for _, c, _ in reference]
    assert len(set(continuations)) == len(continuations)
    assert all(len(c) == NEW_TOKENS for c in continuations)
    assert all(len(set(c)) >= 2 for c in continuations)  # not one token repeated


def assert_matches_cold_and_warm(server, reference) -> None:
    """Every prompt gives transformers' tokens; the long one computed from scratch, then again mostly
    read from the prefix cache."""
    for prompt_ids, tokens, logprobs in reference[:LONG]:
        assert_matches(server_greedy(server.base_url, prompt_ids), tokens, logprobs)
    prompt_ids, tokens, logprobs = reference[LONG]
    cold, warm = server.cold_then_warm(lambda salt: server_greedy(server.base_url, prompt_ids, salt), lambda _: len(prompt_ids))
    assert_matches(cold, tokens, logprobs)
    assert_matches(warm, tokens, logprobs)


def test_greedy_matches_transformers_tp1(trained_server, reference):
    assert_matches_cold_and_warm(trained_server, reference)


def test_greedy_matches_transformers_tp2(trained_model, reference):
    tp2 = start_server("--model", str(trained_model), "--tensor-parallel-size", "2", "--max-num-seqs", "4")
    try:
        assert_matches_cold_and_warm(tp2, reference)
    finally:
        assert tp2.stop() == 0
