"""An async generator handler: yields each of its input's chunks after one progress update,
awaiting between them; the SDK's return_aggregate_stream is set."""

import asyncio

import runpod


async def handler(job):
    chunks = job["input"]["chunks"]
    runpod.serverless.progress_update(job, {"total": len(chunks)})
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
