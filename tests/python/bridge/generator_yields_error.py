"""A generator handler that yields its input's chunks, one of which may be a dict with a truthy
`error` (which, in the SDK, ends the stream and fails the job)."""

import runpod


def handler(job):
    yield from job["input"]["chunks"]


runpod.serverless.start({"handler": handler})
