"""The Python half of worker-host's Python bridge, run inside the embedded interpreter.

It owns what happens in Python: `runpod.serverless.start` captured (on the real `runpod`
package, or on a minimal stand-in when it is not installed), the user's script run as
`__main__`, the handler's kind told apart as the SDK does, and each job run (a sync handler on a
thread of its own, an async one on the one event-loop thread) with its chunks, progress and
result handed to the Rust `Reporter` of that job. Tracebacks leave out this file's frames.
"""

import asyncio
import builtins
import ctypes
import importlib.util
import inspect
import json
import os
import sys
import threading
import tokenize
import traceback
import types


class JobCancelled(BaseException):
    """Raised inside a sync handler whose job was cancelled. A BaseException, as
    KeyboardInterrupt is, so that `except Exception` in the handler does not swallow it."""


class BridgeError(Exception):
    """A mistake the bridge reports itself (no `start` call, a handler that is not callable)."""


_config = None
"""What the script passed to `runpod.serverless.start`."""

_reporters = {}
"""The reporter of each running job, by job id, for `progress_update`."""

_loop = None
"""The event loop every async job runs on, in its own thread."""


def _start(config):
    """`runpod.serverless.start`, captured: keeps the config instead of starting a worker."""
    global _config
    _config = config


def _progress_update(job, progress):
    """`runpod.serverless.progress_update`: reports progress through worker-host."""
    job_id = job.get("id") if isinstance(job, dict) else job
    reporter = _reporters.get(job_id)
    if reporter is None:
        print(f"progress_update: job {job_id!r} is not running; dropped", file=sys.stderr)
        return
    reporter.progress(json.dumps(progress, ensure_ascii=False))


def _install_runpod():
    """Captures `start` and `progress_update` on the installed `runpod`, or installs a stand-in
    `runpod` module with just those two when the package is not there. Returns whether the
    stand-in was installed."""
    stand_in = importlib.util.find_spec("runpod") is None
    if stand_in:
        runpod = types.ModuleType("runpod")
        runpod.__doc__ = "worker-host's stand-in for the runpod package (not installed)"
        serverless = types.ModuleType("runpod.serverless")
        runpod.serverless = serverless
        sys.modules["runpod"] = runpod
        sys.modules["runpod.serverless"] = serverless
    else:
        import runpod.serverless as serverless
    serverless.start = _start
    serverless.progress_update = _progress_update
    progress_module = sys.modules.get("runpod.serverless.modules.rp_progress")
    if progress_module is not None:
        progress_module.progress_update = _progress_update
    return stand_in


def _trimmed(error):
    """The error's traceback as text, less the leading frames of this file."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(error), error, tb))


def _yielded_error(chunk):
    """The error of a yielded dict with a truthy `error` (which, as in the SDK, is not streamed:
    it ends the stream and fails the job), or None for a chunk."""
    if isinstance(chunk, dict) and chunk.get("error"):
        return chunk["error"]
    return None


def _kind(handler):
    """The handler's kind, told apart as the SDK tells it."""
    if inspect.isasyncgenfunction(handler):
        return "async_generator"
    if inspect.isgeneratorfunction(handler):
        return "generator"
    if inspect.iscoroutinefunction(handler):
        return "async"
    return "sync"


def _run_loop(loop):
    asyncio.set_event_loop(loop)
    loop.run_forever()


def load(script):
    """Runs the script as `__main__` and reads what it passed to `start`.

    Returns ("ok", kind, concurrency, return_aggregate_stream, refresh_worker), or
    ("error", type, message, traceback) when the script raised or did not call `start`."""
    global _loop
    script = os.path.abspath(script)
    sys.path.insert(0, os.path.dirname(script))
    sys.argv = [script]
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        _install_runpod()
        main = sys.modules["__main__"]
        main.__dict__.update(__file__=script, __cached__=None, __builtins__=builtins)
        with tokenize.open(script) as source:
            code = compile(source.read(), script, "exec")
        exec(code, main.__dict__)
        if _config is None:
            raise BridgeError(
                f"{script} ran to its end without calling runpod.serverless.start"
                '({"handler": ...})'
            )
        if not isinstance(_config, dict) or not callable(_config.get("handler")):
            raise BridgeError(
                'runpod.serverless.start needs a dict with a callable "handler", got '
                f"{_config!r}"
            )
    except BaseException as error:
        tb = "" if isinstance(error, BridgeError) else _trimmed(error)
        return ("error", type(error).__name__, str(error), tb)
    handler = _config["handler"]
    kind = _kind(handler)
    concurrency = 1
    modifier = _config.get("concurrency_modifier")
    if kind in ("async", "async_generator") and callable(modifier):
        concurrency = max(1, int(modifier(1)))
    _loop = asyncio.new_event_loop()
    threading.Thread(
        target=_run_loop, args=(_loop,), name="worker-host-asyncio", daemon=True
    ).start()
    aggregate = bool(_config.get("return_aggregate_stream", False))
    if aggregate and kind in ("generator", "async_generator"):
        if not os.environ.get("WORKER_HOST_RETURN_AGGREGATE_STREAM"):
            print(
                "the script sets return_aggregate_stream: run worker-host with "
                "--return-aggregate-stream (or WORKER_HOST_RETURN_AGGREGATE_STREAM=true), which "
                "puts the chunks in the final result",
                file=sys.stderr,
            )
    if concurrency > 1 and not (
        os.environ.get("WORKER_HOST_CONCURRENCY") or os.environ.get("RUNPOD_MAX_CONCURRENCY")
    ):
        print(
            f"the script's concurrency_modifier asks for {concurrency} jobs at once: run "
            "worker-host with --concurrency (or WORKER_HOST_CONCURRENCY), which caps it and is "
            "1 by default",
            file=sys.stderr,
        )
    refresh = bool(_config.get("refresh_worker", False))
    return ("ok", kind, concurrency, aggregate, refresh)


