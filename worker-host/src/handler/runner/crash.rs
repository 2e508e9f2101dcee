//! Saying why a runner ended, in words a user can act on: the signal by name and number and what
//! it usually means, an exit status, whether the kernel's out-of-memory killer fired (from the
//! cgroup's `memory.events`), or the host's own reason when it killed the runner.

use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use std::path::PathBuf;

/// How a runner process ended, as `waitpid` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunnerEnd {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl RunnerEnd {
    /// The end a `waitpid` status describes; `None` for a stop or a continue.
    pub(crate) fn of(status: WaitStatus) -> Option<Self> {
        match status {
            WaitStatus::Exited(_, code) => Some(Self::Exited(code)),
            WaitStatus::Signaled(_, signal, _) => Some(Self::Signaled(signal as i32)),
            _ => None,
        }
    }
}

/// Why the host itself killed a runner.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum KillReason {
    /// A cancelled job's handler did not return within the cancel grace.
    HardStop {
        /// The job.
        job_id: String,
        /// The grace, in seconds.
        grace_secs: f64,
    },
    /// Every slot was held by a job whose client went away and whose handler ignored the
    /// cancel for the cancel grace; this was one of them.
    Abandoned {
        /// The job.
        job_id: String,
    },
    /// The runner broke the channel protocol.
    Protocol(String),
    /// The host is shutting down and the runner did not exit in time.
    Shutdown,
    /// The host was asked to shut down while `init` ran.
    ShutdownDuringInit,
    /// `init` ran past `--init-timeout-secs`.
    InitTimeout,
}

/// Describes a runner's end, e.g. "was killed by SIGSEGV (signal 11: segmentation fault, an
/// invalid memory access)". `oom_killed` is whether the cgroup's OOM-kill count went up while it
/// ran (`None` where it cannot be read).
pub(crate) fn describe(end: RunnerEnd, oom_killed: Option<bool>) -> String {
    match end {
        RunnerEnd::Exited(code) => format!(
            "exited with status {code} (the handler ended its process, e.g. with exit({code}))"
        ),
        RunnerEnd::Signaled(number) => {
            let name = Signal::try_from(number)
                .map(|signal| signal.as_str().to_owned())
                .unwrap_or_else(|_| format!("signal {number}"));
            let meaning = match Signal::try_from(number) {
                Ok(Signal::SIGSEGV) => ": segmentation fault, an invalid memory access",
                Ok(Signal::SIGABRT) => {
                    ": abort, from abort(), a failed assertion or an uncaught C++ exception"
                }
                Ok(Signal::SIGBUS) => {
                    ": bus error, a bad memory access (e.g. to a truncated mapped file)"
                }
                Ok(Signal::SIGILL) => ": illegal instruction (code built for another CPU?)",
                Ok(Signal::SIGFPE) => ": arithmetic error, e.g. an integer division by zero",
                Ok(Signal::SIGKILL) => {
                    return match oom_killed {
                        Some(true) => format!(
                            "was killed by SIGKILL (signal {number}) because it ran out of memory (the kernel's OOM killer ended it)"
                        ),
                        Some(false) => format!(
                            "was killed by SIGKILL (signal {number}) from outside the worker (the out-of-memory killer did not fire)"
                        ),
                        None => format!(
                            "was killed by SIGKILL (signal {number}; probably out of memory, or killed from outside)"
                        ),
                    };
                }
                _ => "",
            };
            format!("was killed by {name} (signal {number}{meaning})")
        }
    }
}

/// Describes a kill the host chose.
pub(crate) fn describe_kill(reason: &KillReason) -> String {
    match reason {
        KillReason::HardStop { job_id, grace_secs } => format!(
            "was killed by the host because job {job_id} was stopped and its handler did not return within {grace_secs} s (--cancel-grace-secs)"
        ),
        KillReason::Abandoned { job_id } => format!(
            "was killed by the host because every slot was held by a job whose client went away and whose handler ignored the cancel past --cancel-grace-secs (job {job_id} among them)"
        ),
        KillReason::Protocol(problem) => {
            format!("was killed by the host because it broke the runner protocol ({problem})")
        }
        KillReason::Shutdown => {
            "was killed by the host because it did not exit in time at shutdown".to_owned()
        }
        KillReason::ShutdownDuringInit => {
            "was stopped by the host because the worker was shut down during init".to_owned()
        }
        KillReason::InitTimeout => {
            "was killed by the host because its init ran past --init-timeout-secs".to_owned()
        }
    }
}

/// The cgroup's count of processes the OOM killer ended, to compare before and after a runner
/// ran. Reads cgroup v2's `memory.events` (`oom_kill N`), else v1's `memory.oom_control`.
#[derive(Debug, Clone)]
pub(crate) struct OomCounter {
    file: Option<PathBuf>,
}

impl OomCounter {
    /// Finds the counter of this process's cgroup (a runner shares it): cgroup v2's
    /// `memory.events` (mounted at `/sys/fs/cgroup`, or at `/sys/fs/cgroup/unified` on a hybrid
    /// host), else v1's `memory.oom_control` of the memory controller's cgroup, else of its root.
    pub(crate) fn of_this_process() -> Self {
        let memberships = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut candidates = Vec::new();
        for line in memberships.lines() {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = match (fields.next(), fields.next(), fields.next()) {
                (Some(id), Some(controllers), Some(path)) => (id, controllers, path),
                _ => continue,
            };
            let path = path.trim_end_matches('/');
            if controllers.is_empty() {
                for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                    candidates.push(PathBuf::from(format!("{mount}{path}/memory.events")));
                }
            } else if controllers.split(',').any(|name| name == "memory") {
                candidates.push(PathBuf::from(format!(
                    "/sys/fs/cgroup/memory{path}/memory.oom_control"
                )));
            }
        }
        candidates.push(PathBuf::from("/sys/fs/cgroup/memory/memory.oom_control"));
        let file = candidates
            .into_iter()
            .find(|file| read_oom_kills(file).is_some());
        Self { file }
    }

    /// The count now, if it can be read.
    pub(crate) fn read(&self) -> Option<u64> {
        read_oom_kills(self.file.as_ref()?)
    }
}

fn read_oom_kills(file: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == "oom_kill").then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Signals are named with their number and meaning; SIGKILL says whether memory ran out.
    #[test]
    fn ends_are_described_in_words() {
        let segv = describe(RunnerEnd::Signaled(11), None);
        assert!(
            segv.contains("SIGSEGV (signal 11: segmentation fault"),
            "{segv}"
        );
        assert!(describe(RunnerEnd::Signaled(6), None).contains("SIGABRT"));
        assert!(describe(RunnerEnd::Signaled(9), Some(true)).contains("out of memory"));
        assert!(describe(RunnerEnd::Signaled(9), Some(false)).contains("from outside"));
        assert!(describe(RunnerEnd::Signaled(9), None).contains("probably out of memory"));
        assert!(describe(RunnerEnd::Exited(3), None).contains("exited with status 3"));
        assert!(describe(RunnerEnd::Signaled(64), None).contains("(signal 64)"));
    }
}
