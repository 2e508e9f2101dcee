//! The platform's worker-facing endpoints, spoken exactly as runpod-python 1.12.0 speaks them
//! (`runpod-protocol.md` §2–§8): one small type per endpoint builds its URL, and [`PlatformClient`]
//! sends the requests and classifies the answers. Retry and pacing policy lives in the worker;
//! this module only says what happened.
//!
//! Improvements over the SDK that the platform cannot tell apart from it: query parameters are
//! added properly whether or not a template already has a `?`; both `$ID` and `$RUNPOD_POD_ID`
//! are substituted in the take URL; `X-Request-ID` is set per result POST, never on GETs.

use crate::job::{InputRule, Job, JobError, RUNPOD_PROTOCOL_VERSION};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde_json::value::RawValue;
use std::time::Duration;
use url::Url;

/// The URLs and key the platform gives a worker through its environment.
#[derive(Debug, Clone)]
pub struct PlatformUrls {
    /// `RUNPOD_WEBHOOK_GET_JOB`.
    pub job_take: String,
    /// `RUNPOD_WEBHOOK_POST_OUTPUT`.
    pub job_done: Option<String>,
    /// `RUNPOD_WEBHOOK_POST_STREAM`.
    pub job_stream: Option<String>,
    /// `RUNPOD_WEBHOOK_PING`.
    pub ping: Option<String>,
    /// `RUNPOD_AI_API_KEY`, sent raw as `Authorization`.
    pub api_key: String,
    /// `RUNPOD_POD_ID` (or a generated id).
    pub worker_id: String,
}

/// A URL template could not be turned into a URL.
#[derive(Debug, thiserror::Error)]
#[error("{name} is not a valid URL template ({template:?}): {reason}")]
pub struct UrlError {
    name: &'static str,
    template: String,
    reason: String,
}

fn parse_url(name: &'static str, text: &str) -> Result<Url, UrlError> {
    Url::parse(text).map_err(|error| UrlError {
        name,
        template: text.to_owned(),
        reason: error.to_string(),
    })
}

/// `GET <RUNPOD_WEBHOOK_GET_JOB>&job_in_progress=0|1` — take one job (also used when one slot is
/// free). `$ID` and `$RUNPOD_POD_ID` are replaced with the worker id.
#[derive(Debug, Clone)]
pub struct JobTake {
    url: Url,
}

impl JobTake {
    fn url(&self, in_progress: bool) -> Url {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("job_in_progress", if in_progress { "1" } else { "0" });
        url
    }
}

/// `GET <take URL with /job-take/ → /job-take-batch/>&batch_size=N&job_in_progress=0|1` — take up
/// to N jobs.
#[derive(Debug, Clone)]
pub struct JobTakeBatch {
    url: Url,
}

impl JobTakeBatch {
    fn url(&self, batch_size: usize, in_progress: bool) -> Url {
        let mut url = self.url.clone();
        url.query_pairs_mut()
            .append_pair("batch_size", &batch_size.to_string())
            .append_pair("job_in_progress", if in_progress { "1" } else { "0" });
        url
    }
}

/// `GET <take URL with /job-take/ → /job-stop/>` — long-poll for `{"jobsToStop": [ids]}`.
#[derive(Debug, Clone)]
pub struct JobStop {
    url: Url,
}

/// `POST <RUNPOD_WEBHOOK_POST_OUTPUT with $ID = job id>&isStream=true|false` — a job's result,
/// or a progress report.
#[derive(Debug, Clone)]
pub struct JobDone {
    template: String,
}

impl JobDone {
    const VARIABLE: &'static str = "RUNPOD_WEBHOOK_POST_OUTPUT";

    fn url(&self, worker_id: &str, job_id: &str, is_stream: bool) -> Result<Url, UrlError> {
        job_url(Self::VARIABLE, &self.template, worker_id, job_id, is_stream)
    }
}

/// `POST <RUNPOD_WEBHOOK_POST_STREAM with $ID = job id>&isStream=false` — one stream chunk.
#[derive(Debug, Clone)]
pub struct JobStream {
    template: String,
}

impl JobStream {
    const VARIABLE: &'static str = "RUNPOD_WEBHOOK_POST_STREAM";

    fn url(&self, worker_id: &str, job_id: &str) -> Result<Url, UrlError> {
        job_url(Self::VARIABLE, &self.template, worker_id, job_id, false)
    }
}

