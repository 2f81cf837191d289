import pytest

from jamba_server.core.sampling import resolve_max_tokens, sampling_spec
from jamba_server.errors import ContextLengthExceededError, InvalidRequestError
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest

MSG = [{"role": "user", "content": "hi"}]


def spec(request, prompt_tokens=10, max_model_len=100, vocab=50):
    return sampling_spec(request, prompt_tokens=prompt_tokens, max_model_len=max_model_len, vocab_size=vocab)


def test_defaults_fill_the_context():
    s = spec(ChatCompletionRequest(model="m", messages=MSG))
    assert s.max_tokens == 90
    assert (s.temperature, s.top_p, s.top_k, s.n, s.logprobs) == (1.0, 1.0, 0, 1, None)


def test_fields_carried_over():
    req = ChatCompletionRequest(
        model="m", messages=MSG, max_tokens=5, temperature=0, top_k=-1, seed=3, stop=["a", "b"],
        logit_bias={"7": -100}, logprobs=True, top_logprobs=3, presence_penalty=0.5, ignore_eos=True,
    )  # fmt: skip
    s = spec(req)
    assert s.max_tokens == 5 and s.temperature == 0 and s.top_k == 0 and s.seed == 3
    assert s.stop == ("a", "b") and s.logit_bias == {7: -100} and s.logprobs == 3
    assert s.presence_penalty == 0.5 and s.ignore_eos


def test_logprobs_without_top_is_zero_alternatives():
    assert spec(ChatCompletionRequest(model="m", messages=MSG, logprobs=True)).logprobs == 0
    assert spec(CompletionRequest(model="m", prompt="x", logprobs=2)).logprobs == 2


def test_context_checks():
    assert resolve_max_tokens(90, 10, 100) == 90
    with pytest.raises(ContextLengthExceededError) as info:
        resolve_max_tokens(91, 10, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError):
        resolve_max_tokens(None, 100, 100)


def test_logit_bias_outside_vocab():
    with pytest.raises(InvalidRequestError) as info:
        spec(ChatCompletionRequest(model="m", messages=MSG, logit_bias={"50": 1}))
    assert info.value.param == "logit_bias"


def test_min_tokens_above_max_tokens():
    with pytest.raises(InvalidRequestError):
        spec(ChatCompletionRequest(model="m", messages=MSG, max_tokens=2, min_tokens=3))


def test_default_max_tokens_respects_the_server_cap():
    assert resolve_max_tokens(None, 10, 100, default_cap=16) == 16
    assert resolve_max_tokens(None, 95, 100, default_cap=16) == 5
    s = sampling_spec(CompletionRequest(model="m", prompt="x"), prompt_tokens=2, max_model_len=100, vocab_size=50, max_tokens_cap=7)
    assert s.max_tokens == 7


def test_token_level_options_reach_the_spec_and_are_checked():
    request = CompletionRequest(model="m", prompt="x", max_tokens=4, stop_token_ids=[3], allowed_token_ids=[3, 4],
                                bad_words=["no"], include_stop_str_in_output=True, skip_special_tokens=False)  # fmt: skip
    spec = sampling_spec(request, prompt_tokens=1, max_model_len=64, vocab_size=10)
    assert (spec.stop_token_ids, spec.allowed_token_ids, spec.bad_words) == ((3,), (3, 4), ("no",))
    assert spec.include_stop_str_in_output and spec.keep_special_tokens
    for field in ("stop_token_ids", "allowed_token_ids"):
        with pytest.raises(InvalidRequestError) as refused:
            sampling_spec(CompletionRequest(model="m", prompt="x", max_tokens=4, **{field: [10]}), prompt_tokens=1, max_model_len=64, vocab_size=10)
        assert refused.value.param == field
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], skip_special_tokens=False)
    with pytest.raises(InvalidRequestError) as refused:
        sampling_spec(chat, prompt_tokens=1, max_model_len=64, vocab_size=10)
    assert refused.value.param == "skip_special_tokens"
