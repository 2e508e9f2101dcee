"""A generator handler: yields each of its input's chunks, with a progress update before each."""

import runpod


def handler(job):
    chunks = job["input"]["chunks"]
    for done, chunk in enumerate(chunks):
        runpod.serverless.progress_update(job, {"done": done, "total": len(chunks)})
        yield chunk


runpod.serverless.start({"handler": handler})
