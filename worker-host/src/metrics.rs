//! The host's metrics, in the Prometheus (OpenMetrics) text format: one registry for the process,
//! counted where things happen (the queue worker, the load-balancing server, the runner
//! supervisor) and read at `/metrics` (the dev API, the load-balancing server, and the queue
//! worker's `--metrics-port`).
//!
//! Every name starts `worker_host_`; no label ever holds a job id (each label has a handful of
//! values). The names map onto OpenTelemetry's FaaS conventions: `job_duration_seconds` is
//! `faas.invoke_duration` (with its buckets), `init_duration_seconds` is `faas.init_duration`,
//! `jobs_total{outcome="failed"}` is `faas.errors`, `jobs_total{outcome="timed_out"}` is
//! `faas.timeouts`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `worker_host_jobs_total` | counter | `outcome`: completed, failed, cancelled, timed_out, undelivered |
//! | `worker_host_job_duration_seconds` | histogram | |
//! | `worker_host_jobs_in_flight` | gauge | |
//! | `worker_host_jobs_waiting` | gauge | (load-balancing mode: requests waiting for a slot) |
//! | `worker_host_concurrency` | gauge | |
//! | `worker_host_init_duration_seconds` | gauge | |
//! | `worker_host_take_requests_total` | counter | `result`: jobs, empty, throttled, error |
//! | `worker_host_result_posts_total` | counter | `result`: delivered, retried, given_up |
//! | `worker_host_stream_chunks_dropped_total` | counter | |
//! | `worker_host_runner_restarts_total` | counter | `reason`: crashed, killed, exited, hung |
//! | `worker_host_requests_refused_total` | counter | `reason` (load-balancing mode: requests answered without running a job): busy, too_large, bad_request, slow_body, unavailable, unauthorized |
//! | `worker_host_handler_info` | gauge (1) | `name`, `version`, `abi` |

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// OpenTelemetry's FaaS invoke-duration buckets (seconds), with a few longer ones for jobs that
/// run for minutes.
const DURATION_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
    300.0,
];

/// How a job ended, as `jobs_total` counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum JobOutcome {
    /// Its result (an output) was delivered.
    completed,
    /// Its result was a failure, and it was delivered.
    failed,
    /// It was stopped (by the platform, a client, or a disconnect) before it ended.
    cancelled,
    /// It ran past a time limit the host enforces (none yet: a platform-side timeout reaches
    /// the worker as a stop, counted as `cancelled`).
    timed_out,
    /// Its result could not be delivered.
    undelivered,
}

/// What a take request got, as `take_requests_total` counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TakeResult {
    /// One job or more.
    jobs,
    /// No job.
    empty,
    /// A 429 from the platform.
    throttled,
    /// A connection error, a timeout, or an answer that is not a job.
    error,
}

/// What a result post (job-done, stream, progress) did, as `result_posts_total` counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PostResult {
    /// The platform took it.
    delivered,
    /// An attempt failed and is retried.
    retried,
    /// It was given up after the retry time.
    given_up,
}

/// Why a runner was restarted, as `runner_restarts_total` counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RestartReason {
    /// It died of a signal it raised itself (SIGSEGV, SIGABRT, ...).
    crashed,
    /// It was killed from outside (SIGKILL: often the kernel's OOM killer).
    killed,
    /// It exited by itself.
    exited,
    /// The host killed it: a job ignored its stop.
    hung,
}

