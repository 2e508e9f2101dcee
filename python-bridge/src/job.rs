//! One job through the bridge: the [`Reporter`] that Python hands its chunks, progress and result
//! to, and the pump on the host's thread that forwards them to the host and turns a cancellation
//! into an exception in the handler.

use handler_abi::serde_json::value::RawValue;
use handler_abi::{CallbackError, HandlerError, Job, RawJson};
use pyo3::prelude::*;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

/// How often the pump looks at whether the job was cancelled while nothing else arrives.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// What Python reports about a running job.
#[derive(Debug)]
enum Event {
    Chunk(String),
    Progress(String),
    /// The job's end: its output (`None` for a stream), or its error.
    Done(Result<Option<String>, HandlerError>),
}

/// The Python-side handle of one job's channel to the host thread. Python may call it from any
/// thread (the job's, the event loop's, one the handler started); whatever arrives once the job
/// has ended is dropped.
#[pyclass(frozen)]
pub struct Reporter {
    events: Sender<Event>,
}

#[pymethods]
impl Reporter {
    /// One stream chunk, as JSON text.
    fn emit(&self, json: String) {
        let _ = self.events.send(Event::Chunk(json));
    }

    /// One progress update, as JSON text.
    fn progress(&self, json: String) {
        let _ = self.events.send(Event::Progress(json));
    }

    /// The job's output as JSON text, or `None` when a stream has ended.
    #[pyo3(signature = (json))]
    fn output(&self, json: Option<String>) {
        let _ = self.events.send(Event::Done(Ok(json)));
    }

    /// The job's failure: the SDK's `error_type`, message and traceback.
    fn error(&self, error_type: String, message: String, traceback: String) {
        let mut error = HandlerError::new(error_type, message);
        if !traceback.is_empty() {
            error = error.with_traceback(traceback);
        }
        let _ = self.events.send(Event::Done(Err(error)));
    }
}

/// Starts the job in Python (`bridge.run`) and pumps its events to the host until it ends.
/// The job's output for a function, `null` for a stream (whose result is its chunks).
pub fn run(bridge: &Py<PyModule>, job: &Job<'_>) -> Result<RawJson, HandlerError> {
    let (events, received) = mpsc::channel();
    let running = Python::attach(|py| {
        bridge
            .bind(py)
            .call_method1("run", (job.job_json(), Reporter { events }))
            .map(Bound::unbind)
    })
    .map_err(|error| python_error("starting the job", &error))?;
    pump(&received, &running, job)
}

fn pump(
    received: &Receiver<Event>,
    running: &Py<PyAny>,
    job: &Job<'_>,
) -> Result<RawJson, HandlerError> {
    let mut cancelled = false;
    loop {
        let event = match received.recv_timeout(CANCEL_POLL) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => {
                if !cancelled && job.is_cancelled() {
                    cancelled = true;
                    cancel(running);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(HandlerError::new(
                    "BridgeError",
                    "the job ended in Python without a result",
                ));
            }
        };
        match event {
            Event::Chunk(json) => {
                let sent = raw(json).and_then(|chunk| job.emit(&*chunk));
                if sent == Err(CallbackError::Cancelled) && !cancelled {
                    cancelled = true;
                    cancel(running);
                } else {
                    sent?;
                }
            }
            // A refused progress update (the job is over, say) does not fail the job; the SDK's
            // are fire-and-forget too.
            Event::Progress(json) => {
                let _ = raw(json).and_then(|progress| job.progress(&*progress));
            }
            Event::Done(Ok(Some(json))) => return Ok(raw(json)?),
            Event::Done(Ok(None)) => return Ok(raw("null".to_owned())?),
            Event::Done(Err(error)) => return Err(error),
        }
    }
}

/// Raises in the handler (see `_Job.cancel` in bridge.py).
fn cancel(running: &Py<PyAny>) {
    Python::attach(|py| {
        if let Err(error) = running.bind(py).call_method0("cancel") {
            error.print(py);
        }
    });
}

fn raw(json: String) -> Result<RawJson, CallbackError> {
    RawValue::from_string(json).map_err(|_| CallbackError::InvalidJson)
}

/// A Python exception raised by the bridge's own code (a bug, or an interpreter in trouble).
pub fn python_error(doing: &str, error: &PyErr) -> HandlerError {
    HandlerError::new("BridgeError", format!("{doing}: {error}"))
}
