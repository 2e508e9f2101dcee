"""An async generator handler: yields each of its input's chunks, with a progress update before
each, awaiting between them; the SDK's return_aggregate_stream is set."""

import asyncio

import runpod


async def handler(job):
    chunks = job["input"]["chunks"]
    for done, chunk in enumerate(chunks):
        runpod.serverless.progress_update(job, {"done": done, "total": len(chunks)})
        await asyncio.sleep(0)
        yield chunk


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
