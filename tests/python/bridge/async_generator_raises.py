"""An async generator handler that yields its input's chunks, awaiting between them, then raises
its input's `raise` message; the SDK's return_aggregate_stream is set (the chunks it aggregated
are dropped when the generator raises)."""

import asyncio

import runpod


async def handler(job):
    for chunk in job["input"]["chunks"]:
        await asyncio.sleep(0)
        yield chunk
    raise RuntimeError(job["input"]["raise"])


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
