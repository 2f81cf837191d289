"""The bare engine as the upper bound: vLLM's AsyncLLM in-process, no HTTP, same engine arguments.

Reads one workload point per line on stdin (`[concurrency, requests]`) and answers each with one
JSON object on stdout: {"event": "point", "concurrency", "wall", "samples": [...]}. Ends at EOF.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
import uuid


async def one(engine, prompt_ids, params) -> dict:
    from vllm import TokensPrompt

    start = time.perf_counter()
    first = None
    gaps, last, tokens = [], None, 0
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
        now = time.perf_counter()
        new = len(out.outputs[0].token_ids)
        if new:
            if first is None:
                first = now - start
            elif last is not None:
                gaps.append((now - last) / new)
            last = now
            tokens += new
    return {"ttft": first, "gaps": gaps, "tokens": tokens, "ok": tokens > 0, "end": time.perf_counter() - start}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine-args", required=True)
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from vllm import SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = json.loads(args.engine_args)
    if "structured_outputs_config" in engine_args:
        engine_args["structured_outputs_config"] = StructuredOutputsConfig(**engine_args["structured_outputs_config"])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args))
    prompt_ids = json.loads(args.prompt_ids)
    gc.collect()
    gc.freeze()  # as both servers do after start-up: full collections then skip the startup heap
    params = SamplingParams(
        max_tokens=args.max_tokens, ignore_eos=True, temperature=1.0, output_kind=RequestOutputKind.DELTA
    )
    print(json.dumps({"event": "ready", "pid": os.getpid()}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        concurrency, requests = json.loads(line)
        sem = asyncio.Semaphore(concurrency)

        async def limited():
            async with sem:
                return await one(engine, prompt_ids, params)

        start = time.perf_counter()
        samples = await asyncio.gather(*(limited() for _ in range(requests)))
        wall = time.perf_counter() - start
        print(json.dumps({"event": "point", "concurrency": concurrency, "wall": wall, "samples": samples}), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())  # the loop both servers run on, so the upper bound is not handicapped
