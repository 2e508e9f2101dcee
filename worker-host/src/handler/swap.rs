//! The handler serving now, and live swaps to a new build of it without a restart.
//!
//! [`LiveHandler`] holds the generation ([`Generation`]) that new jobs go to. A swap (SIGHUP, or
//! the file watcher of `--watch`) reads the handler path again; if its content changed, a new
//! generation is loaded from a fresh private copy, and then, by [`SwapPolicy`]:
//!
//! - `overlap` (the default, no gap): the new generation runs `init` while the old one serves;
//!   once it is ready, new jobs go to it; the old one's running jobs finish on it, then it tears
//!   down and its runner exits. If the new build fails to load or to init, nothing changes.
//! - `drain-first` (for a GPU that cannot hold two models): the new build is loaded (so a file
//!   that is not a handler is refused before anything stops), then no job starts while the old
//!   generation finishes its running jobs and exits; then the new one runs `init`. If that
//!   fails, the old build is started again from its private copy (and only if that fails too
//!   does the worker report that it cannot serve).
//!
//! Only one swap runs at a time, on its own thread; a request that comes during a swap makes the
//! file be read again once the swap is over (the last build written wins). With
//! `--isolation none` a swap is refused: a library cannot be unloaded safely from the host's own
//! process.
//!
//! What the worker sees is [`Current`], through a watch channel: which generation serves, or that
//! none does for now (a drain-first swap), or that none can any more.

