//! Webhook delivery: when a job with a `webhook` reaches a final status, its status object is
//! POSTed there as JSON, as the platform does: each attempt may take 10 s, and a failed attempt
//! (connection error, timeout, or a non-2xx answer) is retried up to two more times.
//!
//! Bounded, and fair to healthy receivers:
//! - at most [`MAX_PENDING_CALLS`] calls, with at most [`MAX_PENDING_BYTES`] of status bodies,
//!   wait or are under way at once; a call past either bound is dropped, and logged by job id;
//! - at most `MAX_IN_FLIGHT` (64) attempts run at once, and at most `MAX_IN_FLIGHT_PER_HOST` (16)
//!   to one receiver (scheme, host and port), so a receiver that never answers slows only the
//!   calls to itself;
//! - a call waiting between attempts holds no slot.
//!
//! At shutdown the calls already queued are still delivered, within a bounded time (see
//! [`Webhooks::run`]); what is left then is abandoned, and logged by job id.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one webhook attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many attempts each webhook gets (the first and two retries).
const ATTEMPTS: u32 = 3;
/// How many attempts run at once.
const MAX_IN_FLIGHT: usize = 64;
/// How many attempts to one receiver run at once: a quarter of all, so a receiver that never
/// answers cannot hold every slot.
const MAX_IN_FLIGHT_PER_HOST: usize = 16;
/// The most webhook calls that may wait or be under way at once (each holds a status body).
pub const MAX_PENDING_CALLS: usize = 10_000;
/// The most bytes of status bodies that may wait or be under way at once: jobs finishing faster
/// than their webhooks are delivered cannot grow memory past it.
pub const MAX_PENDING_BYTES: usize = 256 * 1024 * 1024;

/// A final status object to POST to a job's webhook: what the store hands over when a job with a
/// webhook ends.
#[derive(Debug)]
pub struct WebhookCall {
    /// The webhook URL.
    pub url: String,
    /// The job id (for logs).
    pub job_id: String,
    /// The status object, as JSON text.
    pub body: String,
}

