"""The engine adapter: the only module that imports vllm (besides the CPU plugin vLLM loads itself,
and vllm_api_servers.py, the adapter's multi-process half).

Builds vLLM's v1 `AsyncLLM` from settings, maps the core's `SamplingSpec` onto `SamplingParams`,
and turns vLLM's delta outputs into the core's plain `EngineStep`s. A vLLM upgrade touches this file.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator

import vllm
from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.envs import enable_envs_cache
from vllm.inputs.engine import TokensInput, tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError
from vllm.v1.structured_output.backend_xgrammar import validate_xgrammar_grammar

from jamba_server.core.coalescing import CoalescePolicy, TokenPace
from jamba_server.core.constraints import OutputConstraint, memoized_check
from jamba_server.core.outputs import ChoiceDelta, EngineStep, PromptLogprobs, PromptTokenLogprob, TokenLogprob
from jamba_server.core.prompt import control_spellings
from jamba_server.core.sampling import SamplingSpec
from jamba_server.errors import (
    APIError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from jamba_server.metrics import ABORTED, STREAM_INTERVAL
from jamba_server.settings import Settings

logger = logging.getLogger(__name__)

VLLM_VERSION = vllm.__version__
STOP_TOKENS = ("<|eom|>", "<|endoftext|>")
_MIN_LOGPROB = -9999.0  # JSON has no -inf
# The engine is built as `vllm serve` builds its own: the usage context picks the scheduler's batch
# defaults (vllm/engine/arg_utils.py, `get_batch_defaults`). `AsyncLLM.from_engine_args` defaults to
# ENGINE_CONTEXT, which on an H100 gives max_num_seqs 128 and max_num_batched_tokens 2048 where
# `vllm serve` gets 1024 and 8192: same flags, a fraction of the batch.
USAGE_CONTEXT = UsageContext.OPENAI_API_SERVER


def _cpu_thread_binding(world_size: int) -> str:
    """Split this process's cores evenly over the CPU workers, e.g. "0|1" (vLLM's syntax)."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = max(1, len(cores) // world_size)
    groups = [cores[i * per_rank : (i + 1) * per_rank] or cores[-1:] for i in range(world_size)]
    return "|".join(",".join(str(c) for c in group) for group in groups)


def platform_engine_kwargs(settings: Settings) -> dict[str, Any]:
    """Engine kwargs with the CPU backend's needs applied (see README, "CPU dev mode")."""
    kwargs = settings.engine_kwargs()
    if current_platform.is_cpu():
        if kwargs.get("dtype") == "auto":
            kwargs["dtype"] = "float32"
        world = settings.tensor_parallel_size * settings.pipeline_parallel_size
        if world > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_thread_binding(world)
    # Constrained JSON without free whitespace: bounded schemas then finish in a few dozen tokens
    # instead of a model padding with spaces and newlines.
    kwargs.setdefault("structured_outputs_config", StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True))
    return kwargs


def engine_args(settings: Settings) -> AsyncEngineArgs:
    return AsyncEngineArgs(**platform_engine_kwargs(settings))


@dataclass(frozen=True)
class SharedEngineSeat:
    """An API process's place on an engine core it shares (`api_server_count` > 1): vLLM's client
    addresses for it (its ZMQ listeners, bound by the supervisor) and its index among `count`."""

    addresses: dict[str, Any]
    index: int
    count: int

    def attach(self, args: AsyncEngineArgs) -> AsyncLLM:
        """vLLM's client of the running engine core, as `vllm serve --api-server-count` builds each
        API process's (vllm/entrypoints/launchers/api_server/entry.py): the same config, this rank."""
        args._api_process_count, args._api_process_rank = self.count, self.index
        return AsyncLLM.from_vllm_config(
            args.create_engine_config(USAGE_CONTEXT),
            usage_context=USAGE_CONTEXT,
            enable_log_requests=args.enable_log_requests,
            disable_log_stats=args.disable_log_stats,
            client_addresses=dict(self.addresses),
            client_count=self.count,
            client_index=self.index,
        )


