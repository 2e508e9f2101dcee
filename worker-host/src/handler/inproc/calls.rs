//! The registry of live calls: every handler function the host calls (`init`, `handle`,
//! `teardown`) gets a fresh `wh_call` id, and the host's callbacks find the call's state by that
//! id. A callback made after its call returned (from a thread the handler left running, say)
//! finds nothing and is refused, instead of reading the stack of a function that has returned.
//! A callback holds its call open while it runs; ending a call waits for the callbacks in
//! progress, so the call's state is never dropped under one.

use super::HandlerLog;
use crate::handler::{CancelToken, JobEvents, Limits};
use crate::job::{Failure, Output};
use handler_abi::ffi;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Which handler function a call belongs to; callbacks check it to refuse what does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Init,
    Job,
    Teardown,
}

/// What a call reported through its callbacks.
#[derive(Debug, Default)]
pub(super) struct CallRecord {
    pub(super) output: Option<Output>,
    pub(super) output_rejection: Option<Failure>,
    /// The first stream chunk refused for its size: it fails the job, whatever the handler does
    /// after (a chunk the platform would not take must not go missing without a word).
    pub(super) chunk_rejection: Option<Failure>,
    pub(super) error: Option<Failure>,
    /// The traceback given with `set_error_traceback` (ABI 1.1), for `error`.
    pub(super) traceback: Option<String>,
    /// `(max_concurrency, features)` as `init` reported them with `set_features` (ABI 1.1).
    pub(super) features: Option<(u32, u64)>,
}

impl CallRecord {
    /// The handler's error, with its traceback when it gave one.
    pub(super) fn handler_error(&mut self) -> Option<Failure> {
        let error = self.error.take()?;
        Some(match self.traceback.take() {
            Some(traceback) => error.with_traceback(traceback),
            None => error,
        })
    }
}

/// The state of one call. Lives on the stack of the function that calls into the handler, which
/// ends the call (drops its [`LiveCall`]) before the state goes; callbacks reach it only through
/// [`with_call`].
pub(super) struct CallState<'a> {
    pub(super) phase: Phase,
    pub(super) log: &'a dyn HandlerLog,
    pub(super) streaming: bool,
    pub(super) limits: Limits,
    pub(super) events: Option<&'a dyn JobEvents>,
    pub(super) cancel: Option<&'a CancelToken>,
    pub(super) recycle: AtomicBool,
    record: Mutex<CallRecord>,
}

impl<'a> CallState<'a> {
    pub(super) fn new(
        phase: Phase,
        log: &'a dyn HandlerLog,
        streaming: bool,
        limits: Limits,
        events: Option<&'a dyn JobEvents>,
        cancel: Option<&'a CancelToken>,
    ) -> Self {
        Self {
            phase,
            log,
            streaming,
            limits,
            events,
            cancel,
            recycle: AtomicBool::new(false),
            record: Mutex::new(CallRecord::default()),
        }
    }

    pub(super) fn into_record(self) -> CallRecord {
        self.record
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn record(&self) -> std::sync::MutexGuard<'_, CallRecord> {
        self.record.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancel.is_some_and(CancelToken::is_cancelled)
    }
}

// Live calls.
//
// Why an id and a registry rather than the state's address: a handler may keep its `wh_call` past
// the return of the function it was given to (a detached thread, a callback registered with some
// library). With an address, such a late callback reads a dead stack frame, or the state of
// whichever call lives there now. With an id that is never reused, it finds nothing.
//
// Why this shape: one job may emit thousands of chunks, and several jobs run at once, so a
// callback must stay cheap and must not queue behind other calls. The map is a std
// `RwLock<HashMap>`, locked only for the lookup (its writes are one insert and one remove per
// call, a handful per job). Each call has its own `RwLock`: its callbacks hold it for reading while
// they use the state, and the call's owner takes it once for writing, to end the call, which waits
// for those callbacks. A slow callback (a 20 MiB output being parsed) holds up only the end of its
// own call.

/// The next `wh_call` number. A pointer-sized counter (64 bits on every platform worker-host
/// ships for) does not wrap in the life of a process, so an id is never reused.
static NEXT_CALL_ID: AtomicUsize = AtomicUsize::new(1);

