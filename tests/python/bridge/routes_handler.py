"""A sync handler for load-balancing mode, where the job also holds the HTTP request (`http`):
answers with the method and path it was asked on, and its input."""

import runpod


def handler(job):
    http = job["http"]
    return {"route": f"{http['method']} {http['path']}", "input": job["input"]}


runpod.serverless.start({"handler": handler})