class EngineAdapter:
    """Owns the vLLM engine (or, with a `seat`, a client of one the process shares) and the
    tokenizer the server renders prompts with."""

    def __init__(self, settings: Settings, seat: SharedEngineSeat | None = None):
        self.settings = settings
        self.seat = seat
        self.engine: AsyncLLM | None = None
        self.tokenizer: Any = None
        self.max_model_len = 0
        self.vocab_size = 0
        self._stop_token_ids: list[int] = []
        self._control_token_ids: list[int] = []
        self._special_token_ids: list[int] = []
        # In-flight engine request ids → why we aborted them (None while running normally).
        self._active: dict[str, str | None] = {}
        # Streamed tokens per chunk (core/coalescing.py): the streams running and the engine's pace.
        self.coalesce = CoalescePolicy(settings.stream_interval, settings.stream_coalesce_gap, settings.stream_coalesce_min_streams)
        self.pace = TokenPace()
        self.streams = 0

    @property
    def platform(self) -> str:
        return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)

    def load_tokenizer(self) -> Any:
        source = self.settings.tokenizer or self.settings.model
        # The model's own tokenizer follows its revision, as vLLM's does (tokenizer_revision unset).
        revision = self.settings.revision if self.settings.tokenizer is None else None
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=self.settings.trust_remote_code, revision=revision
        )
        self.tokenizer = tokenizer
        control_spellings(tokenizer)  # the prompt builder's per-tokenizer setup, at start-up
        self._stop_token_ids = [i for i in map(self.token_id, STOP_TOKENS) if i is not None]
        self._control_token_ids = _control_char_tokens(tokenizer)
        self._special_token_ids = _special_tokens(tokenizer)
        return tokenizer

    def start(self) -> None:
        """Load the tokenizer and start the engine (blocking: run it off the event loop)."""
        self.load_tokenizer()
        args = engine_args(self.settings)
        if self.seat is None:
            logger.info("starting vLLM %s engine on %s", VLLM_VERSION, self.platform)
            self.engine = AsyncLLM.from_engine_args(args, usage_context=USAGE_CONTEXT)
        else:
            logger.info("attaching to the vLLM %s engine core as client %d of %d", VLLM_VERSION, self.seat.index, self.seat.count)
            self.engine = self.seat.attach(args)
        self.max_model_len = self.engine.model_config.max_model_len
        self.vocab_size = self.engine.model_config.get_vocab_size()
        # vLLM reads its environment variables on every access until `enable_envs_cache()`, which
        # its engine core and workers call once started and its API server never does: the output
        # processor's stats read two per generated token. Nothing sets them once the engine is up.
        enable_envs_cache()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    @property
    def dead(self) -> bool:
        return self.engine is not None and self.engine.errored

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else token_id

    def sampling_params(self, spec: SamplingSpec) -> SamplingParams:
        logit_bias = dict(spec.logit_bias)
        for token in spec.banned_tokens:
            token_id = self.token_id(token)
            if token_id is not None:
                logit_bias[token_id] = -100.0
        structured = None
        if spec.constraint is not None:
            structured = StructuredOutputsParams(**spec.constraint.vllm_fields())
            # xgrammar matches a control token against the text it spells (`<tool_calls>` for a
            # grammar's "<tool_calls>"), and a detokenizer that skips special tokens then drops that
            # text: the output would not match its constraint. Constrained output spells them in text.
            ends = set(spec.stop_token_ids) | set(self._stop_token_ids)
            for token_id in self._special_token_ids:
                if token_id not in ends:
                    logit_bias[token_id] = -100.0
            if spec.constraint.free_text_is_json:
                # xgrammar 0.2.8's JSON strings admit raw control characters, which strict JSON
                # parsers reject; with no free whitespace no such token is ever needed. (A regex,
                # grammar or tag's free text may ask for a newline: those are the client's to write.)
                for token_id in self._control_token_ids:
                    logit_bias[token_id] = -100.0
        params = SamplingParams(
            n=spec.n,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,
            min_p=spec.min_p,
            seed=spec.seed,
            stop=list(spec.stop) or None,
            # ignore_eos means "run to max_tokens": the end-of-turn tokens must not stop it either.
            stop_token_ids=list(spec.stop_token_ids) + ([] if spec.ignore_eos else list(self._stop_token_ids)) or None,
            include_stop_str_in_output=spec.include_stop_str_in_output,
            bad_words=list(spec.bad_words) or None,
            allowed_token_ids=list(spec.allowed_token_ids) if spec.allowed_token_ids else None,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            repetition_penalty=spec.repetition_penalty,
            logit_bias=logit_bias or None,
            logprobs=spec.logprobs,
            prompt_logprobs=spec.prompt_logprobs,
            min_tokens=spec.min_tokens,
            ignore_eos=spec.ignore_eos,
            skip_special_tokens=not spec.keep_special_tokens,
            spaces_between_special_tokens=False,
            structured_outputs=structured,
            # Per-step deltas; `generate` asks a non-streaming request's for its whole output at once
            # (FINAL_ONLY: a delta from nothing, as it reads it).
            output_kind=RequestOutputKind.DELTA,
            # Made for one engine request (each prompt gets its own), as vLLM's server makes its
            # own: vLLM then copies it shallowly instead of deep-copying it (schema included) per
            # request (~0.07 ms of the API process's CPU per JSON request here).
            skip_clone=True,
        )
        if spec.constraint is not None:
            check_constraint(spec.constraint)
        return params

    def engine_params(self, spec: SamplingSpec) -> SamplingParams:
        """The request's vLLM parameters, checked as vLLM would check them (grammar compiled): the
        last step of preparing a request, so anything vLLM would refuse is a 400 before admission."""
        try:
            return self.sampling_params(spec)
        except (ValueError, VLLMClientError) as exc:
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from exc

    @property
    def max_num_seqs(self) -> int | None:
        return self.engine.vllm_config.scheduler_config.max_num_seqs if self.engine else None

    async def abort(self, request_id: str, cause: str) -> None:
        """Abort one running engine request; its stream ends with the error for `cause`. Counted
        once: a request already finished or aborted (e.g. by its deadline timer) is left alone."""
        if self._active.get(request_id, cause) is None and self.engine is not None:
            self._active[request_id] = cause
            ABORTED.labels(cause).inc()
            await self.engine.abort(request_id)

    async def abort_all(self, cause: str) -> int:
        ids = list(self._active)
        for request_id in ids:
            await self.abort(request_id, cause)
        return len(ids)

    @staticmethod
    def _abort_error(cause: str | None) -> APIError:
        if cause == "deadline":
            return RequestTimeoutError("The request did not finish before its deadline.")
        if cause == "shutdown":
            return ServiceUnavailableError("The server shut down before the request finished.", code="shutting_down")
        return ServiceUnavailableError("The engine aborted the request.")

    def _shape_outputs(self, params: SamplingParams, stream: bool) -> None:
        """A stream starting now (it counts itself among those running) gets the policy's interval.
        Nobody reads a non-streaming request's steps: vLLM builds its output once, at the end,
        instead of a RequestOutput per engine step (as vLLM's own server asks for them)."""
        if stream:
            params.stream_interval = self.coalesce.interval(self.streams + 1, self.pace.seconds_per_token)
            STREAM_INTERVAL.labels(self.settings.public_model_name).observe(params.stream_interval)
        else:
            params.output_kind = RequestOutputKind.FINAL_ONLY

    def _observe_pace(self, output: Any, gap: float | None, generation: float | None) -> None:
        """The engine's pace (for the stream interval) from a stream's gap between two outputs, or
        from a whole output's engine timing (its tokens' gaps, first to last)."""
        if not output.outputs:
            return
        tokens = len(output.outputs[0].token_ids)
        if generation is not None:
            self.pace.observe(generation, tokens - 1)
        elif gap is not None:
            self.pace.observe(gap, tokens)

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        deadline: float | None = None,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        stream: bool = False,
    ) -> AsyncIterator[EngineStep]:
        """Stream the request's outputs; closing the iterator aborts the engine request.

        `deadline` is an event-loop time; past it the engine request is aborted and the stream
        raises `RequestTimeoutError`. A `stream` (a client reads its steps as they come) gets the
        stream interval `coalesce` picks now: its later steps may carry several tokens each.
        """
        if not self.ready:
            raise ServiceUnavailableError("the engine is not available")
        want = params.logprobs
        prompt = engine_prompt(prompt_token_ids, cache_salt)
        loop = asyncio.get_running_loop()
        timer = None
        if deadline is not None:
            timer = loop.call_at(deadline, lambda: loop.create_task(self.abort(request_id, "deadline")))
        self._shape_outputs(params, stream)
        last = None
        self._active[request_id] = None
        self.streams += stream
        try:
            async with aclosing(self.engine.generate(prompt, params, request_id, priority=priority)) as outputs:
                async for output in outputs:
                    # An abort can come before vLLM has registered the request (its first add_request
                    # asks the engine core for its tasks), and then vLLM drops it: our own mark ends it.
                    cause = self._active.get(request_id)
                    if cause is not None or any(o.finish_reason == "abort" for o in output.outputs):
                        raise self._abort_error(cause)
                    generation = None if stream else _generation_seconds(output)
                    now = loop.time()
                    self._observe_pace(output, None if last is None else now - last, generation)
                    last = now
                    yield _engine_step(output, want, len(prompt_token_ids), generation)
        except (EngineDeadError, EngineGenerateError) as exc:
            raise ServiceUnavailableError(f"the engine failed: {exc}") from exc
        except (ValueError, VLLMClientError) as exc:  # vLLM's own request validation
            raise InvalidRequestError(str(exc), param=getattr(exc, "parameter", None)) from exc
        finally:
            if timer is not None:
                timer.cancel()
            self._active.pop(request_id, None)
            self.streams -= stream


