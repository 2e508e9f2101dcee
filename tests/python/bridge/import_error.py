"""A script that fails while it loads, as a missing model file would."""

import runpod


def load_model():
    raise FileNotFoundError("model.safetensors is not there")


MODEL = load_model()

runpod.serverless.start({"handler": lambda job: job["input"]})
