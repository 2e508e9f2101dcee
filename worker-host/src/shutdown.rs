//! The serving modes' one shutdown trigger, SIGTERM or SIGINT (Ctrl-C), listened for from before
//! the handler's `init`. One that comes during `init` stops the worker without serving, exit 0:
//! a runner's `init` is ended at once (its runner is stopped); one in the host's own process
//! cannot be interrupted, so the host stops when it returns. Without this the signal's default
//! action would end the host in the middle of a model load (exit 143, the private copies left
//! behind), and as PID 1 in a container the kernel would ignore it, leaving the platform to kill
//! the worker after its grace. After `init` the same signal is the mode's drain-and-stop. A
//! second signal, at any time after the first, ends the host at once (exit 143 for SIGTERM, 130
//! for SIGINT: Ctrl-C twice in a terminal), for an `init` in process that does not return or a
//! drain one does not want to wait for. The listening starts once the handler is loaded, just
//! before `init`; a signal during the load itself still has its default action.
//! (SIGHUP swaps the handler, see `Serving::go_live`.)

use crate::handler::Handler;
use std::sync::{Arc, Mutex, PoisonError};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// Where the first `init` stands, as the signal sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    Running,
    /// A shutdown was asked for while `init` ran: the worker stops when it returns.
    StoppedDuringInit,
    Done,
}

/// The shutdown signal of a serving mode.
pub(crate) struct Shutdown {
    requested: CancellationToken,
    init: Arc<Mutex<InitState>>,
}

impl Shutdown {
    /// Listens for the signal from now on, on `runtime`. If it comes while `init` runs and
    /// `init_can_be_stopped` (a runner's), `handler` is shut down, which ends its `init`.
    pub(crate) fn listen(
        runtime: &tokio::runtime::Runtime,
        handler: Arc<dyn Handler>,
        init_can_be_stopped: bool,
    ) -> Self {
        let requested = CancellationToken::new();
        let init = Arc::new(Mutex::new(InitState::Running));
        let (trigger, state) = (requested.clone(), init.clone());
        let (listening, listens) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let signal = signal();
            tokio::pin!(signal);
            // Registered once polled: until then the default action would still apply.
            let came = futures_util::FutureExt::now_or_never(signal.as_mut());
            let _ = listening.send(());
            if came.is_none() {
                signal.await;
            }
            // From now on a second signal ends the host at once, whatever the first started.
            tokio::spawn(async {
                let code = self::signal().await;
                tracing::warn!("A second shutdown signal: the worker exits at once.");
                std::process::exit(code);
            });
            let during_init = {
                let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                let running = *state == InitState::Running;
                if running {
                    *state = InitState::StoppedDuringInit;
                }
                running
            };
            trigger.cancel();
            if !during_init {
                return;
            }
            if init_can_be_stopped {
                tracing::warn!("Shutdown asked for during init: stopping the handler's runner; the worker stops without serving.");
                let _ = tokio::task::spawn_blocking(move || handler.shutdown()).await;
            } else {
                tracing::warn!("Shutdown asked for during init: a handler in the host's own process cannot be interrupted, so the worker stops when its init returns.");
            }
        });
        let _ = listens.recv();
        Self { requested, init }
    }

    /// Marks the end of the first `init`: true when a shutdown was asked for meanwhile, and
    /// the worker stops now without serving (exit 0).
    pub(crate) fn init_ended(&self) -> bool {
        let mut state = self.init.lock().unwrap_or_else(PoisonError::into_inner);
        if *state == InitState::StoppedDuringInit {
            return true;
        }
        *state = InitState::Done;
        false
    }

    /// Resolves once a shutdown is asked for: the serving mode's trigger to drain and stop.
    pub(crate) fn requested(&self) -> WaitForCancellationFutureOwned {
        self.requested.clone().cancelled_owned()
    }
}

/// Resolves on the next SIGTERM or SIGINT, with the exit code a shell gives a process that
/// signal ends (143, 130). Both are registered at the first poll.
async fn signal() -> i32 {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!("cannot listen for SIGTERM: {error}");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => 128 + 15,
        _ = tokio::signal::ctrl_c() => 128 + 2,
    }
}
