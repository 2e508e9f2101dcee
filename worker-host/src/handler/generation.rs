//! One generation of the handler: a build of it, loaded from the host's private copy, with the
//! facts its descriptor declared (and, once [`Generation::init`] ran, those its `init` reported)
//! and the jobs bound to it.
//!
//! A live swap ([`super::swap`]) makes a new generation from the file the user names and moves
//! new jobs to it; the old one keeps running the jobs it started and is shut down once the last
//! of them has returned. A job is bound to a generation by a [`Lease`], taken when its handler
//! call is about to start and dropped when that call has returned, so a generation knows when it
//! is idle ([`Generation::wait_idle`]).

use super::private_copy::{CopyError, PrivateCopies, PrivateCopy};
use super::{Handler, HandlerInfo, HandlerSpec, Isolation, LoadError};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

/// A loaded build of the handler.
#[derive(Debug)]
pub struct Generation {
    number: u64,
    info: HandlerInfo,
    handler: Arc<dyn Handler>,
    /// The file the handler was loaded from: a runner that restarts loads it again. Dropped
    /// (and the file deleted) with the generation, after its handler is shut down.
    copy: Arc<PrivateCopy>,
    /// How many jobs are bound to it.
    leases: Mutex<usize>,
    idle: Condvar,
    /// One permit per job that may run on it at once, when its descriptor sets a
    /// `max_concurrency` (the worker's own slots follow the build serving only as running jobs
    /// free them, so jobs taken before a swap would otherwise exceed the new build's limit).
    slots: Option<Arc<tokio::sync::Semaphore>>,
    /// The facts and slots once `init` succeeded: `init` may report the streaming flag and
    /// concurrency it learnt (ABI 1.1 `set_features`), and those are what jobs run with.
    ready: OnceLock<(HandlerInfo, Option<Arc<tokio::sync::Semaphore>>)>,
}

/// One permit per job that may run at once, for a handler that sets a limit.
fn slots_for(info: &HandlerInfo) -> Option<Arc<tokio::sync::Semaphore>> {
    (info.max_concurrency > 0)
        .then(|| Arc::new(tokio::sync::Semaphore::new(info.max_concurrency as usize)))
}

impl Generation {
    /// Copies the handler at `spec.path` into `copies` and loads the copy the way
    /// `spec.isolation` says, without running `init`. Errors name the file the user gave.
    pub fn load(
        spec: &HandlerSpec,
        copies: &PrivateCopies,
        number: u64,
    ) -> Result<Arc<Self>, LoadError> {
        Self::start(spec, Source::copy(spec, copies)?, number)
    }

    /// Loads a handler from its private copy, without running `init`.
    pub(super) fn start(
        spec: &HandlerSpec,
        source: Source,
        number: u64,
    ) -> Result<Arc<Self>, LoadError> {
        let Source { original, copy } = source;
        let from_copy = HandlerSpec {
            path: copy.path().to_path_buf(),
            // Read from the copy (what is loaded), not the path (which may hold another build
            // by now), and expanded against where the user's file is.
            library_dirs: original
                .parent()
                .map(|origin| super::origin::library_dirs(copy.path(), origin))
                .unwrap_or_default(),
            ..spec.clone()
        };
        let loaded: Result<Arc<dyn Handler>, LoadError> = match spec.isolation {
            Isolation::None => {
                super::inproc::InProcess::load(&from_copy).map(|handler| Arc::new(handler) as _)
            }
            Isolation::Runner => {
                super::runner::Supervised::start(&from_copy).map(|handler| Arc::new(handler) as _)
            }
        };
        let handler = loaded.map_err(|error| error.about(&original))?;
        let info = HandlerInfo {
            path: original,
            sha256: copy.sha256().to_owned(),
            ..handler.info().clone()
        };
        let slots = slots_for(&info);
        Ok(Arc::new(Self {
            number,
            info,
            handler,
            copy,
            leases: Mutex::new(0),
            idle: Condvar::new(),
            slots,
            ready: OnceLock::new(),
        }))
    }

