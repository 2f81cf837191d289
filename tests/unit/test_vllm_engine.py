"""The adapter's prompt for vLLM: a cache salt rides on the token prompt, as vLLM 0.32 takes it."""

from jamba_server.runtime.vllm_engine import engine_prompt


def test_cache_salt_goes_on_the_prompt_dict():
    assert engine_prompt([1, 2], "tenant") == {"prompt_token_ids": [1, 2], "cache_salt": "tenant"}
    assert engine_prompt([1, 2]) == {"prompt_token_ids": [1, 2]}
