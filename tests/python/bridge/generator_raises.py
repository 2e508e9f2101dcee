"""A generator handler that yields its input's chunks, then raises its input's `raise` message
(after no chunk at all when `chunks` is empty)."""

import runpod


def handler(job):
    for chunk in job["input"]["chunks"]:
        yield chunk
    raise ValueError(job["input"]["raise"])


runpod.serverless.start({"handler": handler})