/// `GET <RUNPOD_WEBHOOK_PING>&job_id=a,b&runpod_version=V` — the heartbeat, and once the
/// unhealthy report `&status=unhealthy&check=C&reason=R&runpod_version=V`.
#[derive(Debug, Clone)]
pub struct Ping {
    url: Url,
}

impl Ping {
    fn url(&self, job_ids: &[String]) -> Url {
        let mut url = self.url.clone();
        {
            let mut query = url.query_pairs_mut();
            if !job_ids.is_empty() {
                query.append_pair("job_id", &job_ids.join(","));
            }
            query.append_pair("runpod_version", RUNPOD_PROTOCOL_VERSION);
        }
        url
    }
}

/// What a job id keeps as it is in a URL path: RFC 3986's unreserved characters. Everything else
/// (`&`, `#`, `/`, `?`, a space, `%`, any non-ASCII) is percent-encoded, so an id can never post
/// a result to another job's URL. Real RunPod ids (letters, digits, `-`) are unchanged.
const ID_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Builds a per-job URL from a template: `$RUNPOD_POD_ID` → worker id, then `$ID` → the job id,
/// percent-encoded.
fn job_url(
    name: &'static str,
    template: &str,
    worker_id: &str,
    job_id: &str,
    is_stream: bool,
) -> Result<Url, UrlError> {
    let text = template.replace("$RUNPOD_POD_ID", worker_id).replace(
        "$ID",
        &percent_encoding::utf8_percent_encode(job_id, ID_ENCODED).to_string(),
    );
    let mut url = parse_url(name, &text)?;
    url.query_pairs_mut()
        .append_pair("isStream", if is_stream { "true" } else { "false" });
    Ok(url)
}

/// Which per-job POST to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    /// A final result (`is_stream` true for a streaming handler's).
    Done {
        /// The `isStream` parameter.
        is_stream: bool,
    },
    /// A progress report (job-done URL, `isStream=false`).
    Progress,
    /// A stream chunk (stream URL, `isStream=false`).
    Stream,
}

impl Post {
    /// What the POST carries, for log lines.
    pub fn noun(self) -> &'static str {
        match self {
            Self::Done { .. } => "result",
            Self::Progress => "progress",
            Self::Stream => "stream chunk",
        }
    }
}

/// A take the platform answered with a success status: its body (the jobs) is still to be read,
/// and may be at most `max_body` bytes.
#[derive(Debug)]
pub struct TakeAnswer {
    response: reqwest::Response,
    max_body: usize,
}

/// Room in a take answer beyond its jobs' inputs: each job's other members (id, webhook,
/// policy...), and the array around them.
const TAKE_ROOM_PER_JOB: usize = 64 * 1024;
const TAKE_ROOM: usize = 1024 * 1024;

/// One job from a take answer: runnable, or not, with the reason.
#[derive(Debug)]
pub enum TakenJob {
    /// A valid job.
    Valid(Job),
    /// A job that cannot run. With an id, it is failed with the reason; without, only logged.
    Invalid {
        /// The job id, if it had one.
        id: Option<String>,
        /// What is wrong.
        reason: String,
    },
}

/// What a take request came back with.
#[derive(Debug)]
pub enum TakeOutcome {
    /// One or more jobs.
    Jobs(Vec<TakenJob>),
    /// No job (204, 400, an empty body or `[]`).
    NoJob,
    /// 429: wait this long (`Retry-After`, else 5 s).
    RateLimited(Duration),
    /// Anything else: an error status, a network error, a body that is not a job.
    Failed(String),
}

/// What a job-stop poll came back with.
#[derive(Debug)]
pub enum StopOutcome {
    /// These jobs must stop (possibly none).
    Stop(Vec<String>),
    /// 429: wait this long.
    RateLimited(Duration),
    /// An error status, a network error or an unreadable body.
    Failed(String),
}

/// Why a POST did not succeed.
#[derive(Debug, thiserror::Error)]
#[error("{reason}")]
pub struct PostError {
    /// What happened.
    pub reason: String,
    /// Whether trying again may help (connection errors, timeouts, 408, 429, 5xx).
    pub retryable: bool,
    /// Whether the platform may have received the POST all the same (a timeout, or a
    /// connection lost after the body was sent).
    pub outcome_unknown: bool,
}

/// The platform client: one connection pool, one set of default headers.
#[derive(Debug, Clone)]
pub struct PlatformClient {
    http: reqwest::Client,
    take: JobTake,
    take_batch: JobTakeBatch,
    stop: Option<JobStop>,
    done: Option<JobDone>,
    stream: Option<JobStream>,
    ping: Option<Ping>,
    worker_id: String,
    max_input_bytes: usize,
}