/// Set in every `wh_call` id, so an id is never NULL and never looks like a small integer or a
/// heap address to a language runtime that inspects pointers (Go's stack copier aborts on a
/// pointer below 4096). With the top bit set it is a non-canonical address on x86-64 and
/// aarch64: nothing can live there.
const CALL_ID_TAG: usize = 1 << (usize::BITS - 1);

/// The calls whose handler function has not returned, by id.
static LIVE_CALLS: LazyLock<RwLock<HashMap<usize, Arc<CallSlot>>>> =
    LazyLock::new(Default::default);

/// Where callbacks find one call's state.
struct CallSlot {
    /// The state's address while the call is open, `None` once it ended. Callbacks hold the read
    /// guard for as long as they use the state.
    state: RwLock<Option<StatePtr>>,
}

/// The address of a [`CallState`], its type erased: the slot's lock, not the borrow checker,
/// keeps the state alive while the address is used.
#[derive(Clone, Copy)]
struct StatePtr(NonNull<()>);

// SAFETY: a `StatePtr` is dereferenced only in `with_call`, under its slot's read guard, which
// keeps the state alive (see `LiveCall`); what it reaches is a shared `&CallState`, and
// `CallState` is `Sync` (asserted below), so using it from any thread is sound.
unsafe impl Send for StatePtr {}
// SAFETY: as above.
unsafe impl Sync for StatePtr {}

/// Callbacks use a call's state from the handler's threads.
const _: fn() = || {
    fn is_sync<T: Sync>() {}
    is_sync::<CallState<'static>>();
};

/// One open call: a fresh id in [`LIVE_CALLS`] that leads to a state borrowed for `'s`.
///
/// Dropping it ends the call: the id is removed, then the drop waits for the callbacks in
/// progress, after which no callback can reach the state. The borrow keeps the state alive and in
/// place until then, so the owner drops this before it drops (or moves) the state.
pub(super) struct LiveCall<'s> {
    id: usize,
    slot: Arc<CallSlot>,
    _state: PhantomData<&'s ()>,
}

impl<'s> LiveCall<'s> {
    /// Opens a call on `state`.
    pub(super) fn open(state: &'s CallState<'_>) -> Self {
        let id = CALL_ID_TAG | NEXT_CALL_ID.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(CallSlot {
            state: RwLock::new(Some(StatePtr(NonNull::from(state).cast()))),
        });
        write(&LIVE_CALLS).insert(id, slot.clone());
        Self {
            id,
            slot,
            _state: PhantomData,
        }
    }

    /// The `wh_call` handed to the handler: the id, as a pointer nobody dereferences.
    pub(super) fn id(&self) -> *mut ffi::wh_call {
        self.id as *mut ffi::wh_call
    }
}

impl Drop for LiveCall<'_> {
    fn drop(&mut self) {
        write(&LIVE_CALLS).remove(&self.id);
        // Waits for every callback that found the slot before it left the map.
        *write(&self.slot.state) = None;
    }
}

/// Runs `use_state` on the state of the open call `call` names, keeping the call open until it
/// returns. `None` when `call` names no open call: it ended, or it was never handed out.
pub(super) fn with_call<R>(
    call: *mut ffi::wh_call,
    use_state: impl FnOnce(&CallState<'_>) -> R,
) -> Option<R> {
    let slot = read(&LIVE_CALLS).get(&(call as usize)).cloned()?;
    let open = read(&slot.state);
    let state = (*open)?;
    // SAFETY: the address is in the slot only while its call is open: the `LiveCall` that put it
    // there borrows the state, and before that borrow ends it takes this lock for writing (so
    // waits for `open`) and clears the slot. So the state is alive and in place until `open` is
    // dropped, after `use_state` has returned; `use_state` cannot keep the reference, since its
    // result type does not depend on the reference's lifetime.
    let state = unsafe { state.0.cast::<CallState<'_>>().as_ref() };
    Some(use_state(state))
}

/// Locks for reading; a poisoned lock is still used (its data is never left half-written).
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Locks for writing; a poisoned lock is still used (its data is never left half-written).
fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
