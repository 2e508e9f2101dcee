"""A handler whose config asks for a fresh worker after every job (refresh_worker)."""

import runpod


def handler(job):
    return {"seen": job["input"]}


runpod.serverless.start({"handler": handler, "refresh_worker": True})
