"""A sync handler: echoes its input, reports the progress it is given, raises when asked."""

import runpod

print("loading the model (top level)")


def handler(job):
    data = job["input"]
    if isinstance(data, dict):
        for value in data.get("progress", []):
            runpod.serverless.progress_update(job, value)
        if "raise" in data:
            raise ValueError(data["raise"])
    return data


runpod.serverless.start({"handler": handler})
