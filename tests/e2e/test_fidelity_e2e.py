"""Greedy tokens from the server equal transformers' JambaForCausalLM.generate on the dev model."""

from __future__ import annotations

import httpx
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, JambaForCausalLM

from tests.support import MODEL_NAME, start_server

PROMPTS = [
    "The quick brown fox",
    "What's the weather like right now in Jerusalem and in London?",
    "<|bom|><|user|> Hello!<|eom|><|bom|><|assistant|>",
]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def reference(dev_model):
    """(prompt ids, greedy continuation) per prompt, from transformers in float32."""
    tokenizer = AutoTokenizer.from_pretrained(dev_model)
    model = JambaForCausalLM.from_pretrained(dev_model, dtype=torch.float32).eval()
    config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    cases = []
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, generation_config=config)
        cases.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist()))
    return cases


def server_greedy(base_url: str, prompt_ids: list[int]) -> list[int]:
    body = {
        "model": MODEL_NAME, "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True,
    }  # fmt: skip
    resp = httpx.post(base_url + "/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["token_ids"]


def test_reference_is_not_degenerate(reference):
    continuations = [tuple(c) for _, c in reference]
    assert len(set(continuations)) == len(continuations)
    assert all(len(set(c)) >= 2 for c in continuations)  # not one token repeated


def test_greedy_matches_transformers_tp1(server, reference):
    for prompt_ids, expected in reference:
        assert server_greedy(server.base_url, prompt_ids) == expected


def test_greedy_matches_transformers_tp2(dev_model, reference):
    tp2 = start_server("--tensor-parallel-size", "2", "--max-num-seqs", "4")
    try:
        for prompt_ids, expected in reference:
            assert server_greedy(tp2.base_url, prompt_ids) == expected
    finally:
        assert tp2.stop() == 0
