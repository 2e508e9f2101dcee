"""The official RunPod client (runpod-python 1.12.0) driving worker-host's dev API on the Python
bridge. Run by `tests/python_bridge.rs` as `python3 client.py <scenario>` with
`RUNPOD_ENDPOINT_BASE_URL` set; prints one JSON line with what it observed.

Scenarios (the script the bridge runs in brackets):
- run_sync [sync_handler.py]: `run_sync` returns the input.
- stream [generator_handler.py]: `Job.stream()` yields the chunks.
- cancel [async_handler.py or sync_cancel.py]: cancels a running job, then runs another.
"""

import json
import os
import sys
import time

import requests
import runpod

runpod.api_key = "unused-local-key"
ENDPOINT = runpod.Endpoint("local-dev")
BASE = os.environ["RUNPOD_ENDPOINT_BASE_URL"]


def wait_for_status(job_id, wanted):
    """Polls the job's status until it is `wanted`, for up to 20 s."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = requests.get(f"{BASE}/local-dev/status/{job_id}", timeout=10).json()
        if status["status"] == wanted:
            return status["status"]
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {wanted}")


def run_sync():
    return {"output": ENDPOINT.run_sync({"prompt": "hi ✓"}, timeout=30)}


def stream():
    job = ENDPOINT.run({"chunks": ["a", {"b": 2}, [3]]})
    return {"chunks": list(job.stream()), "status": job.status()}


def cancel():
    job = ENDPOINT.run({"sleep": 30})
    running = wait_for_status(job.job_id, "IN_PROGRESS")
    cancelled = job.cancel()
    return {
        "running": running,
        "cancel": cancelled["status"],
        "next_output": ENDPOINT.run_sync({"x": 1}, timeout=30),
    }


SCENARIOS = {"run_sync": run_sync, "stream": stream, "cancel": cancel}

if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]]()), flush=True)
