"""The official RunPod Python worker (runpod==1.12.0) running handlers equivalent to worker-host's
sample handlers, for the conformance test (tests/conformance.rs).

Usage: python3 sdk_worker.py <echo|stream|faulty>

The worker reads the platform URLs and key from the RUNPOD_* environment variables at import, as
on the platform, and polls until it is killed.

- echo: returns the job's input (sample-handlers/echo).
- stream: a generator; for each chunk of input {"chunks": [...], "delay_ms": optional}, pauses
  delay_ms, reports progress {"done": i, "total": n}, then yields the chunk
  (sample-handlers/stream).
- faulty: raises ValueError with input["message"] (sample-handlers/faulty in mode "error" with
  type "ValueError").
"""

import sys
import time

import runpod


def echo(job):
    return job["input"]


def stream(job):
    chunks = job["input"]["chunks"]
    delay_ms = job["input"].get("delay_ms", 0)
    for done, chunk in enumerate(chunks):
        if delay_ms:
            time.sleep(delay_ms / 1000)
        runpod.serverless.progress_update(job, {"done": done, "total": len(chunks)})
        yield chunk


def faulty(job):
    raise ValueError(job["input"]["message"])


HANDLERS = {"echo": echo, "stream": stream, "faulty": faulty}


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in HANDLERS:
        sys.exit(f"usage: {sys.argv[0]} <{'|'.join(HANDLERS)}>")
    handler = HANDLERS[sys.argv[1]]
    # The SDK parses sys.argv for its own flags; leave it nothing to misread.
    del sys.argv[1:]
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