def engine_prompt(prompt_token_ids: list[int], cache_salt: str | None = None) -> TokensInput:
    """vLLM's rendered input for token ids, as its own server hands `generate` (a cache salt rides
    on it: vLLM hashes it into the first block). Rendered, so vLLM checks it inline (length, ids in
    the vocabulary) rather than sending a raw prompt through its renderer's thread pool: one thread
    round trip per request less."""
    return tokens_input(prompt_token_ids, cache_salt=cache_salt)


_CONSTRAINT_NAMES = {
    "json": "the JSON schema",
    "regex": "the regex",
    "choice": "the choices",
    "grammar": "the grammar",
    "structural_tag": "the structural tag",
}


def check_constraint(constraint: OutputConstraint) -> None:
    """Compile-check the output constraint with vLLM's own xgrammar validation (the check vLLM's
    server runs before admission), so a schema, regex, grammar or tag the grammar backend cannot take
    is the client's 400 naming the field, not an engine error. Needs no engine. It checks a copy:
    vLLM's `add_request` validates the request's own parameters again (and rewrites a `choice`)."""
    problem = grammar_problem(constraint.vllm_fields())
    if problem is not None:
        raise InvalidRequestError(
            f"{_CONSTRAINT_NAMES[constraint.kind]} cannot be compiled by the grammar backend: {problem}",
            param=constraint.param,
        )


