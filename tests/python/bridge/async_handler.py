"""An async handler: like sync_handler.py, awaiting between steps; with "sleep", it sleeps that
many seconds and says so when it is cancelled."""

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


runpod.serverless.start({"handler": handler})
