"""The engine adapter: the prompt it hands vLLM (a rendered token input, a cache salt riding on it,
as vLLM 0.32 takes it), prompt logprobs as plain data, and the stream interval it gives streams."""

from jamba_server.runtime.vllm_engine import engine_prompt


def test_cache_salt_goes_on_the_prompt_dict():
    assert engine_prompt([1, 2], "tenant") == {"type": "token", "prompt_token_ids": [1, 2], "cache_salt": "tenant"}
    assert engine_prompt([1, 2]) == {"type": "token", "prompt_token_ids": [1, 2]}


def test_prompt_logprobs_become_plain_data_with_finite_values():
    from vllm.logprobs import Logprob

    from jamba_server.core.outputs import PromptTokenLogprob
    from jamba_server.runtime.vllm_engine import _prompt_logprobs

    converted = _prompt_logprobs([None, {4: Logprob(-0.25, 1, " x"), 8: Logprob(float("-inf"), 600, " y")}])
    assert converted == (None, (PromptTokenLogprob(4, -0.25, 1, " x"), PromptTokenLogprob(8, -9999.0, 600, " y")))
    assert _prompt_logprobs([]) is None and _prompt_logprobs(None) is None  # later delta outputs


# ---- the adaptive stream interval as the adapter applies it (a fake AsyncLLM in vLLM's place)


def _output(tokens: int, finished: bool = False):
    from types import SimpleNamespace

    choice = SimpleNamespace(index=0, text="x" * tokens, token_ids=list(range(tokens)), logprobs=None,
                             finish_reason="length" if finished else None, stop_reason=None)  # fmt: skip
    return SimpleNamespace(outputs=[choice], prompt_token_ids=[1, 2], finished=finished, prompt_logprobs=None)


class FakeAsyncLLM:
    """vLLM's `AsyncLLM.generate` as the adapter uses it: each request's outputs, then done."""

    errored = False

    def __init__(self, outputs_per_request: list):
        self.outputs = outputs_per_request
        self.started: list = []  # (request_id, the params' stream_interval when vLLM got them)
        self.kinds: list = []  # the params' output kind when vLLM got them

    async def generate(self, prompt, params, request_id, priority=0):
        import asyncio

        self.started.append((request_id, params.stream_interval))
        self.kinds.append(params.output_kind)
        for output in self.outputs:
            await asyncio.sleep(0.001)  # an engine step
            yield output

    async def abort(self, request_id):
        pass


def _adapter(outputs: list, **settings):
    from jamba_server.runtime.vllm_engine import EngineAdapter
    from jamba_server.settings import Settings

    adapter = EngineAdapter(Settings(model="unused", **settings))
    adapter.engine = FakeAsyncLLM(outputs)
    return adapter


def _params():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=8)


def test_a_stream_under_load_gets_the_policys_interval_and_others_keep_vllms():
    import asyncio

    adapter = _adapter([_output(1), _output(1, finished=True)], stream_coalesce_gap=0.05, stream_coalesce_min_streams=3)
    adapter.pace.seconds_per_token = 0.010

    async def scenario():
        streams = [adapter.generate([1, 2], _params(), f"s{i}", stream=True) for i in range(3)]
        for s in streams:  # each started (its first step taken) before the next: 1, 2, 3 running
            await anext(s)
        assert adapter.streams == 3
        whole = adapter.generate([1, 2], _params(), "whole")  # not a stream: never coalesced
        assert [step async for step in whole][-1].finished
        for s in streams:
            await s.aclose()
        assert adapter.streams == 0

    asyncio.run(scenario())
    assert adapter.engine.started == [("s0", 1), ("s1", 1), ("s2", 5), ("whole", None)]


def test_the_pace_is_measured_between_a_requests_outputs():
    import asyncio

    async def run(outputs: list) -> float | None:
        adapter = _adapter(outputs)
        steps = [step async for step in adapter.generate([1, 2], _params(), "r", stream=True)]
        assert steps[-1].finished and adapter.streams == 0
        return adapter.pace.seconds_per_token

    assert asyncio.run(run([_output(1, finished=True)])) is None  # a prefill alone is no gap
    pace = asyncio.run(run([_output(1), _output(3, finished=True)]))
    assert pace is not None and pace > 0


def test_a_non_streaming_request_asks_for_its_whole_output_once_with_the_engines_timing():
    """Nobody reads a non-streaming request's steps: vLLM builds one output at the end (FINAL_ONLY),
    and the step carries the engine's first-to-last-token time for the latency metrics."""
    import asyncio
    from types import SimpleNamespace

    from vllm.sampling_params import RequestOutputKind

    final = _output(4, finished=True)
    final.metrics = SimpleNamespace(first_token_ts=100.0, last_token_ts=100.3)
    adapter = _adapter([final])

    async def run(stream: bool):
        params = _params()
        params.output_kind = RequestOutputKind.DELTA  # as the adapter's sampling_params builds them
        return [step async for step in adapter.generate([1, 2], params, "r", stream=stream)]

    whole = asyncio.run(run(False))
    assert len(whole) == 1 and abs(whole[0].generation_seconds - 0.3) < 1e-9
    assert abs(adapter.pace.seconds_per_token - 0.1) < 1e-9  # the engine's pace: 0.3 s over 3 gaps
    streamed = asyncio.run(run(True))
    assert streamed[0].generation_seconds is None  # a stream's steps are timed as they come
    assert adapter.engine.kinds == [RequestOutputKind.FINAL_ONLY, RequestOutputKind.DELTA]
    final.metrics = None  # vLLM without stats: no engine timing
    assert asyncio.run(run(False))[0].generation_seconds is None
