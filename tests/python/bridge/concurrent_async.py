"""An async handler with concurrency_modifier 4. Given {"meet": N}, each job waits (up to 30 s)
until N jobs have arrived, then says whether they all did: only jobs that run at once meet."""

import asyncio
import time

import runpod

ARRIVED = 0


async def handler(job):
    global ARRIVED
    wanted = job["input"]["meet"]
    ARRIVED += 1
    deadline = time.monotonic() + 30
    while ARRIVED < wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return {"met": ARRIVED >= wanted}


def concurrency(current):
    return 4


runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency})
