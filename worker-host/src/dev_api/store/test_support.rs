//! What the store's unit tests share: a store, jobs, and jobs brought to a given state.

use super::*;
use crate::dev_api::webhook;
use crate::job::OrderedRawMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn store(limits: StoreLimits) -> (Store, webhook::Webhooks) {
    let (sender, receiver) = webhook::channel(Duration::ZERO);
    (Store::new(limits, "wk".into(), sender), receiver)
}

pub(super) fn request(text: &str) -> OrderedRawMap {
    OrderedRawMap::parse(text).expect("test requests are objects")
}

pub(super) fn job(submission: Submission) -> NewJob {
    NewJob {
        request: request(r#"{"input": {"n": 1}}"#),
        submission,
        webhook: None,
        execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
        ttl: DEFAULT_TTL,
    }
}

/// Submits a /run job and hands it to the worker; returns its id.
pub(super) fn started(store: &Store) -> String {
    let id = store.submit(job(Submission::Async));
    assert_eq!(store.take(1).len(), 1);
    id
}

/// Submits a job with a 5 s execution timeout, hands it out and lets it time out.
pub(super) fn timed_out(store: &Store) -> String {
    let mut new = job(Submission::Async);
    new.execution_timeout = Duration::from_secs(5);
    let id = store.submit(new);
    assert_eq!(store.take(1).len(), 1);
    store.sweep(Instant::now() + Duration::from_secs(6));
    id
}

/// Takes one job and finishes it with `body`.
pub(super) fn run(store: &Store, id: &str, body: &str) {
    let taken = store.take(1);
    assert_eq!(taken.len(), 1, "nothing to take for {id}");
    assert!(taken[0].contains(id));
    store.add_result(id, request(body), false);
}

pub(super) fn status_of(store: &Store, id: &str) -> serde_json::Value {
    let text = store
        .status(id)
        .unwrap_or_else(|| panic!("{id} is unknown"));
    serde_json::from_str(&text).expect("status objects are JSON")
}

/// A store with one /runsync job, and a task waiting (up to 5 minutes) for its end.
pub(super) fn runsync_waiting() -> (Arc<Store>, String, tokio::task::JoinHandle<Option<String>>) {
    let store = Arc::new(store(StoreLimits::default()).0);
    let id = store.submit(job(Submission::Sync));
    let waiting = {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.wait_final(&id, Duration::from_secs(300)).await })
    };
    (store, id, waiting)
}

pub(super) fn live_jobs(store: &Store) -> (usize, usize, usize) {
    let state = store.state();
    (
        state.jobs.len(),
        state.deadlines.len(),
        state.finished.len(),
    )
}
