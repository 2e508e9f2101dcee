//! Webhook delivery: when a job with a `webhook` reaches a final status, its status object is
//! POSTed there as JSON, as the platform does: each attempt may take 10 s, and a failed attempt
//! (connection error, timeout, or a non-2xx answer) is retried up to two more times.

use super::store::WebhookCall;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long one webhook attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many attempts each webhook gets (the first and two retries).
const ATTEMPTS: u32 = 3;

/// Delivers every call received, each on its own task, until the sender side is dropped.
pub async fn deliver_all(mut calls: mpsc::UnboundedReceiver<WebhookCall>, retry_after: Duration) {
    let http = reqwest::Client::builder()
        .user_agent(concat!(
            "worker-host/",
            env!("CARGO_PKG_VERSION"),
            " dev API webhook"
        ))
        .timeout(ATTEMPT_TIMEOUT)
        .build()
        .expect("the webhook client configuration is static and valid");
    while let Some(call) = calls.recv().await {
        tokio::spawn(deliver(http.clone(), call, retry_after));
    }
}

async fn deliver(http: reqwest::Client, call: WebhookCall, retry_after: Duration) {
    for attempt in 1..=ATTEMPTS {
        let outcome = http
            .post(&call.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(call.body.clone())
            .send()
            .await;
        let problem = match outcome {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(job_id = %call.job_id, "Webhook delivered to {}.", call.url);
                return;
            }
            Ok(response) => format!("HTTP {}", response.status()),
            Err(error) => error.to_string(),
        };
        if attempt == ATTEMPTS {
            tracing::warn!(job_id = %call.job_id, "Webhook to {} failed ({problem}) after {ATTEMPTS} attempts; giving up.", call.url);
            return;
        }
        tracing::warn!(job_id = %call.job_id, "Webhook to {} failed ({problem}); retrying in {retry_after:?}.", call.url);
        tokio::time::sleep(retry_after).await;
    }
}
