//! A job's record (what the store knows of one job) and the platform's status object built
//! from it.

use super::deadlines::DeadlineKey;
use crate::job::RawJson;
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How a job was submitted; it decides how long its result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submission {
    /// `/run`: kept 30 minutes after it finishes.
    Async,
    /// `/runsync`: kept 1 minute after it finishes.
    Sync,
}

/// A job's state, named as the platform names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Waiting for the worker.
    InQueue,
    /// Taken by the worker.
    InProgress,
    /// Finished with an output.
    Completed,
    /// Finished with an error.
    Failed,
    /// Cancelled through `/cancel`.
    Cancelled,
    /// Ran past its execution timeout.
    TimedOut,
}

impl Status {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::InQueue | Self::InProgress)
    }
}

/// What the store knows of one job, from submission until it is forgotten.
#[derive(Debug)]
pub(super) struct Record {
    /// The job as the worker receives it: `{"id": ..., <request members>}`.
    pub(super) job_json: Arc<str>,
    /// `/run` or `/runsync`: how long its result is kept.
    pub(super) submission: Submission,
    /// Where its final status object goes.
    pub(super) webhook: Option<String>,
    /// `policy.executionTimeout`.
    pub(super) execution_timeout: Duration,
    pub(super) submitted: Instant,
    /// Submission plus `policy.ttl`: the job is forgotten then, in any state.
    pub(super) expires: Instant,
    /// When the worker took it (`None` while queued).
    pub(super) started: Option<Instant>,
    /// When it reached its final status.
    pub(super) ended: Option<Instant>,
    pub(super) status: Status,
    /// The result's output, or the latest progress value while running.
    pub(super) output: Option<RawJson>,
    /// The result's error.
    pub(super) error: Option<RawJson>,
    /// Chunks not yet returned by `/stream`, oldest first.
    pub(super) unread: VecDeque<RawJson>,
    /// Their size in bytes (at most the store's
    /// [`StoreLimits::max_unread_stream_bytes`](super::StoreLimits::max_unread_stream_bytes)).
    pub(super) unread_bytes: usize,
    /// Unread chunks dropped to keep within that bound since `/stream` last answered.
    pub(super) unread_dropped: u64,
    /// Whether the worker streamed any chunk (then the final output is not a chunk too).
    pub(super) streamed: bool,
    /// A non-streaming job's final output, not yet returned by `/stream` as its one chunk.
    pub(super) output_unread: bool,
    /// Retried while the worker still held the previous attempt: queued once it lets go.
    pub(super) held_back: bool,
    /// Its armed deadline's key in the store's deadline map.
    pub(super) deadline: Option<DeadlineKey>,
    /// Once finished, its key in the store's map of finished jobs.
    pub(super) finished_key: Option<DeadlineKey>,
    /// Woken at every change of the job, for the requests waiting on it.
    pub(super) changed: Arc<Notify>,
}

/// The platform's status object, in its key order.
#[derive(Serialize)]
struct StatusObject<'a> {
    #[serde(rename = "delayTime", skip_serializing_if = "Option::is_none")]
    delay_time: Option<u128>,
    #[serde(rename = "executionTime", skip_serializing_if = "Option::is_none")]
    execution_time: Option<u128>,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a RawValue>,
    status: Status,
    #[serde(rename = "workerId", skip_serializing_if = "Option::is_none")]
    worker_id: Option<&'a str>,
}

impl Record {
    /// The platform's status object of this job (`id`, run by `worker_id`), as JSON text.
    pub(super) fn status_json(&self, id: &str, worker_id: &str) -> String {
        let object = StatusObject {
            delay_time: self
                .started
                .map(|started| (started - self.submitted).as_millis()),
            execution_time: self
                .started
                .zip(self.ended)
                .map(|(started, ended)| (ended - started).as_millis()),
            id,
            output: self.output.as_deref(),
            error: self.error.as_deref(),
            status: self.status,
            worker_id: self.started.map(|_| worker_id),
        };
        serde_json::to_string(&object).expect("a status object always serializes")
    }

    /// Back to the queue, as if never taken (a retry, or a take the worker never received).
    pub(super) fn reset_to_queued(&mut self) {
        self.status = Status::InQueue;
        self.started = None;
        self.ended = None;
        self.output = None;
        self.error = None;
        self.unread.clear();
        self.unread_bytes = 0;
        self.unread_dropped = 0;
        self.streamed = false;
        self.output_unread = false;
        self.changed.notify_waiters();
    }
}
