"""An async echo handler, for queue-bench's Python bridge runs: the same file under
runpod-python 1.12.0 (`python3 python_async_echo.py`) and under worker-host with the bridge.
BENCH_CONCURRENCY is its concurrency_modifier's answer; 1 when unset."""

import os

import runpod

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "1"))


async def handler(job):
    """Returns the job's input unchanged."""
    return job["input"]


runpod.serverless.start(
    {
        "handler": handler,
        "concurrency_modifier": lambda _current: CONCURRENCY,
    }
)
