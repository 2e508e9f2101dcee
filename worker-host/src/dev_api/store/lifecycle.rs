//! A job's life in the store: submitted, ended by its result (or a cancel, or a timeout), sent
//! to its webhook, retried, and forgotten.

use super::record::{Record, Status};
use super::{NewJob, RetryOutcome, State, Store};
use crate::dev_api::webhook::WebhookCall;
use crate::job::{OrderedRawMap, RawJson};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

impl State {
    /// Forgets a job entirely. A running job is stopped.
    pub(super) fn forget(&mut self, id: &str) -> Option<Record> {
        let job = self.jobs.remove(id)?;
        if let Some(key) = job.deadline {
            self.deadlines.remove(&key);
        }
        if let Some(key) = job.finished_key {
            self.finished.remove(&key);
        }
        match job.status {
            Status::InQueue => self.in_queue -= 1,
            Status::InProgress => {
                self.running.remove(id);
                self.stop(id);
            }
            _ => {}
        }
        job.changed.notify_waiters();
        Some(job)
    }
}

impl Store {
    /// Queues a job; returns its new id.
    pub fn submit(&self, new: NewJob) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut request = new.request;
        request.remove("id");
        let job_json: Arc<str> = Arc::from(request.with_first("id", &id).get());
        let now = Instant::now();
        let record = Record {
            job_json,
            submission: new.submission,
            webhook: new.webhook,
            execution_timeout: new.execution_timeout,
            submitted: now,
            expires: now + new.ttl,
            started: None,
            ended: None,
            status: Status::InQueue,
            output: None,
            error: None,
            unread: VecDeque::new(),
            unread_bytes: 0,
            unread_dropped: 0,
            streamed: false,
            output_unread: false,
            held_back: false,
            deadline: None,
            finished_key: None,
            changed: Arc::new(Notify::new()),
        };
        let earliest = {
            let mut state = self.state();
            state.jobs.insert(id.clone(), record);
            state.enqueue(&id, false);
            state.arm(&id, &self.limits)
        };
        if earliest {
            self.timers.notify_one();
        }
        self.queued.notify_waiters();
        id
    }

    /// The job's status object, or `None` for an unknown job.
    pub fn status(&self, id: &str) -> Option<String> {
        let state = self.state();
        state
            .jobs
            .get(id)
            .map(|job| job.status_json(id, &self.worker_id))
    }

    /// Waits until the job is final or `timeout` passes; returns its status object then, or
    /// `None` if the job is unknown (or was forgotten meanwhile).
    pub async fn wait_final(&self, id: &str, timeout: Duration) -> Option<String> {
        self.wait_for_job(
            id,
            timeout,
            |job| job.status.is_final(),
            |job| job.status_json(id, &self.worker_id),
        )
        .await
    }

    /// Cancels a queued or running job. Returns its status afterwards, or `None` when unknown.
    pub fn cancel(&self, id: &str) -> Option<Status> {
        let mut state = self.state();
        let status = state.jobs.get(id)?.status;
        if status.is_final() {
            return Some(status);
        }
        if status == Status::InProgress {
            state.stop(id);
            self.stops.notify_waiters();
            // Open take polls re-check how long to hold (see `take_wait`).
            self.queued.notify_waiters();
        }
        self.end(&mut state, id, Status::Cancelled, None, None);
        Some(Status::Cancelled)
    }

    /// Requeues a failed or timed-out job under its id. `None` when unknown.
    pub fn retry(&self, id: &str) -> Option<RetryOutcome> {
        let earliest = {
            let mut guard = self.state();
            let state = &mut *guard;
            let job = state.jobs.get_mut(id)?;
            if !matches!(job.status, Status::Failed | Status::TimedOut) {
                return Some(RetryOutcome::NotRetryable(job.status));
            }
            job.reset_to_queued();
            if let Some(key) = job.finished_key.take() {
                state.finished.remove(&key);
            }
            // The worker may still hold the previous attempt (a timed-out handler that has not
            // stopped yet): a second copy under the same id would be refused, so the retry waits
            // until a heartbeat shows the id let go.
            job.held_back = state.stopping.contains_key(id);
            state.retried += 1;
            if job.held_back {
                state.in_queue += 1;
            } else {
                state.enqueue(id, false);
            }
            state.arm(id, &self.limits)
        };
        if earliest {
            self.timers.notify_one();
        }
        self.queued.notify_waiters();
        Some(RetryOutcome::Requeued)
    }

    /// Records a job-done POST for a running job: a progress update (`{"status": "IN_PROGRESS",
    /// "output": ...}`) or its result. A result for a job no longer running (cancelled, timed
    /// out, forgotten) is ignored, as the platform does.
    pub fn add_result(&self, id: &str, mut body: OrderedRawMap, is_stream: bool) {
        let mut state = self.state();
        let Some(job) = state.jobs.get_mut(id) else {
            return;
        };
        if job.status != Status::InProgress {
            return;
        }
        let output = body.remove("output");
        if body
            .get("status")
            .is_some_and(|status| status.get() == r#""IN_PROGRESS""#)
        {
            job.output = output;
            job.changed.notify_waiters();
            return;
        }
        let error = body.remove("error");
        // `/stream` of a job that streamed nothing hands out its output as the one chunk.
        job.output_unread = !is_stream && !job.streamed && output.is_some();
        let status = if error.is_some() {
            Status::Failed
        } else {
            Status::Completed
        };
        self.end(&mut state, id, status, output, error);
    }

    /// Moves a queued or running job to a final state; arms its retention; sends its webhook.
    pub(super) fn end(
        &self,
        state: &mut State,
        id: &str,
        status: Status,
        output: Option<RawJson>,
        error: Option<RawJson>,
    ) {
        let now = Instant::now();
        let finished_key = state.next_key(now);
        let job = state.jobs.get_mut(id).expect("the caller checked the job");
        let was = job.status;
        job.status = status;
        job.ended = Some(now);
        // A final result replaces any progress value; a cancelled or timed-out job keeps none.
        job.output = output;
        job.error = error;
        job.finished_key = Some(finished_key);
        job.changed.notify_waiters();
        let webhook = job
            .webhook
            .clone()
            .map(|url| (url, job.status_json(id, &self.worker_id)));
        match was {
            Status::InQueue => {
                job.held_back = false;
                state.in_queue -= 1;
            }
            Status::InProgress => {
                state.running.remove(id);
            }
            _ => {}
        }
        match status {
            Status::Completed => state.completed += 1,
            Status::Failed | Status::TimedOut => state.failed += 1,
            _ => {}
        }
        state.finished.insert(finished_key, id.to_owned());
        if state.arm(id, &self.limits) {
            self.timers.notify_one();
        }
        while state.finished.len() > self.limits.max_finished {
            let Some((_, oldest)) = state.finished.pop_first() else {
                break;
            };
            if let Some(job) = state.jobs.get_mut(&oldest) {
                job.finished_key = None;
            }
            state.forget(&oldest);
            tracing::debug!(job_id = %oldest, "Result dropped: too many finished jobs are kept.");
        }
        if let Some((url, body)) = webhook {
            self.webhooks.send(WebhookCall {
                url,
                job_id: id.to_owned(),
                body,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use std::time::Duration;

    /// A cancelled queued job never runs; a cancelled running job is handed to the worker to stop.
    #[test]
    fn cancel_skips_queued_jobs_and_stops_running_ones() {
        let (store, _) = store(StoreLimits::default());
        let first = store.submit(job(Submission::Async));
        let second = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        assert_eq!(store.cancel(&second), Some(Status::Cancelled));
        assert!(
            store.take(1).is_empty(),
            "a cancelled job is not handed out"
        );
        assert_eq!(store.cancel(&first), Some(Status::Cancelled));
        assert_eq!(store.state().to_stop, vec![first.clone()]);
        assert_eq!(store.cancel(&first), Some(Status::Cancelled));
        assert_eq!(store.cancel("unknown"), None);
        assert_eq!(store.counts().in_queue + store.counts().in_progress, 0);
    }

    /// Progress shows as the output while running; the final result replaces it, even when the
    /// final result has no output.
    #[test]
    fn progress_shows_until_the_result() {
        let (store, _) = store(StoreLimits::default());
        let id = started(&store);
        store.add_result(
            &id,
            request(r#"{"status": "IN_PROGRESS", "output": {"done": 1}}"#),
            false,
        );
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "IN_PROGRESS");
        assert_eq!(status["output"], serde_json::json!({"done": 1}));
        store.add_result(&id, request("{}"), false);
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "COMPLETED");
        assert!(status.get("output").is_none(), "{status}");
    }

    /// A failed job can be retried under its id; it runs again and is counted.
    #[test]
    fn retry_requeues_failed_jobs_only() {
        let (store, _) = store(StoreLimits::default());
        let id = store.submit(job(Submission::Async));
        run(&store, &id, r#"{"error": "boom"}"#);
        assert_eq!(status_of(&store, &id)["error"], "boom");
        assert_eq!(store.retry(&id), Some(RetryOutcome::Requeued));
        let status = status_of(&store, &id);
        assert_eq!(status["status"], "IN_QUEUE");
        assert!(status.get("error").is_none(), "{status}");
        run(&store, &id, r#"{"output": "ok"}"#);
        assert_eq!(
            store.retry(&id),
            Some(RetryOutcome::NotRetryable(Status::Completed))
        );
        assert_eq!(store.counts().retried, 1);
        assert_eq!(live_jobs(&store), (1, 1, 1));
    }

    /// `/runsync` waits for the result, and gives the current status when the wait runs out.
    #[tokio::test]
    async fn wait_final_returns_the_result_or_the_current_status() {
        let (store, id, waiting) = runsync_waiting();
        assert_eq!(store.take(1).len(), 1);
        store.add_result(&id, request(r#"{"output": "done"}"#), false);
        let answer = waiting.await.expect("the waiter ran").expect("known");
        assert!(
            answer.contains(r#""output":"done","status":"COMPLETED""#),
            "{answer}"
        );

        let slow = store.submit(job(Submission::Sync));
        let answer = store
            .wait_final(&slow, Duration::from_millis(20))
            .await
            .expect("known");
        assert!(answer.contains(r#""status":"IN_QUEUE""#), "{answer}");
    }

    /// A job with a webhook sends its final status object there once.
    #[test]
    fn a_final_status_goes_to_the_webhook() {
        let (store, mut webhooks) = store(StoreLimits::default());
        let mut new = job(Submission::Async);
        new.webhook = Some("http://127.0.0.1:9/hook".into());
        let id = store.submit(new);
        run(&store, &id, r#"{"output": 7}"#);
        let call = webhooks.try_recv().expect("one webhook call");
        assert_eq!(call.url, "http://127.0.0.1:9/hook");
        let body: serde_json::Value = serde_json::from_str(&call.body).expect("JSON");
        assert_eq!(body["id"], id);
        assert_eq!(body["status"], "COMPLETED");
        assert_eq!(body["output"], 7);
        assert!(webhooks.try_recv().is_none(), "only one call");
    }

    /// At shutdown a waiting `/runsync` answers at once with the job's current status.
    #[tokio::test]
    async fn closing_answers_waiters_at_once() {
        let (store, _, waiting) = runsync_waiting();
        tokio::task::yield_now().await;
        store.close();
        let answer = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter answered")
            .expect("the waiter ran")
            .expect("known");
        assert!(answer.contains(r#""status":"IN_QUEUE""#), "{answer}");
    }
}