use super::generation::{Generation, Lease, Source};
use super::private_copy::PrivateCopies;
use super::{HandlerSpec, Isolation, LoadError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How a swap treats the handler that serves while the new one starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SwapPolicy {
    /// The new handler runs `init` while the old one serves; no gap (two models in memory for
    /// the length of an `init`).
    #[default]
    Overlap,
    /// The old handler finishes its jobs and exits before the new one runs `init` (one model in
    /// memory at a time; no job starts in between).
    DrainFirst,
}

/// Which generation new jobs go to.
#[derive(Debug, Clone)]
pub enum Current {
    /// This one.
    Serving(Arc<Generation>),
    /// None for now: a drain-first swap is under way. Jobs wait.
    Swapping,
    /// None can serve again; the sentence says why.
    Failed(String),
}

/// How long [`LiveHandler::shutdown`] waits for retired generations still finishing.
const RETIRED_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

/// The handler serving now, and its swaps.
#[derive(Debug)]
pub struct LiveHandler {
    spec: HandlerSpec,
    config: String,
    policy: SwapPolicy,
    copies: Arc<PrivateCopies>,
    current: tokio::sync::watch::Sender<Current>,
    swaps: Mutex<Swaps>,
}

/// The state of swapping.
#[derive(Debug, Default)]
struct Swaps {
    /// A swap thread is running.
    running: bool,
    /// A request came while it ran: read the file again after it.
    again: bool,
    /// The host is shutting down: no more swaps.
    closed: bool,
    /// Threads that wait for a retired generation's jobs, then shut it down.
    retiring: Vec<std::thread::JoinHandle<()>>,
}

impl LiveHandler {
    /// Serves `first` (loaded and initialised), and swaps as `policy` says; `config` is the
    /// handler configuration every new generation's `init` gets.
    pub fn new(
        first: Arc<Generation>,
        spec: HandlerSpec,
        config: String,
        policy: SwapPolicy,
        copies: Arc<PrivateCopies>,
    ) -> Arc<Self> {
        tracing::info!(
            "Serving {} from {}.",
            first.label(),
            first.info().path.display()
        );
        Arc::new(Self {
            spec,
            config,
            policy,
            copies,
            current: tokio::sync::watch::Sender::new(Current::Serving(first)),
            swaps: Mutex::new(Swaps::default()),
        })
    }

    fn swaps(&self) -> std::sync::MutexGuard<'_, Swaps> {
        self.swaps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Which generation serves, and its changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Current> {
        self.current.subscribe()
    }

    /// The generation serving now, if one does.
    pub fn serving(&self) -> Option<Arc<Generation>> {
        match &*self.current.borrow() {
            Current::Serving(generation) => Some(generation.clone()),
            Current::Swapping | Current::Failed(_) => None,
        }
    }

    /// Binds a job to the generation serving now. Atomic with a swap: a lease is on the new
    /// generation, or taken before the old one started waiting for its jobs.
    pub fn lease(&self) -> Option<Lease> {
        match &*self.current.borrow() {
            Current::Serving(generation) => Some(generation.lease()),
            Current::Swapping | Current::Failed(_) => None,
        }
    }

    /// Binds a job to the generation serving, waiting while none does (a drain-first swap); the
    /// error says why none ever will.
    pub async fn next_lease(&self) -> Result<Lease, String> {
        let mut current = self.subscribe();
        loop {
            let state = current.borrow_and_update().clone();
            match state {
                // Leased atomically with a swap (what was just seen may be gone already: then
                // the watch has changed again).
                Current::Serving(_) => match self.lease() {
                    Some(lease) => return Ok(lease),
                    None => continue,
                },
                Current::Failed(reason) => return Err(reason),
                Current::Swapping => {}
            }
            if current.changed().await.is_err() {
                return Err("the worker is shutting down".into());
            }
        }
    }

    /// Whether the host is shutting down (no more swaps).
    pub fn is_closed(&self) -> bool {
        self.swaps().closed
    }

    /// Asks for a swap (`why` is for the log): reads the handler path again on a swap thread,
    /// now or after the swap under way.
    pub fn request_swap(self: &Arc<Self>, why: &str) {
        if self.spec.isolation == Isolation::None {
            tracing::warn!(
                "Handler swap refused ({why}): with --isolation none the handler is loaded into the host's own process, and a library cannot be unloaded from it safely; restart the worker, or run with the default isolation."
            );
            return;
        }
        let mut swaps = self.swaps();
        if swaps.closed {
            return;
        }
        if swaps.running {
            tracing::info!(
                "Handler swap requested ({why}) while one is under way: the handler file is read again when it is done."
            );
            swaps.again = true;
            return;
        }
        swaps.running = true;
        drop(swaps);
        tracing::info!(
            "Handler swap requested ({why}): reading {}.",
            self.spec.path.display()
        );
        let live = self.clone();
        let spawned = std::thread::Builder::new()
            .name("handler-swap".into())
            .spawn(move || live.swap_until_settled());
        if let Err(error) = spawned {
            tracing::error!("Handler swap failed: its thread could not start ({error}).");
            self.swaps().running = false;
        }
    }

    /// Swaps, then again for as long as requests came meanwhile.
    fn swap_until_settled(self: Arc<Self>) {
        loop {
            self.swap_once();
            let mut swaps = self.swaps();
            if swaps.again && !swaps.closed {
                swaps.again = false;
                continue;
            }
            swaps.running = false;
            return;
        }
    }

    /// One swap, as the module docs describe.
    fn swap_once(&self) {
        let Some(old) = self.serving() else {
            return;
        };
        let started = Instant::now();
        let unchanged = |sha256: &str| {
            let same = sha256 == old.info().sha256;
            if same {
                tracing::info!(
                    "Handler swap: {} is unchanged ({}); nothing to do.",
                    self.spec.path.display(),
                    old.label()
                );
            }
            same
        };
        // Hashed before it is copied: an unchanged file costs a read, not a copy.
        if super::private_copy::sha256_of(&self.spec.path).is_ok_and(|sha256| unchanged(&sha256)) {
            return;
        }
        let source = match Source::copy(&self.spec, &self.copies) {
            Ok(source) => source,
            Err(error) => return swap_failed(&error, &old),
        };
        // The file may have been rewritten between the hash and the copy.
        if unchanged(source.copy.sha256()) {
            return;
        }
        // Numbers count the builds that served (the one serving is the last installed): a failed
        // swap uses none.
        let number = old.number() + 1;
        let new = match Generation::start(&self.spec, source, number) {
            Ok(new) => new,
            Err(error) => return swap_failed(&error, &old),
        };
        tracing::info!("Handler swap: {} loaded; running its init.", new.label());
        match self.policy {
            SwapPolicy::Overlap => {
                if let Err(error) = new.init(&self.config) {
                    new.handler().shutdown();
                    return swap_failed(&error, &old);
                }
                if !self.install(new.clone(), started, Some(old)) {
                    new.handler().shutdown();
                }
            }
            SwapPolicy::DrainFirst => {
                self.current.send_replace(Current::Swapping);
                tracing::info!(
                    "Handler swap (drain-first): no job starts until {} has finished its running jobs and exited.",
                    old.label()
                );
                old.handler().retire();
                old.wait_idle();
                old.handler().shutdown();
                tracing::info!(
                    "{} has finished its jobs and stopped; running the new handler's init.",
                    old.label()
                );
                if let Err(error) = new.init(&self.config) {
                    new.handler().shutdown();
                    tracing::error!(
                        "Handler swap failed: {error}; starting {} again.",
                        old.label()
                    );
                    return self.restore(&old, started);
                }
                if !self.install(new.clone(), started, None) {
                    new.handler().shutdown();
                }
            }
        }
    }

    /// Makes `new` the generation serving, and retires `replacing` (unless the host is shutting
    /// down meanwhile: then nothing changes).
    fn install(
        &self,
        new: Arc<Generation>,
        started: Instant,
        replacing: Option<Arc<Generation>>,
    ) -> bool {
        // Under the lock, so a shutdown sees either the old handler or the new one, never
        // shuts down the old one while the new one goes in.
        let mut swaps = self.swaps();
        if swaps.closed {
            return false;
        }
        tracing::info!(
            "Now serving {}, {:.1} s after the swap began.",
            new.label(),
            started.elapsed().as_secs_f64()
        );
        self.current.send_replace(Current::Serving(new));
        if let Some(old) = replacing {
            retire(old, &mut swaps);
        }
        true
    }

    /// After a failed drain-first swap: the old build again, from its private copy.
    fn restore(&self, old: &Generation, started: Instant) {
        let again = Generation::start(&self.spec, old.source(), old.number()).and_then(|again| {
            again
                .init(&self.config)
                .map(|()| again.clone())
                .inspect_err(|_| {
                    again.handler().shutdown();
                })
        });
        match again {
            Ok(again) => {
                if !self.install(again.clone(), started, None) {
                    again.handler().shutdown();
                }
            }
            Err(error) => {
                let reason = format!(
                    "the new handler's init failed in a drain-first swap, and {} could not be started again: {error}",
                    old.label()
                );
                tracing::error!("{reason}.");
                self.current.send_replace(Current::Failed(reason));
            }
        }
    }

    /// Ends swapping and the handler, after the worker's last job: shuts down the generation
    /// serving, and waits (bounded) for replaced ones still finishing. A swap under way is
    /// abandoned (its runner ends with the host).
    pub fn shutdown(&self) {
        let serving = {
            let mut swaps = self.swaps();
            swaps.closed = true;
            self.serving()
        };
        if let Some(current) = serving {
            current.handler().shutdown();
        }
        // Taken after: a swap that went in just before the close retires its old handler now.
        let retiring = std::mem::take(&mut self.swaps().retiring);
        let deadline = Instant::now() + RETIRED_SHUTDOWN_WAIT;
        for thread in retiring {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

/// Logs why a swap failed; `old` keeps serving.
fn swap_failed(error: &LoadError, old: &Generation) {
    tracing::error!(
        "Handler swap failed: {error}; {} keeps serving.",
        old.label()
    );
}

/// Lets `old` finish its jobs on a thread of its own, then shuts it down; the thread is kept in
/// `swaps` for [`LiveHandler::shutdown`] to wait for.
fn retire(old: Arc<Generation>, swaps: &mut Swaps) {
    old.handler().retire();
    let label = old.label();
    let retiring = std::thread::Builder::new()
        .name(format!("handler-{}-retiring", old.number()))
        .spawn(move || {
            old.wait_idle();
            old.handler().shutdown();
            tracing::info!("{label} has finished its jobs and stopped.");
        });
    match retiring {
        Ok(thread) => {
            swaps.retiring.retain(|thread| !thread.is_finished());
            swaps.retiring.push(thread);
        }
        Err(error) => tracing::warn!(
            "The replaced handler cannot be stopped in order ({error}); its runner ends with the host."
        ),
    }
}
