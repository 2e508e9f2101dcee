//! Log set-up: the level names operators use (the Python SDK's and the usual ones), and the two
//! line formats: human-readable text, and the SDK's JSON line
//! `{"requestId": <job id or null>, "message": ..., "level": ...}` that RunPod's log tooling reads.
//! A job that carries a `batchId` has it on its span (`batchId` next to `job_id`): text lines show
//! it in the span's fields, and JSON lines start its messages with `[batchId=<id>] `, as the SDK's
//! do.
//!
//! Logs always go to stderr: in a one-shot run stdout carries the result.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The line format of log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// JSON lines when `RUNPOD_ENDPOINT_ID` is set (on the platform), text otherwise.
    Auto,
    /// Human-readable text.
    Text,
    /// The Python SDK's JSON lines.
    Json,
}

/// A log level name that is not one of the accepted ones.
#[derive(Debug, thiserror::Error)]
#[error("unknown log level {0:?}: use one of TRACE, DEBUG, INFO, WARN (or WARNING), ERROR, NOTSET")]
pub struct UnknownLevel(pub String);

/// Parses a level name, case-insensitively: the SDK's `NOTSET TRACE DEBUG INFO WARN ERROR` and
/// the usual `WARNING`, `CRITICAL`, `FATAL`, `OFF`. `NOTSET` and `OFF` silence logging, as the
/// SDK's `NOTSET` does.
pub fn parse_level(name: &str) -> Result<LevelFilter, UnknownLevel> {
    match name.trim().to_ascii_uppercase().as_str() {
        "NOTSET" | "OFF" | "NONE" => Ok(LevelFilter::OFF),
        "TRACE" => Ok(LevelFilter::TRACE),
        "DEBUG" => Ok(LevelFilter::DEBUG),
        "INFO" => Ok(LevelFilter::INFO),
        "WARN" | "WARNING" => Ok(LevelFilter::WARN),
        "ERROR" | "CRITICAL" | "FATAL" => Ok(LevelFilter::ERROR),
        _ => Err(UnknownLevel(name.to_owned())),
    }
}

/// Installs the process-wide subscriber. Call once, from `main`.
pub fn init(level: LevelFilter, format: LogFormat) {
    // HTTP internals are noise at INFO and DEBUG; they speak up only for warnings.
    let quiet = level.min(LevelFilter::WARN);
    let filter = Targets::new()
        .with_default(level)
        .with_target("hyper", quiet)
        .with_target("hyper_util", quiet)
        .with_target("reqwest", quiet)
        .with_target("h2", quiet);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(JsonLines).init(),
        LogFormat::Text | LogFormat::Auto => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .init(),
    }
}

/// The job id (and batch id) a span carries, stored in its extensions by [`JsonLines`].
struct JobOfSpan {
    job_id: String,
    batch_id: Option<String>,
}

/// Writes each event as the SDK's JSON log line, with the job id of the innermost span that has a
/// `job_id` field, and the message prefixed with that span's `batchId` if it has one.
struct JsonLines;

impl<S> Layer<S> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut job_id = FieldText::new("job_id");
        attrs.record(&mut job_id);
        let mut batch_id = FieldText::new("batchId");
        attrs.record(&mut batch_id);
        if let (Some(job_id), Some(span)) = (job_id.found, ctx.span(id)) {
            span.extensions_mut().insert(JobOfSpan {
                job_id,
                batch_id: batch_id.found,
            });
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = FieldText::new("message");
        event.record(&mut visitor);
        let mut message = visitor.found.unwrap_or_default();
        if !visitor.others.is_empty() {
            message.push_str(&visitor.others);
        }
        let job = ctx.event_scope(event).and_then(|scope| {
            scope
                .from_root()
                .filter_map(|span| {
                    span.extensions()
                        .get::<JobOfSpan>()
                        .map(|job| (job.job_id.clone(), job.batch_id.clone()))
                })
                .last()
        });
        let (request_id, batch_id) = job.unzip();
        if let Some(batch_id) = batch_id.flatten() {
            // The SDK's rp_logger prefixes the message itself, so the prefix is in the JSON text.
            message.insert_str(0, &format!("[batchId={batch_id}] "));
        }
        let level = match *event.metadata().level() {
            Level::TRACE => "TRACE",
            Level::DEBUG => "DEBUG",
            Level::INFO => "INFO",
            Level::WARN => "WARN",
            Level::ERROR => "ERROR",
        };
        let line = JsonLine {
            request_id: request_id.as_deref(),
            message: &message,
            level,
        };
        let mut text = serde_json::to_string(&line).expect("strings always serialize");
        text.push('\n');
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// One log line in the SDK's shape, keys in its order.
#[derive(serde::Serialize)]
struct JsonLine<'a> {
    #[serde(rename = "requestId")]
    request_id: Option<&'a str>,
    message: &'a str,
    level: &'a str,
}

/// Collects one named field as text, and the other fields as ` key=value` pairs.
struct FieldText {
    wanted: &'static str,
    found: Option<String>,
    others: String,
}

impl FieldText {
    fn new(wanted: &'static str) -> Self {
        Self {
            wanted,
            found: None,
            others: String::new(),
        }
    }
}

impl Visit for FieldText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == self.wanted {
            self.found = Some(value.to_owned());
        } else {
            let _ = write!(self.others, " {}={}", field.name(), value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == self.wanted {
            self.found = Some(format!("{value:?}"));
        } else {
            let _ = write!(self.others, " {}={:?}", field.name(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The SDK's names, WARNING and the usual aliases are all accepted; nonsense is refused.
    #[test]
    fn level_names() {
        assert_eq!(parse_level("warning").unwrap(), LevelFilter::WARN);
        assert_eq!(parse_level("WARN").unwrap(), LevelFilter::WARN);
        assert_eq!(parse_level("NOTSET").unwrap(), LevelFilter::OFF);
        assert_eq!(parse_level("Debug").unwrap(), LevelFilter::DEBUG);
        assert!(parse_level("loud").is_err());
    }
}