/// A call admitted within the pending bounds; its permits go when its delivery ends.
#[derive(Debug)]
struct Pending {
    call: WebhookCall,
    _admitted: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The store's end: queues calls within the pending bounds.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    sender: mpsc::Sender<Pending>,
    calls: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl WebhookSender {
    /// Queues `call` for delivery without waiting. When [`MAX_PENDING_CALLS`] or
    /// [`MAX_PENDING_BYTES`] would be passed, or delivery has stopped (shutdown), the call is
    /// dropped and the job id logged.
    pub fn send(&self, call: WebhookCall) {
        let size = u32::try_from(call.body.len()).unwrap_or(u32::MAX);
        let admitted = self
            .calls
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(self.bytes.clone().try_acquire_many_owned(size).ok());
        let Some(admitted) = admitted else {
            tracing::warn!(
                job_id = %call.job_id,
                "Webhook to {} dropped: its {}-byte status does not fit next to the webhooks \
                 already waiting (at most {MAX_PENDING_CALLS} calls and {MAX_PENDING_BYTES} \
                 bytes).",
                shown(&call.url),
                call.body.len()
            );
            return;
        };
        let pending = Pending {
            call,
            _admitted: admitted,
        };
        // The channel holds as many calls as the permits allow, so it is never full.
        let (pending, why) = match self.sender.try_send(pending) {
            Ok(()) => return,
            Err(TrySendError::Closed(pending)) => (pending, "the dev API is shutting down"),
            Err(TrySendError::Full(pending)) => (pending, "too many webhooks are waiting"),
        };
        tracing::warn!(job_id = %pending.call.job_id, "Webhook to {} dropped: {why}.", shown(&pending.call.url));
    }
}

/// Delivers the calls sent to its [`WebhookSender`].
#[derive(Debug)]
pub struct Webhooks {
    receiver: mpsc::Receiver<Pending>,
    retry_after: Duration,
}

/// A webhook sender and the deliverer of what it sends, waiting `retry_after` between attempts.
pub fn channel(retry_after: Duration) -> (WebhookSender, Webhooks) {
    bounded(retry_after, MAX_PENDING_CALLS, MAX_PENDING_BYTES)
}

/// [`channel`] with other bounds (tests).
fn bounded(retry_after: Duration, calls: usize, bytes: usize) -> (WebhookSender, Webhooks) {
    let (sender, receiver) = mpsc::channel(calls);
    let sender = WebhookSender {
        sender,
        calls: Arc::new(Semaphore::new(calls)),
        bytes: Arc::new(Semaphore::new(bytes)),
    };
    (
        sender,
        Webhooks {
            receiver,
            retry_after,
        },
    )
}

impl Webhooks {
    /// Delivers calls until `shutdown` resolves. Then the calls already queued are delivered too
    /// and new ones are refused; deliveries get up to `grace` to finish, and those still under
    /// way then are abandoned (each logged by job id). Returns once every delivery has ended.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let http = reqwest::Client::builder()
            .user_agent(concat!(
                "worker-host/",
                env!("CARGO_PKG_VERSION"),
                " dev API webhook"
            ))
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .expect("the webhook client configuration is static and valid");
        let mut deliverer = Deliverer {
            http,
            retry_after: self.retry_after,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            hosts: HashMap::new(),
            deliveries: TaskTracker::new(),
            abandon: CancellationToken::new(),
        };
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                received = self.receiver.recv() => match received {
                    Some(pending) => deliverer.start(pending),
                    None => break,
                },
            }
        }
        // Whatever was queued before the shutdown still goes out.
        self.receiver.close();
        while let Some(pending) = self.receiver.recv().await {
            deliverer.start(pending);
        }
        deliverer.deliveries.close();
        if tokio::time::timeout(grace, deliverer.deliveries.wait())
            .await
            .is_err()
        {
            deliverer.abandon.cancel();
            deliverer.deliveries.wait().await;
        }
    }

    /// The next queued call, if any (store tests).
    #[cfg(test)]
    pub(crate) fn try_recv(&mut self) -> Option<WebhookCall> {
        self.receiver.try_recv().ok().map(|pending| pending.call)
    }
}

/// What the delivery tasks share.
struct Deliverer {
    http: reqwest::Client,
    retry_after: Duration,
    /// One permit per attempt under way.
    slots: Arc<Semaphore>,
    /// Per receiver, one permit per attempt under way to it. Entries no call uses any more are
    /// dropped when a receiver is added.
    hosts: HashMap<String, Arc<Semaphore>>,
    deliveries: TaskTracker,
    /// Cancelled when the shutdown grace is over: deliveries still under way give up.
    abandon: CancellationToken,
}

impl Deliverer {
    /// Starts delivering one call.
    fn start(&mut self, pending: Pending) {
        let key = receiver_key(&pending.call.url);
        if !self.hosts.contains_key(&key) {
            self.hosts.retain(|_, host| Arc::strong_count(host) > 1);
        }
        let host = self
            .hosts
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_HOST)))
            .clone();
        let http = self.http.clone();
        let slots = self.slots.clone();
        let retry_after = self.retry_after;
        let abandon = self.abandon.clone();
        self.deliveries.spawn(async move {
            let call = &pending.call;
            tokio::select! {
                biased;
                () = abandon.cancelled() => {
                    tracing::warn!(job_id = %call.job_id, "Webhook to {} abandoned: the dev API shut down before it was delivered.", shown(&call.url));
                }
                () = deliver(&http, call, retry_after, &host, &slots) => {}
            }
            drop(pending);
        });
    }
}

