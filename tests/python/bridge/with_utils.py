"""Uses a helper of the installed runpod package besides start."""

import runpod
from runpod.serverless.utils import rp_validator


def handler(job):
    checked = rp_validator.validate(job["input"], {"n": {"type": int, "required": True}})
    return checked


runpod.serverless.start({"handler": handler})
