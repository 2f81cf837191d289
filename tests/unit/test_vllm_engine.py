"""The adapter's prompt for vLLM: a cache salt rides on the token prompt, as vLLM 0.32 takes it."""

from jamba_server.runtime.vllm_engine import engine_prompt


def test_cache_salt_goes_on_the_prompt_dict():
    assert engine_prompt([1, 2], "tenant") == {"prompt_token_ids": [1, 2], "cache_salt": "tenant"}
    assert engine_prompt([1, 2]) == {"prompt_token_ids": [1, 2]}


def test_prompt_logprobs_become_plain_data_with_finite_values():
    from vllm.logprobs import Logprob

    from jamba_server.core.outputs import PromptTokenLogprob
    from jamba_server.runtime.vllm_engine import _prompt_logprobs

    converted = _prompt_logprobs([None, {4: Logprob(-0.25, 1, " x"), 8: Logprob(float("-inf"), 600, " y")}])
    assert converted == (None, (PromptTokenLogprob(4, -0.25, 1, " x"), PromptTokenLogprob(8, -9999.0, 600, " y")))
    assert _prompt_logprobs([]) is None and _prompt_logprobs(None) is None  # later delta outputs
