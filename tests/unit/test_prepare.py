"""Request → GenerationJob for chat and completions, with the engine left out (the dev tokenizer)."""

from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from jamba_server.errors import InvalidRequestError
from jamba_server.core.prepare import prepare_chat, prepare_completion
from jamba_server.protocol import ChatCompletionRequest, CompletionRequest
from jamba_server.settings import DEFAULT_TEMPLATE, Settings

TEMPLATE = DEFAULT_TEMPLATE.read_text(encoding="utf-8")
SETTINGS = Settings(model="m", max_tokens_limit=64)


class SpyTokenizer:
    """The dev tokenizer, recording how many ids it was asked to decode."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.decoded: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.fixture(scope="module")
def engine(dev_model):
    tokenizer = SpyTokenizer(AutoTokenizer.from_pretrained(dev_model))
    return SimpleNamespace(tokenizer=tokenizer, max_model_len=1024, vocab_size=1024, engine_params=lambda spec: spec)


def test_chat_job_carries_prompt_spec_features_and_renderers(engine):
    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}, "response_format": {"type": "json_object"},
    })  # fmt: skip
    job = prepare_chat(body, engine, SETTINGS, TEMPLATE)
    assert job.id_prefix == "chatcmpl" and job.stream and job.include_usage and job.json_mode
    assert job.features == ("json_mode",)
    assert job.prompt.text.endswith("<|bom|><|assistant|>") and job.prompt.token_ids[0] == 1
    assert job.spec.max_tokens == 64  # the server's cap, as the default
    streamer = job.renderers.streamer("chatcmpl-1", "served")
    assert '"role":"assistant"' in "".join(job.renderers.opening(streamer)).replace(" ", "")


def test_completion_echo_is_decoded_only_after_the_length_check(engine):
    engine.tokenizer.decoded.clear()
    too_long = CompletionRequest(model="m", prompt=[5] * 2000, echo=True, max_tokens=4)
    with pytest.raises(InvalidRequestError):
        prepare_completion(too_long, engine, SETTINGS)
    assert engine.tokenizer.decoded == []  # a 2M-id prompt would have been decoded before the 400
    fits = CompletionRequest(model="m", prompt=[5] * 10, echo=True, max_tokens=4)
    job = prepare_completion(fits, engine, SETTINGS)
    assert engine.tokenizer.decoded == [10] and job.prompt.text
    accumulator = job.renderers.accumulator("cmpl-1", "served")
    assert accumulator.build().choices[0].text == job.prompt.text  # the echo leads the text


def test_completion_token_ids_outside_the_vocabulary(engine):
    with pytest.raises(InvalidRequestError) as info:
        prepare_completion(CompletionRequest(model="m", prompt=[1, 5000]), engine, SETTINGS)
    assert info.value.param == "prompt"


def _completion(**fields):
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": 2, **fields})


def test_priority_needs_a_priority_scheduling_server(engine):
    with pytest.raises(InvalidRequestError) as refused:
        prepare_completion(_completion(priority=3), engine, SETTINGS)
    assert refused.value.param == "priority"
    assert prepare_completion(_completion(priority=0), engine, SETTINGS).priority == 0
    by_priority = Settings(model="m", scheduling_policy="priority")
    assert prepare_completion(_completion(priority=-7), engine, by_priority).priority == -7
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "priority": 2})
    assert prepare_chat(chat, engine, by_priority, TEMPLATE).priority == 2
    with pytest.raises(InvalidRequestError, match="scheduling-policy"):
        prepare_chat(chat, engine, SETTINGS, TEMPLATE)


def test_cache_salt_rides_on_the_job(engine):
    assert prepare_completion(_completion(cache_salt="tenant-a"), engine, SETTINGS).cache_salt == "tenant-a"
    assert prepare_completion(_completion(), engine, SETTINGS).cache_salt is None


def test_prompt_logprobs_reach_the_spec_and_are_refused_with_stream(engine):
    assert prepare_completion(_completion(prompt_logprobs=3), engine, SETTINGS).spec.prompt_logprobs == 3
    with pytest.raises(InvalidRequestError) as refused:
        prepare_completion(_completion(prompt_logprobs=1, stream=True), engine, SETTINGS)
    assert refused.value.param == "prompt_logprobs"
    assert prepare_completion(_completion(prompt_logprobs=0, stream=True), engine, SETTINGS).spec.prompt_logprobs == 0


def test_a_list_of_prompts_is_one_run_each_with_its_own_room(engine):
    body = CompletionRequest.model_validate({"model": "m", "prompt": [[20, 21, 22], [30]], "n": 2, "echo": True})
    job = prepare_completion(body, engine, SETTINGS)
    assert [r.prompt.token_ids for r in job.runs] == [[20, 21, 22], [30]]
    assert [r.spec.max_tokens for r in job.runs] == [64, 64]  # the cap; each prompt's room is checked apart
    texts = [engine.tokenizer.decode([20, 21, 22]), engine.tokenizer.decode([30])]
    built = job.renderers.accumulator("cmpl-1", "m").build([0])
    assert [c.text for c in built.choices] == [texts[0], texts[0], texts[1], texts[1]]
    assert [c.prompt_token_ids for c in built.choices] == [[20, 21, 22]] * 2 + [[30]] * 2 and built.prompt_token_ids is None
    strings = prepare_completion(CompletionRequest.model_validate({"model": "m", "prompt": ["hi", "you"]}), engine, SETTINGS)
    assert len(strings.runs) == 2 and strings.runs[1].prompt.text == "you"


def test_each_prompt_gets_its_own_engine_parameters(engine):
    """The engine adapter marks its parameters `skip_clone` (vLLM copies them shallowly): that holds
    only while no two engine requests share one parameters object."""
    fresh = SimpleNamespace(**{**vars(engine), "engine_params": lambda spec: [spec]})
    body = CompletionRequest.model_validate({"model": "m", "prompt": [[20], [21], [22]], "max_tokens": 2})
    runs = prepare_completion(body, fresh, SETTINGS).runs
    assert len(runs) == 3 and len({id(run.engine_params) for run in runs}) == 3


@pytest.mark.parametrize(
    "prompt, param",
    [(["ok", ""], "prompt[1]"), ([[1, 2], [10**7]], "prompt[1]"), ([[3], []], "prompt[1]"), (["x " * 2000, "ok"], "prompt[0]")],
)
def test_each_prompt_of_a_list_is_checked_naming_it(engine, prompt, param):
    with pytest.raises(InvalidRequestError) as refused:
        prepare_completion(CompletionRequest.model_validate({"model": "m", "prompt": prompt, "max_tokens": 2}), engine, SETTINGS)
    assert refused.value.param == param


def test_prompts_times_n_is_bounded_by_max_n(engine):
    body = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b", "c"], "n": 6, "max_tokens": 2})
    with pytest.raises(InvalidRequestError, match="3 prompts x n=6") as refused:
        prepare_completion(body, engine, Settings(model="m", max_n=16))
    assert refused.value.param == "prompt"