/// Why a load-balancing request was answered without running a job, as
/// `requests_refused_total` counts it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusalReason {
    /// 429: every slot and waiting place was taken.
    busy,
    /// 413: the body was over `--max-input-bytes`.
    too_large,
    /// 400: the body was not JSON, or could not be read.
    bad_request,
    /// 408: the body did not arrive in time.
    slow_body,
    /// 503: the worker is shutting down, its init failed, or its handler cannot serve.
    unavailable,
    /// 401: the API key was missing or wrong.
    unauthorized,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabel {
    reason: RefusalReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: JobOutcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TakeLabel {
    result: TakeResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PostLabel {
    result: PostResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabel {
    reason: RestartReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    name: String,
    version: String,
    abi: String,
}

/// The process's metrics. Get them with [`get`].
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs: Family<OutcomeLabel, Counter>,
    job_duration: Histogram,
    jobs_in_flight: Gauge,
    jobs_waiting: Gauge,
    concurrency: Gauge,
    init_duration: Gauge<f64, AtomicU64>,
    take_requests: Family<TakeLabel, Counter>,
    result_posts: Family<PostLabel, Counter>,
    stream_chunks_dropped: Counter,
    runner_restarts: Family<RestartLabel, Counter>,
    requests_refused: Family<RefusalLabel, Counter>,
    handler_info: Family<HandlerLabels, Gauge>,
    /// The labels `handler_info` has now (a swap replaces them).
    handler_now: Mutex<Option<HandlerLabels>>,
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("worker_host");
        let metrics = Self {
            jobs: Family::default(),
            job_duration: Histogram::new(DURATION_BUCKETS),
            jobs_in_flight: Gauge::default(),
            jobs_waiting: Gauge::default(),
            concurrency: Gauge::default(),
            init_duration: Gauge::default(),
            take_requests: Family::default(),
            result_posts: Family::default(),
            stream_chunks_dropped: Counter::default(),
            runner_restarts: Family::default(),
            requests_refused: Family::default(),
            handler_info: Family::default(),
            handler_now: Mutex::new(None),
            registry: Registry::default(),
        };
        // Every outcome is there from the start, so a rate over it is defined before the first
        // failure.
        for outcome in [
            JobOutcome::completed,
            JobOutcome::failed,
            JobOutcome::cancelled,
            JobOutcome::timed_out,
            JobOutcome::undelivered,
        ] {
            metrics
                .jobs
                .get_or_create(&OutcomeLabel { outcome })
                .inc_by(0);
        }
        registry.register(
            "jobs",
            "Jobs ended, by how they ended",
            metrics.jobs.clone(),
        );
        registry.register(
            "job_duration_seconds",
            "How long the handler took per job, from its start to its return",
            metrics.job_duration.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Jobs running on the handler now",
            metrics.jobs_in_flight.clone(),
        );
        registry.register(
            "jobs_waiting",
            "Requests waiting for a slot (load-balancing mode)",
            metrics.jobs_waiting.clone(),
        );
        registry.register(
            "concurrency",
            "How many jobs may run at once",
            metrics.concurrency.clone(),
        );
        registry.register(
            "init_duration_seconds",
            "How long the handler's first init took",
            metrics.init_duration.clone(),
        );
        registry.register(
            "take_requests",
            "Job-take requests to the platform, by what they got",
            metrics.take_requests.clone(),
        );
        registry.register(
            "result_posts",
            "Result, stream and progress posts to the platform, by what they did",
            metrics.result_posts.clone(),
        );
        registry.register(
            "stream_chunks_dropped",
            "Stream chunks that could not be delivered",
            metrics.stream_chunks_dropped.clone(),
        );
        registry.register(
            "runner_restarts",
            "Runner processes restarted, by why",
            metrics.runner_restarts.clone(),
        );
        registry.register(
            "requests_refused",
            "Load-balancing requests answered without running a job, by why",
            metrics.requests_refused.clone(),
        );
        registry.register(
            "handler_info",
            "The handler serving (always 1)",
            metrics.handler_info.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// A job ended this way.
    pub fn job_ended(&self, outcome: JobOutcome) {
        self.jobs.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A job started on the handler; the guard marks its end (and records its duration) when
    /// dropped.
    pub fn job_started(&self) -> RunningJob {
        self.jobs_in_flight.inc();
        RunningJob {
            started: std::time::Instant::now(),
        }
    }

    /// A request waits for a slot; the guard marks the end of its wait when dropped.
    pub fn job_waiting(&self) -> WaitingJob {
        self.jobs_waiting.inc();
        WaitingJob(())
    }

    /// How many jobs may run at once now.
    pub fn set_concurrency(&self, slots: usize) {
        self.concurrency
            .set(i64::try_from(slots).unwrap_or(i64::MAX));
    }

    /// The serving handler's init took this long.
    pub fn set_init_duration(&self, duration: Duration) {
        self.init_duration.set(duration.as_secs_f64());
    }

    /// A take request got this.
    pub fn take_request(&self, result: TakeResult) {
        self.take_requests
            .get_or_create(&TakeLabel { result })
            .inc();
    }

    /// A result post did this.
    pub fn result_post(&self, result: PostResult) {
        self.result_posts.get_or_create(&PostLabel { result }).inc();
    }

    /// `count` stream chunks were not delivered.
    pub fn stream_chunks_dropped(&self, count: usize) {
        self.stream_chunks_dropped
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// A load-balancing request was refused for this reason.
    pub fn request_refused(&self, reason: RefusalReason) {
        self.requests_refused
            .get_or_create(&RefusalLabel { reason })
            .inc();
    }

    /// A runner was restarted for this reason.
    pub fn runner_restarted(&self, reason: RestartReason) {
        self.runner_restarts
            .get_or_create(&RestartLabel { reason })
            .inc();
    }

    /// This handler serves now (replacing the one before, after a swap).
    pub fn set_handler(&self, info: &crate::handler::HandlerInfo) {
        let labels = HandlerLabels {
            name: label_value(&info.name),
            version: label_value(&info.version),
            abi: format!("{}.{}", info.abi_major, info.abi_minor),
        };
        let mut now = self
            .handler_now
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(before) = now.take() {
            self.handler_info.remove(&before);
        }
        self.handler_info.get_or_create(&labels).set(1);
        *now = Some(labels);
    }

    /// The metrics in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// `text` escaped as a label value (the encoder writes values as they are): a handler's name or
/// version with a quote, a backslash or a line break must not break the scrape or forge lines.
fn label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c if c.is_control() => escaped.push(' '),
            c => escaped.push(c),
        }
    }
    escaped
}

/// A job running on the handler; dropping it ends it in `jobs_in_flight` and records its
/// duration.
#[derive(Debug)]
#[must_use = "the job ends in the metrics when this is dropped"]
pub struct RunningJob {
    started: std::time::Instant,
}

impl Drop for RunningJob {
    fn drop(&mut self) {
        let metrics = get();
        metrics.jobs_in_flight.dec();
        metrics
            .job_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// A request waiting for a slot; dropping it ends its wait in `jobs_waiting`.
#[derive(Debug)]
#[must_use = "the wait ends in the metrics when this is dropped"]
pub struct WaitingJob(());

impl Drop for WaitingJob {
    fn drop(&mut self) {
        get().jobs_waiting.dec();
    }
}

/// The `/metrics` answer, for the servers that have the route.
pub fn answer() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
        get().encode(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text names every metric with the prefix, and counts what was recorded.
    #[test]
    fn the_text_has_every_metric_with_its_prefix() {
        let metrics = Metrics::new();
        metrics.job_ended(JobOutcome::completed);
        metrics.job_ended(JobOutcome::completed);
        metrics.take_request(TakeResult::empty);
        let text = metrics.encode();
        assert!(
            text.contains("worker_host_jobs_total{outcome=\"completed\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("worker_host_jobs_total{outcome=\"timed_out\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("worker_host_take_requests_total{result=\"empty\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE worker_host_job_duration_seconds histogram"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// A handler's name or version cannot break the text or forge a line.
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            label_value("0.1\"} 1\nworker_host_jobs_total 9\\"),
            "0.1\\\"} 1\\nworker_host_jobs_total 9\\\\"
        );
        assert_eq!(label_value("a\tb"), "a b");
    }
}