/// Which receiver a URL names, for the per-receiver limit: scheme, host and port.
fn receiver_key(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(parsed) => format!(
            "{}://{}:{}",
            parsed.scheme(),
            parsed.host_str().unwrap_or_default(),
            parsed.port_or_known_default().unwrap_or_default()
        ),
        Err(_) => url.to_owned(),
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

/// Makes the attempts, each holding a slot of its receiver and one of all; the wait between
/// attempts holds neither.
async fn deliver(
    http: &reqwest::Client,
    call: &WebhookCall,
    retry_after: Duration,
    host: &Semaphore,
    slots: &Semaphore,
) {
    for attempt in 1..=ATTEMPTS {
        let outcome = {
            // Neither semaphore is ever closed.
            let (Ok(_host), Ok(_slot)) = (host.acquire().await, slots.acquire().await) else {
                return;
            };
            http.post(&call.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(call.body.clone())
                .send()
                .await
        };
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

    fn call(job_id: &str, body: String) -> WebhookCall {
        WebhookCall {
            url: "http://127.0.0.1:9/hook".into(),
            job_id: job_id.into(),
            body,
        }
    }

    /// Logged webhook URLs keep the host and path, never the query or credentials.
    #[test]
    fn logged_urls_hide_secrets() {
        assert_eq!(
            shown("https://user:pw@hooks.example/job?token=s3cret"),
            "https://hooks.example/job"
        );
        assert_eq!(shown("not a url"), "(an unparsable URL)");
    }

    /// Receivers are told apart by scheme, host and port, whatever the path or query.
    #[test]
    fn receivers_are_scheme_host_and_port() {
        assert_eq!(
            receiver_key("http://h.example/a?x=1"),
            receiver_key("http://h.example:80/b")
        );
        assert_ne!(
            receiver_key("http://h.example/a"),
            receiver_key("https://h.example/a")
        );
        assert_ne!(
            receiver_key("http://127.0.0.1:1/a"),
            receiver_key("http://127.0.0.1:2/a")
        );
    }

    /// Calls past either bound are dropped, and admitted again once earlier ones are done.
    #[test]
    fn pending_calls_are_bounded() {
        let (sender, mut webhooks) = bounded(Duration::ZERO, 3, 100);
        sender.send(call("a", "x".repeat(50)));
        sender.send(call("b", "x".repeat(50)));
        sender.send(call("c", "{}".into()));
        let next = |webhooks: &mut Webhooks| webhooks.try_recv().map(|call| call.job_id);
        assert_eq!(next(&mut webhooks).as_deref(), Some("a"));
        assert_eq!(next(&mut webhooks).as_deref(), Some("b"));
        assert_eq!(next(&mut webhooks), None, "c is over the byte bound");
        // Taking `a` and `b` out of their `Pending` released their permits.
        for job in ["d", "e", "f", "g"] {
            sender.send(call(job, "{}".into()));
        }
        let held: Vec<Pending> = (0..3)
            .map(|_| webhooks.receiver.try_recv().expect("queued"))
            .collect();
        let ids: Vec<&str> = held.iter().map(|p| p.call.job_id.as_str()).collect();
        assert_eq!(ids, ["d", "e", "f"]);
        assert_eq!(next(&mut webhooks), None, "g is over the count bound");
    }

    /// At shutdown the calls still queued are delivered, then `run` returns.
    #[tokio::test]
    async fn queued_calls_are_delivered_at_shutdown() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let received = Arc::new(tokio::sync::Mutex::new(Vec::<String>::new()));
        let recorded = received.clone();
        let app = axum::Router::new().fallback(move |body: String| {
            let recorded = recorded.clone();
            async move { recorded.lock().await.push(body) }
        });
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let (sender, webhooks) = channel(Duration::ZERO);
        for n in 0..3 {
            sender.send(WebhookCall {
                url: url.clone(),
                job_id: n.to_string(),
                body: n.to_string(),
            });
        }
        // Shut down before the deliverer has even looked at the queue.
        tokio::time::timeout(
            Duration::from_secs(30),
            webhooks.run(std::future::ready(()), Duration::from_secs(20)),
        )
        .await
        .expect("run returns once the queue is delivered");
        let mut bodies = received.lock().await.clone();
        bodies.sort();
        assert_eq!(bodies, ["0", "1", "2"]);
        sender.send(call("late", "{}".into()));
        server.abort();
    }
}
