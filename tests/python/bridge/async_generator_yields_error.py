"""An async generator handler that yields its input's chunks, awaiting between them; one of them
may be a dict with a truthy `error` (which, in the SDK, ends the stream and fails the job)."""

import asyncio

import runpod


async def handler(job):
    for chunk in job["input"]["chunks"]:
        await asyncio.sleep(0)
        yield chunk


runpod.serverless.start({"handler": handler})
