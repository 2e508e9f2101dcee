"""The official RunPod client (runpod-python 1.12.0) driving worker-host's local dev API.

Run by `tests/dev_api_client.rs` as `python3 tests/python/dev_api_client.py <scenario>` against a
`worker-host --rp_serve_api` it started, with:
- `RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:PORT/v2` (the client reads it when imported);
- `DEV_API_KEY`, the key given to the client as `runpod.api_key`.

Each scenario uses only the client's public API (`runpod.Endpoint`, `Job.status/output/stream/
cancel`, `Endpoint.run/run_sync/health/purge_queue`, and the asyncio client
`runpod.endpoint.asyncio.Endpoint` on an aiohttp session), plus a raw `requests` call where the
client hides what the test must see (a job's full status object). It prints ONE JSON line on
stdout with what it observed; the Rust side asserts on it. An unexpected exception exits 1 with
its traceback on stderr.

Scenarios (the handler the Rust side loads in brackets):
- run_sync [echo]: `run_sync` returns the input.
- run_status_output [echo]: `run`, `status`, `output(timeout=30)`, `status` again.
- stream [stream]: iterates `Job.stream()`, fetching the job's status as each chunk is yielded.
- cancel [faulty]: cancels a running sleep job; a following `run_sync` completes.
- cancel_queued [faulty, concurrency 1]: cancels a queued job, then the running one.
- health [echo]: `health()` after two `run_sync` calls.
- purge_queue [faulty, concurrency 1]: purges three queued jobs behind a running one.
- failing [faulty]: a handler error and a handler panic, through `run_sync` and `run`.
- asyncio [echo]: the asyncio client: run, status, output, stream, cancel, health, purge_queue,
  and concurrent runs.
- auth [echo, `--api-key k1`]: a wrong key, then the right one (`DEV_API_KEY`).
"""

import asyncio
import json
import os
import sys
import time
import traceback

if not os.environ.get("RUNPOD_ENDPOINT_BASE_URL"):
    sys.exit("RUNPOD_ENDPOINT_BASE_URL must be set (before runpod is imported)")

# pylint: disable=wrong-import-position
import requests  # noqa: E402
import runpod  # noqa: E402
from runpod.endpoint.asyncio import Endpoint as AsyncEndpoint  # noqa: E402
from runpod.http_client import ClientSession  # noqa: E402

# Any endpoint id: the dev API serves every id.
ENDPOINT_ID = "local-dev"

# How long a scenario waits for a job to reach a state before giving up (the Rust side kills the
# script later than this).
WAIT_SECONDS = 20

runpod.api_key = os.environ["DEV_API_KEY"]