class _Job:
    """One running job: runs the handler and reports to `reporter` exactly once at the end."""

    def __init__(self, job, reporter):
        self.job = job
        self.reporter = reporter
        self.thread_id = None
        self.future = None
        self.started = False
        self.finished = False
        self.lock = threading.Lock()

    def _finish(self):
        _reporters.pop(self.job.get("id"), None)
        with self.lock:
            self.finished = True

    def succeed(self, output):
        try:
            text = json.dumps(output, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as error:
            self.fail(error)
            return
        self._finish()
        self.reporter.output(text)

    def stream_done(self):
        self._finish()
        self.reporter.output(None)

    def emit(self, chunk):
        self.reporter.emit(json.dumps(chunk, ensure_ascii=False, allow_nan=False))

    def fail(self, error):
        self._finish()
        # The SDK's error_type is str(type(err)): "<class 'ValueError'>".
        self.reporter.error(str(type(error)), str(error), _trimmed(error))

    def fail_yielded(self, value):
        """Fails the job with a generator's yielded `error` value (its `str`, as the SDK has it)."""
        self._finish()
        self.reporter.error("YieldedError", str(value), "")

    def run_sync(self, handler, kind):
        try:
            output = handler(self.job)
            if kind == "generator":
                for chunk in output:
                    error = _yielded_error(chunk)
                    if error is not None:
                        output.close()
                        self.fail_yielded(error)
                        return
                    self.emit(chunk)
                self.stream_done()
                return
            if inspect.isawaitable(output):
                output = asyncio.run_coroutine_threadsafe(_awaited(output), _loop).result()
            self.succeed(output)
        except BaseException as error:
            self.fail(error)

    async def run_async(self, handler, kind):
        with self.lock:
            if self.finished:
                return
            self.started = True
        try:
            if kind == "async_generator":
                stream = handler(self.job)
                async for chunk in stream:
                    error = _yielded_error(chunk)
                    if error is not None:
                        await stream.aclose()
                        self.fail_yielded(error)
                        return
                    self.emit(chunk)
                self.stream_done()
                return
            output = handler(self.job)
            if inspect.isawaitable(output):
                output = await output
            self.succeed(output)
        except BaseException as error:
            self.fail(error)

    def cancel(self):
        """Raises in the handler: CancelledError in an async one, JobCancelled in a sync one
        (when it next runs Python code)."""
        with self.lock:
            if self.finished:
                return
            if self.future is not None and not self.started:
                # Cancelled before its first step: the coroutine will never run, so the
                # failure is reported here.
                self.future.cancel()
                self.finished = True
                _reporters.pop(self.job.get("id"), None)
                self.reporter.error(
                    str(asyncio.CancelledError), "cancelled before it started", ""
                )
            elif self.future is not None:
                self.future.cancel()
            elif self.thread_id is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self.thread_id), ctypes.py_object(JobCancelled)
                )


async def _awaited(awaitable):
    return await awaitable


def run(job_json, reporter):
    """Starts one job and returns its `_Job`, whose `cancel` stops it. The reporter gets the
    chunks, the progress and then exactly one `output` or `error`."""
    job = json.loads(job_json)
    handler = _config["handler"]
    kind = _kind(handler)
    running = _Job(job, reporter)
    _reporters[job.get("id")] = reporter
    if kind in ("async", "async_generator"):
        with running.lock:
            running.future = asyncio.run_coroutine_threadsafe(
                running.run_async(handler, kind), _loop
            )
    else:
        thread = threading.Thread(
            target=running.run_sync, args=(handler, kind), name=f"job-{job.get('id')}", daemon=True
        )
        with running.lock:
            thread.start()
            running.thread_id = thread.ident
    return running
