//! Webhook delivery: when a job with a `webhook` reaches a final status, its status object is
//! POSTed there as JSON, as the platform does: each attempt may take 10 s, and a failed attempt
//! (connection error, timeout, or a non-2xx answer) is retried up to two more times.
//!
//! At most `MAX_IN_FLIGHT` (64) deliveries run at once (the rest wait their turn), so a burst of
//! jobs with a slow webhook cannot pile up tasks and bodies; at shutdown the deliveries under way
//! get a bounded time to finish.

use super::store::WebhookCall;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::task::TaskTracker;

/// How long one webhook attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many attempts each webhook gets (the first and two retries).
const ATTEMPTS: u32 = 3;
/// How many deliveries run at once.
const MAX_IN_FLIGHT: usize = 64;

/// Delivers the calls it receives.
#[derive(Debug)]
pub struct Webhooks {
    deliveries: TaskTracker,
    receiver: mpsc::UnboundedReceiver<WebhookCall>,
    retry_after: Duration,
}

impl Webhooks {
    /// Delivers every call sent to `receiver`, waiting `retry_after` between attempts.
    pub fn new(receiver: mpsc::UnboundedReceiver<WebhookCall>, retry_after: Duration) -> Self {
        Self {
            deliveries: TaskTracker::new(),
            receiver,
            retry_after,
        }
    }

    /// The deliveries under way (to wait for at shutdown).
    pub fn deliveries(&self) -> TaskTracker {
        self.deliveries.clone()
    }

    /// Delivers calls until every sender is gone.
    pub async fn run(mut self) {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "worker-host/",
                env!("CARGO_PKG_VERSION"),
                " dev API webhook"
            ))
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .expect("the webhook client configuration is static and valid");
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        while let Some(call) = self.receiver.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let http = http.clone();
            let retry_after = self.retry_after;
            self.deliveries.spawn(async move {
                deliver(&http, &call, retry_after).await;
                drop(slot);
            });
        }
    }
}

/// The URL as logged: without its query and credentials, which may carry secrets.
fn shown(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            parsed.set_query(None);
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("");
            parsed.to_string()
        }
        Err(_) => "(an unparsable URL)".into(),
    }
}

async fn deliver(http: &reqwest::Client, call: &WebhookCall, retry_after: Duration) {
    for attempt in 1..=ATTEMPTS {
        let outcome = http
            .post(&call.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(call.body.clone())
            .send()
            .await;
        let problem = match outcome {
            Ok(response) if response.status().is_success() => {
                tracing::debug!(job_id = %call.job_id, "Webhook delivered to {}.", shown(&call.url));
                return;
            }
            Ok(response) => format!("HTTP {}", response.status()),
            Err(error) => error.without_url().to_string(),
        };
        if attempt == ATTEMPTS {
            tracing::warn!(job_id = %call.job_id, "Webhook to {} failed ({problem}) after {ATTEMPTS} attempts; giving up.", shown(&call.url));
            return;
        }
        tracing::warn!(job_id = %call.job_id, "Webhook to {} failed ({problem}); retrying in {retry_after:?}.", shown(&call.url));
        tokio::time::sleep(retry_after).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logged webhook URLs keep the host and path, never the query or credentials.
    #[test]
    fn logged_urls_hide_secrets() {
        assert_eq!(
            shown("https://user:pw@hooks.example/job?token=s3cret"),
            "https://hooks.example/job"
        );
        assert_eq!(shown("not a url"), "(an unparsable URL)");
    }
}