def raw_status(job_id):
    """The job's full status object, fetched without the client (which returns only parts)."""
    response = requests.get(
        f"{runpod.endpoint_url_base}/{ENDPOINT_ID}/status/{job_id}",
        headers={"Authorization": f"Bearer {runpod.api_key}"},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()


def wait_for_status(job_id, wanted):
    """Polls the raw status until it is `wanted`; returns the status object then."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        status = raw_status(job_id)
        if status["status"] == wanted:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not reach {wanted}: {status}")
        time.sleep(0.05)


def raised(call):
    """Runs `call`, which must raise; returns what it raised (type, HTTP status, message)."""
    try:
        value = call()
    except requests.HTTPError as error:
        return {
            "raised": "HTTPError",
            "status_code": error.response.status_code,
            "body": error.response.text,
        }
    except Exception as error:  # pylint: disable=broad-except
        return {"raised": type(error).__name__, "message": str(error)}
    return {"raised": None, "returned": value}


# ---------------------------------------------------------------------------- #
#                                   Scenarios                                  #
# ---------------------------------------------------------------------------- #


def run_sync():
    """run_sync returns the handler's output: the echoed input."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    return {"output": endpoint.run_sync({"prompt": "hi"}, timeout=30)}


def run_status_output():
    """run, then status, output and status again."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    job = endpoint.run({"prompt": "hi"})
    first = job.status()
    output = job.output(timeout=30)
    return {
        "id": job.job_id,
        "first_status": first,
        "output": output,
        "final_status": job.status(),
        "raw": raw_status(job.job_id),
    }


def stream():
    """Iterates Job.stream(); as each chunk is yielded, fetches the job's current status."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    job = endpoint.run({"chunks": ["a", "b", "c", "d"], "delay_ms": 700})
    chunks = []
    for chunk in job.stream():
        chunks.append({"chunk": chunk, "status": raw_status(job.job_id)["status"]})
    return {"id": job.job_id, "chunks": chunks, "final_status": job.status()}


def cancel():
    """Cancels a running job; the worker is then free for the next one."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    job = endpoint.run({"mode": "sleep", "ms": 30000})
    running = wait_for_status(job.job_id, "IN_PROGRESS")
    cancelled = job.cancel()
    status_after_cancel = job.status()
    # The sleep job would hold the only worker slot for 30 s: the request timeout (10 s) fails
    # the script if the cancelled handler did not let go of it.
    echoed = endpoint.run_sync({"mode": "echo", "x": 1}, timeout=10)
    return {
        "id": job.job_id,
        "running": running,
        "cancel": cancelled,
        "status_after_cancel": status_after_cancel,
        "next_output": echoed,
        # After the next job ran, the cancelled handler has long returned: its late result must
        # not have changed the status.
        "raw_later": raw_status(job.job_id),
        "health": endpoint.health(),
    }


def cancel_queued():
    """Cancels a queued job behind a running one, then the running one."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    first = endpoint.run({"mode": "sleep", "ms": 30000})
    wait_for_status(first.job_id, "IN_PROGRESS")
    second = endpoint.run({"mode": "sleep", "ms": 30000})
    second_status = second.status()
    cancel_second = second.cancel()
    first_status_after = raw_status(first.job_id)["status"]
    cancel_first = first.cancel()
    # The worker is free again, and the cancelled queued job was never handed to it.
    echoed = endpoint.run_sync({"mode": "echo", "x": 2}, timeout=10)
    return {
        "first": first.job_id,
        "second": second.job_id,
        "second_status_before": second_status,
        "cancel_second": cancel_second,
        "first_status_after_second_cancelled": first_status_after,
        "cancel_first": cancel_first,
        "next_output": echoed,
        "raw_first": raw_status(first.job_id),
        "raw_second": raw_status(second.job_id),
    }


def health():
    """health() after two run_sync calls."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    outputs = [endpoint.run_sync({"n": n}, timeout=30) for n in range(2)]
    return {"outputs": outputs, "health": endpoint.health()}


def purge_queue():
    """Purges three jobs queued behind a running one."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    running = endpoint.run({"mode": "sleep", "ms": 10000})
    wait_for_status(running.job_id, "IN_PROGRESS")
    queued = [endpoint.run({"mode": "echo", "n": n}) for n in range(3)]
    queued_statuses = [job.status() for job in queued]
    health_before = endpoint.health()
    purged = endpoint.purge_queue()
    purged_status = raised(queued[0].status)
    health_after = endpoint.health()
    running_status = running.status()
    cancelled = running.cancel()
    return {
        "queued_statuses": queued_statuses,
        "health_before": health_before,
        "purge": purged,
        "purged_status": purged_status,
        "health_after": health_after,
        "running_status": running_status,
        "cancel_running": cancelled,
    }


def failing():
    """A handler error and a handler panic: the client's output is None, the job FAILED."""
    endpoint = runpod.Endpoint(ENDPOINT_ID)
    observed = {}
    cases = {
        "error": {"mode": "error", "type": "ValueError", "message": "bad input"},
        "panic": {"mode": "panic", "message": "boom"},
    }
    for name, request in cases.items():
        sync_output = endpoint.run_sync(request, timeout=30)
        job = endpoint.run(request)
        output = job.output(timeout=30)
        observed[name] = {
            "run_sync_output": sync_output,
            "output": output,
            "status": job.status(),
            "raw": raw_status(job.job_id),
        }
    return observed


async def asyncio_scenario():
    """The asyncio client on an aiohttp session."""
    async with ClientSession() as session:
        endpoint = AsyncEndpoint(ENDPOINT_ID, session)
        job = await endpoint.run({"prompt": "async"})
        first = await job.status()
        output = await job.output(timeout=30)
        final = await job.status()

        streamed_job = await endpoint.run({"prompt": "streamed"})
        streamed = [chunk async for chunk in streamed_job.stream()]
        # Cancelling a job that already finished leaves it as it was.
        cancel_finished = await streamed_job.cancel()

        inputs = [{"n": n} for n in range(6)]
        jobs = await asyncio.gather(*(endpoint.run(value) for value in inputs))
        outputs = await asyncio.gather(*(job.output(timeout=30) for job in jobs))

        health_answer = await endpoint.health()
        purge = await endpoint.purge_queue()
        return {
            "first_status": first,
            "output": output,
            "final_status": final,
            "streamed": streamed,
            "cancel_finished": cancel_finished,
            "streamed_id": streamed_job.job_id,
            "inputs": inputs,
            "outputs": outputs,
            "distinct_ids": len({job.job_id for job in jobs}),
            "health": health_answer,
            "purge": purge,
        }


def auth():
    """A wrong key is refused with 401; the right one works."""
    right = runpod.api_key
    runpod.api_key = "wrong"
    wrong = raised(lambda: runpod.Endpoint(ENDPOINT_ID).run_sync({"k": 1}, timeout=30))
    runpod.api_key = right
    return {
        "wrong_key": wrong,
        "right_key_output": runpod.Endpoint(ENDPOINT_ID).run_sync({"k": 1}, timeout=30),
    }


SCENARIOS = {
    "run_sync": run_sync,
    "run_status_output": run_status_output,
    "stream": stream,
    "cancel": cancel,
    "cancel_queued": cancel_queued,
    "health": health,
    "purge_queue": purge_queue,
    "failing": failing,
    "asyncio": lambda: asyncio.run(asyncio_scenario()),
    "auth": auth,
}


def main():
    """Runs the scenario named on the command line and prints what it observed."""
    if len(sys.argv) != 2 or sys.argv[1] not in SCENARIOS:
        sys.exit(f"usage: {sys.argv[0]} <{'|'.join(SCENARIOS)}>")
    name = sys.argv[1]
    try:
        observed = SCENARIOS[name]()
    except Exception:  # pylint: disable=broad-except
        traceback.print_exc()
        sys.exit(f"scenario {name}: unexpected exception (traceback above)")
    print(json.dumps(observed), flush=True)


if __name__ == "__main__":
    main()
