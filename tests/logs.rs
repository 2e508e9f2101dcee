//! What users see of a job outside its result, end to end against the stand-in platform: the
//! `batchId` on a job's log lines (in text and in the SDK's JSON lines), and the stream chunk
//! limit (`--max-chunk-bytes`), which fails a job whose chunk the platform would not take.

use e2e::platform::{Platform, Recorded, Route};
use e2e::{Sample, WorkerProcess};
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The final results (job-done posts that are not progress) for job `id`.
fn results_of<'a>(requests: &'a [Recorded], id: &str) -> Vec<&'a Recorded> {
    requests
        .iter()
        .filter(|r| r.route == Route::Done && r.json().get("status").is_none())
        .filter(|r| r.job_id().as_deref() == Some(id))
        .collect()
}

/// The stream chunks posted for job `id`, in order.
fn chunks_of(requests: &[Recorded], id: &str) -> Vec<Value> {
    requests
        .iter()
        .filter(|r| r.route == Route::Stream && r.job_id().as_deref() == Some(id))
        .map(|r| r.json()["output"].clone())
        .collect()
}

/// The failed result of a streaming job (the SDK's generator error: plain text, not a JSON
/// payload) whose failure is `OutputTooLarge` with `message`.
fn chunk_failure(message: &str) -> Value {
    json!({"error": format!("handler: {message} \ntraceback: OutputTooLarge: {message}")})
}

/// Runs a job with a `batchId` and one without on the echo handler in `--log-format format`,
/// waits for both results, stops the worker and returns its log.
fn log_of_a_batch_job(format: &str) -> String {
    let platform = Platform::start();
    platform.push_job(json!({"id": "in-batch", "input": {"a": 1}, "batchId": "batch-7"}));
    platform.push_job(json!({"id": "alone", "input": {"a": 2}}));
    let mut worker = WorkerProcess::start(&platform, Sample::Echo, &["--log-format", format], &[]);
    platform.wait_for(WAIT, "both results", |r| {
        !results_of(r, "in-batch").is_empty() && !results_of(r, "alone").is_empty()
    });
    worker.terminate();
    assert_eq!(worker.wait(WAIT), Some(0), "{}", worker.stderr());
    worker.stderr()
}

/// As in the SDK (`rp_logger.py`), a JSON line logged in a job that carries a `batchId` has
/// `[batchId=<id>] ` at the start of its message, its `requestId` still the job id; the lines of
/// a job without one, and the worker's own lines, are unchanged.
#[test]
fn json_lines_of_a_batch_job_are_prefixed_with_its_batch_id() {
    let log = log_of_a_batch_job("json");
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}\n{log}")))
        .collect();
    let of = |id: Option<&str>| -> Vec<&Value> {
        lines
            .iter()
            .filter(|line| line["requestId"].as_str() == id)
            .collect()
    };
    let in_batch = of(Some("in-batch"));
    assert!(
        in_batch.contains(&&json!({
            "requestId": "in-batch",
            "message": "[batchId=batch-7] Started.",
            "level": "INFO",
        })),
        "{log}"
    );
    for line in &in_batch {
        let message = line["message"].as_str().unwrap();
        assert!(message.starts_with("[batchId=batch-7] "), "{line}\n{log}");
    }
    let alone = of(Some("alone"));
    assert!(
        alone.contains(&&json!({"requestId": "alone", "message": "Started.", "level": "INFO"})),
        "{log}"
    );
    for line in alone.iter().chain(&of(None)) {
        assert!(
            !line["message"].as_str().unwrap().contains("batchId"),
            "{line}\n{log}"
        );
    }
}

