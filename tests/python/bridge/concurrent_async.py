"""async_handler.py with concurrency_modifier 4: up to four jobs at once on the one event loop."""

import asyncio

import runpod


async def handler(job):
    data = job["input"]
    await asyncio.sleep(0)
    if isinstance(data, dict):
        for value in data.get("progress", []):
            runpod.serverless.progress_update(job, value)
            await asyncio.sleep(0)
        if "raise" in data:
            raise ValueError(data["raise"])
        if "sleep" in data:
            try:
                await asyncio.sleep(data["sleep"])
            except asyncio.CancelledError:
                print("the async handler saw CancelledError", flush=True)
                raise
    return data


def concurrency(current):
    return 4


runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency})