    /// Runs the handler's `init` with its configuration (JSON text); from then on [`Self::info`]
    /// and [`Self::slot`] follow the features `init` reported, if it reported any. Call once,
    /// before any job; on failure, shut the handler down.
    pub fn init(&self, config_json: &str) -> Result<(), LoadError> {
        self.handler.init(config_json).inspect_err(|error| {
            // The sentence the host exits with stays one line; the traceback goes to the log.
            if let LoadError::InitFailed { failure } = error {
                if !failure.traceback.is_empty() {
                    tracing::error!(
                        "The handler's init failed; its traceback:\n{}",
                        failure.traceback
                    );
                }
            }
        })?;
        let info = HandlerInfo {
            path: self.info.path.clone(),
            sha256: self.info.sha256.clone(),
            ..self.handler.info().clone()
        };
        if (info.streaming, info.max_concurrency)
            != (self.info.streaming, self.info.max_concurrency)
        {
            tracing::info!(
                streaming = info.streaming,
                max_concurrency = info.max_concurrency,
                "the handler reported its features after init"
            );
        }
        let slots = slots_for(&info);
        let _ = self.ready.set((info, slots));
        Ok(())
    }

    /// Where it was loaded from, to load the same build again.
    pub(super) fn source(&self) -> Source {
        Source {
            original: self.info.path.clone(),
            copy: self.copy.clone(),
        }
    }

    /// 1 for the handler the host started with, one more for each swap.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// What its descriptor says (with the features its `init` reported, once it ran), where the
    /// user's file is, and the hash of what was loaded.
    pub fn info(&self) -> &HandlerInfo {
        self.ready.get().map_or(&self.info, |(info, _)| info)
    }

    /// `name version (sha256 1a2b3c4d5e6f, generation 2)`: which build this is, for the log.
    pub fn label(&self) -> String {
        let sha256 = &self.info.sha256;
        format!(
            "{} {} (sha256 {}, generation {})",
            self.info.name,
            self.info.version,
            &sha256[..sha256.len().min(12)],
            self.number
        )
    }

    /// The handler itself.
    pub fn handler(&self) -> &Arc<dyn Handler> {
        &self.handler
    }

    /// Waits until one more job may run on it (its `max_concurrency`); `None` when it sets no
    /// limit. Hold the permit while the job's handler call runs.
    pub async fn slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slots = match self.ready.get() {
            Some((_, slots)) => slots.clone(),
            None => self.slots.clone(),
        }?;
        Some(
            slots
                .acquire_owned()
                .await
                .expect("the semaphore is never closed"),
        )
    }

    /// Binds a job to this generation until the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        *self.count() += 1;
        Lease(self.clone())
    }

    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        self.leases.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks until no job is bound to it. Once no new lease can be taken (it is no longer
    /// the one serving), it stays idle.
    pub fn wait_idle(&self) {
        let mut count = self.count();
        while *count > 0 {
            count = self
                .idle
                .wait(count)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A handler file the user named, and the private copy of it that is loaded.
#[derive(Debug, Clone)]
pub(super) struct Source {
    /// The file the user named (absolute).
    pub(super) original: PathBuf,
    /// The copy.
    pub(super) copy: Arc<PrivateCopy>,
}

impl Source {
    /// Copies the handler at `spec.path` into `copies`, after the checks whose messages name
    /// the user's path.
    pub(super) fn copy(spec: &HandlerSpec, copies: &PrivateCopies) -> Result<Self, LoadError> {
        // dlopen searches the library path for a name without a slash; an operator's path is
        // always a file, so it is made absolute (messages name it so too).
        let original = std::path::absolute(&spec.path).unwrap_or_else(|_| spec.path.clone());
        super::error::check_path(&original)?;
        let copy = copies.copy(&original).map_err(|error| match error {
            CopyError::Read { source, .. } => LoadError::Unreadable {
                path: original.clone(),
                reason: source.to_string(),
            },
            other @ (CopyError::Write { .. } | CopyError::NoExec { .. }) => {
                LoadError::PrivateCopy {
                    reason: other.to_string(),
                }
            }
        })?;
        Ok(Self { original, copy })
    }
}

/// A job's hold on the generation that runs it.
#[derive(Debug)]
pub struct Lease(Arc<Generation>);

impl Lease {
    /// Whether this is a lease on `generation`.
    pub fn is_on(&self, generation: &Arc<Generation>) -> bool {
        Arc::ptr_eq(&self.0, generation)
    }
}

impl std::ops::Deref for Lease {
    type Target = Generation;

    fn deref(&self) -> &Generation {
        &self.0
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut count = self.0.count();
        *count -= 1;
        if *count == 0 {
            self.0.idle.notify_all();
        }
    }
}