/// In text, a line logged in a job that carries a `batchId` shows `batchId=<id>` among the job
/// span's fields, next to its `job_id`; a job without one shows none.
#[test]
fn text_lines_of_a_batch_job_show_its_batch_id() {
    let log = log_of_a_batch_job("text");
    let in_batch: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("job_id=in-batch"))
        .collect();
    assert!(
        in_batch
            .iter()
            .any(|line| line.contains("job{job_id=in-batch batchId=batch-7}: Started.")),
        "{log}"
    );
    for line in &in_batch {
        assert!(line.contains("batchId=batch-7"), "{line}\n{log}");
    }
    let alone: Vec<&str> = log.lines().filter(|l| l.contains("job_id=alone")).collect();
    assert!(
        alone
            .iter()
            .any(|line| line.contains("job{job_id=alone}: Started.")),
        "{log}"
    );
    for line in &alone {
        assert!(!line.contains("batchId"), "{line}\n{log}");
    }
}

/// A JSON string chunk whose JSON text is `bytes` long.
fn chunk_of(bytes: usize) -> Value {
    Value::String("x".repeat(bytes - 2))
}

/// By default a stream chunk may be 1,000,000 bytes (RunPod's documented 1 MB), in both
/// isolations: a chunk of exactly that size streams; one byte more fails the job with the size,
/// the limit and the flag, and nothing of it (nor of what the handler would emit after) reaches
/// the platform, while the chunk before it did.
#[test]
fn a_chunk_over_the_default_limit_fails_its_job() {
    for isolation in ["runner", "none"] {
        let platform = Platform::start();
        let at_limit = chunk_of(1_000_000);
        platform.push_job(json!({"id": "fits", "input": {"chunks": [1, at_limit]}}));
        platform.push_job(json!({
            "id": "over",
            "input": {"chunks": [1, chunk_of(1_000_001), 3]},
        }));
        let _worker =
            WorkerProcess::start(&platform, Sample::Stream, &["--isolation", isolation], &[]);
        let requests = platform.wait_for(WAIT, "both results", |r| {
            !results_of(r, "fits").is_empty() && !results_of(r, "over").is_empty()
        });
        assert_eq!(
            chunks_of(&requests, "fits"),
            [json!(1), at_limit],
            "{isolation}"
        );
        assert_eq!(
            results_of(&requests, "fits")[0].json(),
            json!({"output": []}),
            "{isolation}"
        );
        assert_eq!(chunks_of(&requests, "over"), [json!(1)], "{isolation}");
        let over = results_of(&requests, "over")[0];
        assert_eq!(over.query_value("isStream"), Some("true"), "{isolation}");
        assert_eq!(
            over.json(),
            chunk_failure(
                "stream chunk of 1000001 bytes is over the limit of 1000000 bytes \
                 (--max-chunk-bytes)"
            ),
            "{isolation}"
        );
    }
}

/// `--max-chunk-bytes` (and `WORKER_HOST_MAX_CHUNK_BYTES`) sets the limit; it bounds chunks
/// only: progress and the aggregated final result stay under `--max-output-bytes`.
#[test]
fn the_chunk_limit_is_set_by_flag_or_environment() {
    for (args, env) in [
        (&["--max-chunk-bytes", "100"][..], &[][..]),
        (&[][..], &[("WORKER_HOST_MAX_CHUNK_BYTES", "100")][..]),
    ] {
        let platform = Platform::start();
        platform
            .push_job(json!({"id": "small", "input": {"chunks": [chunk_of(100), chunk_of(100)]}}));
        platform.push_job(json!({"id": "big", "input": {"chunks": [chunk_of(101)]}}));
        let mut all_args = vec!["--return-aggregate-stream"];
        all_args.extend_from_slice(args);
        let _worker = WorkerProcess::start(&platform, Sample::Stream, &all_args, env);
        let requests = platform.wait_for(WAIT, "both results", |r| {
            !results_of(r, "small").is_empty() && !results_of(r, "big").is_empty()
        });
        assert_eq!(
            results_of(&requests, "small")[0].json(),
            json!({"output": [chunk_of(100), chunk_of(100)]}),
            "{args:?} {env:?}"
        );
        assert!(chunks_of(&requests, "big").is_empty(), "{args:?} {env:?}");
        assert_eq!(
            results_of(&requests, "big")[0].json(),
            chunk_failure(
                "stream chunk of 101 bytes is over the limit of 100 bytes (--max-chunk-bytes)"
            ),
            "{args:?} {env:?}"
        );
    }
}
