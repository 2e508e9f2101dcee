"""A handler whose input "crash" reads address 0 through ctypes: a segfault in C code."""

import ctypes

import runpod


def handler(job):
    if job["input"] == "crash":
        ctypes.string_at(0)
    return job["input"]


runpod.serverless.start({"handler": handler})
