"""A generator handler: yields each of its input's chunks, after one progress update (one per job:
the host coalesces progress reported faster than it posts it, where the SDK posts each)."""

import runpod


def handler(job):
    chunks = job["input"]["chunks"]
    runpod.serverless.progress_update(job, {"total": len(chunks)})
    for chunk in chunks:
        yield chunk


runpod.serverless.start({"handler": handler})