/// How long a take or stop long-poll may be held before the worker gives up and polls again.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a result POST may take, plus [`upload_time`] for its body.
const POST_TIMEOUT: Duration = Duration::from_secs(30);
/// The slowest upload a POST is given time for: a 20 MiB result gets 80 s more.
const SLOWEST_UPLOAD_BYTES_PER_SEC: f64 = 256.0 * 1024.0;
/// 429 without `Retry-After`: the SDK's fixed wait.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(5);

impl PlatformClient {
    /// Builds the client from the platform's URLs. Fails when a template is not a URL.
    pub fn new(urls: &PlatformUrls, max_input_bytes: usize) -> Result<Self, UrlError> {
        let worker_id = &urls.worker_id;
        let take_text = urls
            .job_take
            .replace("$RUNPOD_POD_ID", worker_id)
            .replace("$ID", worker_id);
        let take_url = parse_url("RUNPOD_WEBHOOK_GET_JOB", &take_text)?;
        let with_segment = |segment: &str| {
            let mut url = take_url.clone();
            url.path().contains("/job-take/").then(|| {
                let path = url.path().replacen("/job-take/", segment, 1);
                url.set_path(&path);
                url
            })
        };
        let take_batch = with_segment("/job-take-batch/").unwrap_or_else(|| take_url.clone());
        let stop = with_segment("/job-stop/").map(|url| JobStop { url });
        if stop.is_none() {
            tracing::warn!("the job-take URL has no /job-take/ segment: job-stop polling is off");
        }
        let ping = match urls.ping.as_deref() {
            Some(text) if !text.is_empty() && text != "PING_NOT_SET" => Some(Ping {
                url: parse_url(
                    "RUNPOD_WEBHOOK_PING",
                    &text.replace("$RUNPOD_POD_ID", worker_id),
                )?,
            }),
            _ => None,
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(key) = HeaderValue::from_str(&urls.api_key) {
            headers.insert(AUTHORIZATION, key);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!(
                "worker-host/",
                env!("CARGO_PKG_VERSION"),
                " (RunPod-Python-SDK/1.12.0 compatible)"
            ))
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .expect("the HTTP client configuration is static and valid");
        Ok(Self {
            http,
            take: JobTake { url: take_url },
            take_batch: JobTakeBatch { url: take_batch },
            stop,
            done: urls.job_done.clone().map(|template| JobDone { template }),
            stream: urls
                .job_stream
                .clone()
                .map(|template| JobStream { template }),
            ping,
            worker_id: worker_id.clone(),
            max_input_bytes,
        })
    }

    /// Whether job-stop polling is possible (the take URL has a `/job-take/` segment).
    pub fn has_stop_channel(&self) -> bool {
        self.stop.is_some()
    }

    /// Whether a heartbeat URL is configured.
    pub fn has_ping(&self) -> bool {
        self.ping.is_some()
    }

    /// Asks for up to `count` jobs (the single-job URL for one, the batch URL for more) and
    /// waits for the platform's answer to begin. A success status gives a [`TakeAnswer`] whose
    /// jobs [`Self::read_take`] reads; anything else is the outcome already. Cancelling this
    /// future loses no job; once it has returned an answer, the jobs in it are the worker's.
    pub async fn start_take(
        &self,
        count: usize,
        in_progress: bool,
    ) -> Result<TakeAnswer, TakeOutcome> {
        let url = if count <= 1 {
            self.take.url(in_progress)
        } else {
            self.take_batch.url(count, in_progress)
        };
        let response = match self.http.get(url).timeout(LONG_POLL_TIMEOUT).send().await {
            Ok(response) => response,
            Err(error) => return Err(TakeOutcome::Failed(describe(&error))),
        };
        let status = response.status();
        match status {
            StatusCode::NO_CONTENT | StatusCode::BAD_REQUEST => Err(TakeOutcome::NoJob),
            StatusCode::TOO_MANY_REQUESTS => Err(TakeOutcome::RateLimited(retry_after(&response))),
            _ if !status.is_success() => Err(TakeOutcome::Failed(format!("HTTP {status}"))),
            _ => Ok(TakeAnswer {
                response,
                max_body: count
                    .max(1)
                    .saturating_mul(self.max_input_bytes.saturating_add(TAKE_ROOM_PER_JOB))
                    .saturating_add(TAKE_ROOM),
            }),
        }
    }

    /// Reads the jobs of a take the platform answered with a success status. A body over what
    /// the jobs asked for can hold (their inputs at the input limit, plus room) is refused as it
    /// arrives, before it can take the worker's memory: a failed take, logged with the sizes.
    pub async fn read_take(&self, answer: TakeAnswer) -> TakeOutcome {
        let TakeAnswer {
            mut response,
            max_body,
        } = answer;
        let too_large = |size: u64| {
            TakeOutcome::Failed(format!(
                "the take answer is {size} bytes or more, over the {max_body} bytes its jobs can hold at --max-input-bytes; its jobs are dropped"
            ))
        };
        if let Some(length) = response.content_length() {
            if length > max_body as u64 {
                return too_large(length);
            }
        }
        // One byte more than the answer: a job taken alone keeps this buffer as its text, with
        // the NUL the ABI puts after it.
        let mut body = crate::buffers::take(
            response
                .content_length()
                .map_or(0, |length| length as usize)
                .min(max_body)
                + 1,
        );
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > max_body {
                        return too_large((body.len() + chunk.len()) as u64);
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return self.parse_take(body),
                Err(error) => return TakeOutcome::Failed(describe(&error)),
            }
        }
    }