@memoized_check
def grammar_problem(fields: dict[str, Any]) -> str | None:
    """Why vLLM's xgrammar validation refuses these `StructuredOutputsParams` fields, or None."""
    try:
        validate_xgrammar_grammar(SamplingParams(structured_outputs=StructuredOutputsParams(**fields)))
    except (ValueError, RuntimeError, VLLMClientError) as exc:
        message, cause = _xgrammar_message(exc), exc.__cause__
        if cause is not None and _xgrammar_message(cause) not in message:
            message = f"{message.rstrip('.')}: {_xgrammar_message(cause)}"
        return message
    return None


# xgrammar's errors start with a time and a source location: `[15:00:34] /project/cpp/x.cc:83: `.
_XGRAMMAR_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _xgrammar_message(exc: BaseException) -> str:
    return _XGRAMMAR_PREFIX.sub("", str(exc)).strip()


def _special_tokens(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special and added tokens (Jamba's control tokens)."""
    return sorted(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))


def _control_char_tokens(tokenizer: Any) -> list[int]:
    """Ids of tokens whose text holds a character below U+0020 (not allowed raw in JSON)."""
    special = set(tokenizer.all_special_ids)
    return [
        token_id
        for token_id in range(len(tokenizer))
        if token_id not in special and any(ord(ch) < 0x20 for ch in tokenizer.decode([token_id]))
    ]


def _generation_seconds(output: Any) -> float | None:
    """The engine's time from a request's first token to its last (its stats, kept while vLLM logs
    stats), None without them."""
    stats = getattr(output, "metrics", None)
    first, last = getattr(stats, "first_token_ts", 0.0), getattr(stats, "last_token_ts", 0.0)
    return last - first if first and last >= first else None


def _engine_step(output: Any, want_logprobs: int | None, prompt_tokens: int, generation: float | None) -> EngineStep:
    """One vLLM `RequestOutput` as plain data."""
    return EngineStep(
        choices=tuple(_choice_delta(o, want_logprobs) for o in output.outputs),
        prompt_tokens=len(output.prompt_token_ids or ()) or prompt_tokens,
        finished=output.finished,
        prompt_logprobs=_prompt_logprobs(output.prompt_logprobs),
        generation_seconds=generation,
    )


def _choice_delta(output: Any, want_logprobs: int | None) -> ChoiceDelta:
    logprobs = None
    if want_logprobs is not None and output.logprobs is not None:
        logprobs = tuple(
            _token_logprob(token_id, position, want_logprobs)
            for token_id, position in zip(output.token_ids, output.logprobs)
        )
    return ChoiceDelta(
        index=output.index,
        text=output.text,
        token_ids=tuple(output.token_ids),
        logprobs=logprobs,
        finish_reason=output.finish_reason,
        stop_sequence=output.stop_reason if isinstance(output.stop_reason, str) else None,
    )


def _prompt_logprobs(positions: Any) -> PromptLogprobs | None:
    """vLLM's prompt logprobs (all at once in one delta output, else empty) as plain data."""
    if not positions:
        return None
    return tuple(
        None
        if position is None
        else tuple(
            PromptTokenLogprob(token_id, _finite(lp.logprob), lp.rank, lp.decoded_token)
            for token_id, lp in position.items()
        )
        for position in positions
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else _MIN_LOGPROB


def _token_logprob(token_id: int, position: dict[int, Any], top_k: int) -> TokenLogprob:
    chosen = position[token_id]
    ranked = sorted(
        (lp for lp in position.values() if lp.rank is not None and lp.rank <= top_k),
        key=lambda lp: lp.rank,
    )
    return TokenLogprob(
        token=chosen.decoded_token or "",
        logprob=_finite(chosen.logprob),
        top=tuple((lp.decoded_token or "", _finite(lp.logprob)) for lp in ranked),
    )
