//! The host's children: one thread waits for every child that ends (`waitpid(-1)`), so a runner's
//! exit status reaches its supervisor, and, when the host is PID 1 in a container, every orphan
//! the kernel hands it (a handler that started processes leaves them behind when its runner dies)
//! is reaped instead of piling up as zombies.
//!
//! The host is also a child subreaper (`PR_SET_CHILD_SUBREAPER`): processes a handler started
//! are handed to the host, not to the system's init, when their runner dies, so they are reaped
//! here in or out of a container. In runner isolation the host's only own children are its
//! runners, so waiting for any child takes nothing from anyone. (With `--isolation none` the handler lives in the host and may wait
//! for children of its own; this module is not used there.)
//!
//! A runner's pid is registered under the same lock its spawn runs under, so the reaper never
//! sees the exit of a runner it does not know yet. A kill goes through here too, and only to a
//! pid not yet reaped, so it cannot hit an unrelated process that reused the number.

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

/// How long the reaper sleeps when the host has no child, before it looks again for orphans the
/// kernel may have handed it meanwhile (a spawn wakes it at once).
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// One registered child.
#[derive(Debug)]
struct Registered {
    /// Its status, once reaped.
    status: Option<WaitStatus>,
    /// Shut down when the child is reaped, so a reader of its channel sees the end even if a
    /// process the child started still holds the other end open.
    channel: Option<UnixStream>,
}

#[derive(Debug, Default)]
struct Children {
    registered: HashMap<i32, Registered>,
    /// How many children were spawned: the reaper sleeps only if none was since it last looked.
    spawned: u64,
}

static CHILDREN: LazyLock<(Mutex<Children>, Condvar)> = LazyLock::new(Default::default);
static REAPER: Once = Once::new();

fn children() -> MutexGuard<'static, Children> {
    CHILDREN.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Spawns `command` and registers the child; `channel` (the host's end of its control channel)
/// is shut down when the child is reaped.
pub(crate) fn spawn(command: &mut Command, channel: Option<UnixStream>) -> std::io::Result<Child> {
    REAPER.call_once(|| {
        // Not dumpable: a runner cannot read the host's memory or environment (the platform's
        // worker key) through /proc, nor trace it.
        if let Err(error) = nix::sys::prctl::set_dumpable(false) {
            tracing::debug!("Cannot make the host undumpable: {error}");
        }
        if let Err(error) = nix::sys::prctl::set_child_subreaper(true) {
            tracing::debug!("Cannot become a child subreaper: {error}");
        }
        if let Err(error) = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(reap_forever)
        {
            tracing::error!("The child reaper cannot start: {error}");
        }
    });
    let mut children = children();
    let child = command.spawn()?;
    children.registered.insert(
        child.id() as i32,
        Registered {
            status: None,
            channel,
        },
    );
    children.spawned += 1;
    drop(children);
    CHILDREN.1.notify_all();
    Ok(child)
}

/// Waits up to `timeout` for the registered child `pid` to end; its status then, and it is
/// forgotten. `None` if it is still running (or was never registered).
pub(crate) fn wait(pid: i32, timeout: Duration) -> Option<WaitStatus> {
    let deadline = Instant::now() + timeout;
    let mut children = children();
    loop {
        match children.registered.get(&pid) {
            None => return None,
            Some(Registered {
                status: Some(status),
                ..
            }) => {
                let status = *status;
                children.registered.remove(&pid);
                return Some(status);
            }
            Some(_) => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        children = CHILDREN
            .1
            .wait_timeout(children, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// Sends SIGKILL to the registered child `pid`, if it has not been reaped.
pub(crate) fn kill_child(pid: i32) {
    let children = children();
    if matches!(
        children.registered.get(&pid),
        Some(Registered { status: None, .. })
    ) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Waits for children forever: registered ones get their status, others (orphans) are reaped.
///
/// A child is first only seen to have ended (`waitid` with `WNOWAIT`, which leaves it a zombie,
/// so its pid stays taken), and reaped under the lock [`kill_child`] takes: a kill can never
/// reach a pid that was freed and given to another process.
fn reap_forever() {
    loop {
        let spawned = children().spawned;
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(seen) => {
                let Some(pid) = seen.pid() else { continue };
                let mut children = children();
                if children.registered.contains_key(&pid.as_raw()) {
                    // A runner leads its own process group: what is left of it (processes the
                    // handler started, a helper server holding VRAM, say) goes with it. Done
                    // while the runner is a zombie, so the group's number cannot be reused.
                    let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
                }
                let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Ok(status) => status,
                    Err(_) => continue,
                };
                match children.registered.get_mut(&pid.as_raw()) {
                    Some(child) => {
                        child.status = Some(status);
                        if let Some(channel) = child.channel.take() {
                            let _ = channel.shutdown(std::net::Shutdown::Both);
                        }
                    }
                    None => tracing::debug!("Reaped orphan process {pid}: {status:?}"),
                }
                drop(children);
                CHILDREN.1.notify_all();
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                // No child at all (ECHILD): sleep until a spawn, or a while; not at all if a
                // child was spawned since the look (its wake-up may have come before this wait).
                let children = children();
                if children.spawned == spawned {
                    let _ = CHILDREN.1.wait_timeout(children, IDLE_LOOK);
                }
            }
        }
    }
}
