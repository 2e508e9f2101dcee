//! A server that listens before the handler's `init` has run: [`StartupGate`] answers
//! `GET /ping` with 204 (initialising, as RunPod's health contract says) and `/metrics` at once,
//! and holds every other request until the real router is ready, then hands it over, so a request
//! sent during a slow model load is answered when the model is in, not refused.
//!
//! Once [`StartupGate::open`] has given it the real router, every request goes there (which
//! answers `/ping` with 200 itself). If the gate is dropped without being opened (`init` failed),
//! held requests get a 503 that says so.

use super::{check_key, error_answer};
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::watch;
use tower::ServiceExt;

/// Which of the host's own routes a path is, as the gate answers them during `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnRoute {
    /// The health check: 204 during `init`.
    Ping,
    /// The metrics.
    Metrics,
}

/// Where the router is: not yet, ready, or never.
#[derive(Clone)]
enum Stage {
    Starting,
    Open(Router),
    Failed,
}

/// Opens the gate's router once the real one is ready.
#[derive(Debug)]
pub struct StartupGate {
    stage: watch::Sender<Stage>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Starting => "Starting",
            Self::Open(_) => "Open",
            Self::Failed => "Failed",
        })
    }
}

impl StartupGate {
    /// A closed gate, and the router to serve meanwhile. The paths `own_route` names answer at
    /// once: the health check 204 until the gate opens, the metrics (with `api_key` when one is
    /// set); every other request waits.
    pub fn new(own_route: fn(&str) -> Option<OwnRoute>, api_key: Option<String>) -> (Self, Router) {
        let (stage, watched) = watch::channel(Stage::Starting);
        let router = Router::new().fallback(move |request: Request| {
            let mut watched = watched.clone();
            let api_key = api_key.clone();
            async move {
                let now = watched.borrow_and_update().clone();
                match now {
                    Stage::Open(router) => return forward(router, request).await,
                    Stage::Failed => return failed(),
                    Stage::Starting => {}
                }
                let route = own_route(request.uri().path());
                if route == Some(OwnRoute::Ping) {
                    return StatusCode::NO_CONTENT.into_response();
                }
                if route == Some(OwnRoute::Metrics) {
                    if let Some(refused) = api_key
                        .as_deref()
                        .and_then(|key| check_key(request.headers(), key))
                    {
                        return refused;
                    }
                    return crate::metrics::answer();
                }
                let ready = watched
                    .wait_for(|stage| !matches!(stage, Stage::Starting))
                    .await
                    .map(|stage| stage.clone());
                match ready {
                    Ok(Stage::Open(router)) => forward(router, request).await,
                    _ => failed(),
                }
            }
        });
        (Self { stage }, router)
    }

    /// From now on every request goes to `router`, the held ones first.
    pub fn open(&self, router: Router) {
        self.stage.send_replace(Stage::Open(router));
    }
}

impl Drop for StartupGate {
    fn drop(&mut self) {
        self.stage.send_if_modified(|stage| {
            let starting = matches!(stage, Stage::Starting);
            if starting {
                *stage = Stage::Failed;
            }
            starting
        });
    }
}

async fn forward(router: Router, request: Request) -> Response {
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

fn failed() -> Response {
    error_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        "the handler's init failed: this worker cannot serve",
    )
}
