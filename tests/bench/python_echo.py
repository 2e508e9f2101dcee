"""The echo handler on the official RunPod Python SDK, for queue-bench's comparison runs.

queue-bench starts this with `python3` and the platform's environment (RUNPOD_WEBHOOK_GET_JOB and
friends, pointing at its loopback stand-in). BENCH_CONCURRENCY sets how many jobs the SDK runs at
once (its `concurrency_modifier`); 1 when unset.
"""

import os

import runpod

CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "1"))


def handler(job):
    """Returns the job's input unchanged, like the Rust echo handler."""
    return job["input"]


runpod.serverless.start(
    {
        "handler": handler,
        "concurrency_modifier": lambda _current: CONCURRENCY,
    }
)
