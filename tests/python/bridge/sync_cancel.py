"""A sync handler that, given {"sleep": ...}, spins until it is stopped, swallowing every
Exception on the way; any other input is echoed."""

import time

import runpod


def handler(job):
    if "sleep" not in job["input"]:
        return job["input"]
    try:
        while True:
            try:
                time.sleep(0.01)
            except Exception:
                pass
    except BaseException as stop:
        print(f"the sync handler was stopped by {type(stop).__name__}", flush=True)
        raise


runpod.serverless.start({"handler": handler})