    /// The jobs of a take answer. A single job object becomes the job's own text without a
    /// copy; the jobs of a batch are copied out of it, once each.
    fn parse_take(&self, body: Vec<u8>) -> TakeOutcome {
        let Ok(text) = String::from_utf8(body) else {
            return TakeOutcome::Failed("the take answer is not UTF-8".into());
        };
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return TakeOutcome::NoJob;
        }
        if trimmed.starts_with('[') {
            return match serde_json::from_str::<Vec<&RawValue>>(&text) {
                Ok(items) if items.is_empty() => TakeOutcome::NoJob,
                Ok(items) => TakeOutcome::Jobs(
                    items
                        .into_iter()
                        .map(|raw| self.check_job(Job::parse(raw, None, InputRule::Present)))
                        .collect(),
                ),
                Err(error) => {
                    TakeOutcome::Failed(format!("the take answer is not valid JSON: {error}"))
                }
            };
        }
        if trimmed.starts_with('{') {
            // Parsed once, as the job (a 20 MiB input is not read twice).
            return match Job::from_text(text, None, InputRule::Present) {
                Err(JobError::InvalidJson(error)) => {
                    TakeOutcome::Failed(format!("the take answer is not valid JSON: {error}"))
                }
                parsed => TakeOutcome::Jobs(vec![self.check_job(parsed)]),
            };
        }
        let preview: String = text.chars().take(80).collect();
        TakeOutcome::Failed(format!("the take answer is not a job: {preview:?}"))
    }

    fn check_job(&self, parsed: Result<Job, JobError>) -> TakenJob {
        match parsed {
            Ok(job) if job.input().len() > self.max_input_bytes => TakenJob::Invalid {
                reason: format!(
                    "the job input is {} bytes, over the limit of {} bytes",
                    job.input().len(),
                    self.max_input_bytes
                ),
                id: Some(job.id().to_owned()),
            },
            Ok(job) => TakenJob::Valid(job),
            Err(JobError::MissingInput { id }) => TakenJob::Invalid {
                id: Some(id),
                reason: "the job has no input".into(),
            },
            Err(error) => TakenJob::Invalid {
                id: None,
                reason: error.to_string(),
            },
        }
    }

    /// Polls job-stop once. Without a stop channel, never returns (nothing can be stopped).
    pub async fn poll_stop(&self) -> StopOutcome {
        let Some(stop) = &self.stop else {
            return std::future::pending().await;
        };
        let response = match self
            .http
            .get(stop.url.clone())
            .timeout(LONG_POLL_TIMEOUT)
            .send()
            .await
        {
            Ok(response) => response,
            Err(error) => return StopOutcome::Failed(describe(&error)),
        };
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return StopOutcome::Stop(Vec::new());
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            return StopOutcome::RateLimited(retry_after(&response));
        }
        if !status.is_success() {
            return StopOutcome::Failed(format!("HTTP {status}"));
        }
        #[derive(serde::Deserialize)]
        struct StopAnswer {
            #[serde(rename = "jobsToStop", default)]
            jobs_to_stop: Vec<serde_json::Value>,
        }
        let body = response.bytes().await.unwrap_or_default();
        match serde_json::from_slice::<StopAnswer>(&body) {
            Ok(answer) => StopOutcome::Stop(
                answer
                    .jobs_to_stop
                    .into_iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect(),
            ),
            Err(_) => StopOutcome::Stop(Vec::new()),
        }
    }

    /// Sends one per-job POST once. The body is JSON text (as `Bytes`, so a retry shares it instead
    /// of copying it); headers as the SDK sends them.
    pub async fn post(
        &self,
        kind: Post,
        job_id: &str,
        body: bytes::Bytes,
    ) -> Result<(), PostError> {
        let worker_id = &self.worker_id;
        let url = match kind {
            Post::Done { is_stream } => self
                .done
                .as_ref()
                .map(|done| done.url(worker_id, job_id, is_stream)),
            Post::Progress => self
                .done
                .as_ref()
                .map(|done| done.url(worker_id, job_id, false)),
            Post::Stream => self
                .stream
                .as_ref()
                .map(|stream| stream.url(worker_id, job_id)),
        }
        .ok_or_else(|| PostError {
            outcome_unknown: false,
            reason: format!(
                "{} is not set, so results cannot be delivered",
                if kind == Post::Stream {
                    JobStream::VARIABLE
                } else {
                    JobDone::VARIABLE
                }
            ),
            retryable: false,
        })?
        .map_err(|error| PostError {
            reason: error.to_string(),
            retryable: false,
            outcome_unknown: false,
        })?;
        let request = self
            .http
            .post(url)
            .timeout(POST_TIMEOUT + upload_time(body.len()))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .header("X-Request-ID", job_id)
            .body(body);
        let response = request.send().await.map_err(|error| PostError {
            reason: describe(&error),
            retryable: true,
            // Refused or unreachable: nothing was sent. Otherwise it may have arrived.
            outcome_unknown: !error.is_connect(),
        })?;
        let status = response.status();
        // Read the body so the connection can be reused; its content is ignored, as in the SDK.
        let _ = response.bytes().await;
        if status.is_success() {
            return Ok(());
        }
        let retryable = status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT;
        Err(PostError {
            reason: format!("HTTP {status}"),
            retryable,
            outcome_unknown: false,
        })
    }

    /// Sends one heartbeat with the in-flight job ids; failures are logged, never retried (the
    /// next beat is the retry).
    pub async fn ping(&self, job_ids: &[String], timeout: Duration) {
        let Some(ping) = &self.ping else { return };
        let result = self
            .http
            .get(ping.url(job_ids))
            .timeout(timeout)
            .send()
            .await;
        match result {
            Ok(response) => tracing::trace!(status = %response.status(), "heartbeat sent"),
            Err(error) => tracing::warn!("heartbeat failed: {}", describe(&error)),
        }
    }

    /// Reports once, best effort, that the worker cannot serve (§17's unhealthy report).
    pub async fn report_unhealthy(&self, check: &str, reason: &str) {
        let Some(ping) = &self.ping else { return };
        let mut url = ping.url.clone();
        let reason: String = reason.chars().take(256).collect();
        url.query_pairs_mut()
            .append_pair("status", "unhealthy")
            .append_pair("check", check)
            .append_pair("reason", &reason)
            .append_pair("runpod_version", RUNPOD_PROTOCOL_VERSION);
        if let Err(error) = self
            .http
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            tracing::warn!("the unhealthy report failed: {}", describe(&error));
        }
    }
}

fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get(RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_RATE_LIMIT_WAIT)
}

/// A network error in one line, with its cause (reqwest's own text omits it).
/// The time a body of `bytes` takes to upload at the slowest rate a POST is given time for.
fn upload_time(bytes: usize) -> Duration {
    Duration::from_secs_f64(bytes as f64 / SLOWEST_UPLOAD_BYTES_PER_SEC)
}

fn describe(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out".to_owned()
    } else if error.is_connect() {
        "connection failed".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(take: &str, ping: Option<&str>) -> PlatformClient {
        PlatformClient::new(
            &PlatformUrls {
                job_take: take.into(),
                job_done: Some("http://p/v2/ep/job-done/$RUNPOD_POD_ID/$ID".into()),
                job_stream: None,
                ping: ping.map(Into::into),
                api_key: "k".into(),
                worker_id: "wk1".into(),
            },
            1024,
        )
        .unwrap()
    }

    /// Take URLs substitute both placeholders and add parameters with or without a `?`.
    #[test]
    fn take_urls() {
        let with_query = client("http://p/v2/ep/job-take/$RUNPOD_POD_ID?gpu=x", None);
        assert_eq!(
            with_query.take.url(false).as_str(),
            "http://p/v2/ep/job-take/wk1?gpu=x&job_in_progress=0"
        );
        assert_eq!(
            with_query.take_batch.url(3, true).as_str(),
            "http://p/v2/ep/job-take-batch/wk1?gpu=x&batch_size=3&job_in_progress=1"
        );
        assert_eq!(
            with_query.stop.as_ref().unwrap().url.as_str(),
            "http://p/v2/ep/job-stop/wk1?gpu=x"
        );
        let without_query = client("http://p/v2/ep/job-take/$ID", None);
        assert_eq!(
            without_query.take.url(false).as_str(),
            "http://p/v2/ep/job-take/wk1?job_in_progress=0"
        );
    }

    /// Per-job URLs put the worker and job ids in place (the job id percent-encoded, its `/`
    /// included) and add `isStream`.
    #[test]
    fn job_urls() {
        let url = job_url(
            "x",
            "http://p/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=x",
            "wk1",
            "c 1/é",
            true,
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "http://p/v2/ep/job-done/wk1/c%201%2F%C3%A9?gpu=x&isStream=true"
        );
    }

    /// The heartbeat lists job ids comma-joined and omits the parameter when there are none.
    #[test]
    fn ping_urls() {
        let client = client(
            "http://p/v2/ep/job-take/$ID",
            Some("http://p/v2/ep/ping/$RUNPOD_POD_ID?gpu=x"),
        );
        let ping = client.ping.as_ref().unwrap();
        assert_eq!(
            ping.url(&["c-1".into(), "c-2".into()]).as_str(),
            "http://p/v2/ep/ping/wk1?gpu=x&job_id=c-1%2Cc-2&runpod_version=1.12.0"
        );
        assert_eq!(
            ping.url(&[]).as_str(),
            "http://p/v2/ep/ping/wk1?gpu=x&runpod_version=1.12.0"
        );
    }

    /// Take answers: objects and arrays become jobs, bad items are reported, garbage fails.
    #[test]
    fn take_answers() {
        let client = client("http://p/v2/ep/job-take/$ID", None);
        assert!(matches!(
            client.parse_take(b"".to_vec()),
            TakeOutcome::NoJob
        ));
        assert!(matches!(
            client.parse_take(b"[]".to_vec()),
            TakeOutcome::NoJob
        ));
        assert!(matches!(
            client.parse_take(b"<html>".to_vec()),
            TakeOutcome::Failed(_)
        ));
        let TakeOutcome::Jobs(jobs) =
            client.parse_take(br#"[{"id":"a","input":1},{"input":2},7,{"id":"b"}]"#.to_vec())
        else {
            panic!("jobs expected");
        };
        assert!(matches!(&jobs[0], TakenJob::Valid(job) if job.id() == "a"));
        assert!(matches!(&jobs[1], TakenJob::Invalid { id: None, .. }));
        assert!(matches!(&jobs[2], TakenJob::Invalid { id: None, .. }));
        assert!(matches!(&jobs[3], TakenJob::Invalid { id: Some(id), .. } if id == "b"));
        let big = format!(r#"{{"id":"c","input":"{}"}}"#, "x".repeat(2000));
        let TakeOutcome::Jobs(jobs) = client.parse_take(big.into_bytes()) else {
            panic!("jobs expected");
        };
        assert!(
            matches!(&jobs[0], TakenJob::Invalid { id: Some(_), reason } if reason.contains("over the limit"))
        );
        // One job taken alone, with whitespace around it: its text is the job object, and a
        // malformed one is a job failure, not a failed take.
        let TakeOutcome::Jobs(jobs) =
            client.parse_take(b" \n{\"id\":\"d\",\"input\":{\"a\":[1]}}\r\n".to_vec())
        else {
            panic!("jobs expected");
        };
        let TakenJob::Valid(job) = &jobs[0] else {
            panic!("a valid job expected");
        };
        assert_eq!(job.job_json(), r#"{"id":"d","input":{"a":[1]}}"#);
        assert_eq!(job.input(), r#"{"a":[1]}"#);
        assert!(matches!(
            client.parse_take(br#"{"id":"e","input":1"#.to_vec()),
            TakeOutcome::Failed(reason) if reason.contains("not valid JSON")
        ));
        let TakeOutcome::Jobs(jobs) = client.parse_take(br#"{"id":"e"}"#.to_vec()) else {
            panic!("jobs expected");
        };
        assert!(matches!(&jobs[0], TakenJob::Invalid { id: Some(id), .. } if id == "e"));
    }
}
