"""A script that defines a handler but never calls runpod.serverless.start."""


def handler(job):
    return job["input"]
