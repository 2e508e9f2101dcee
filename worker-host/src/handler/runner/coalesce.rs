//! The runner's half of "progress is state, not a log": a job's progress values are not each
//! written to the channel as the handler reports them (a handler that reports 200,000 values in
//! a tight loop would cost 200,000 frames, each a write, a read and a hand-off in the host).
//! Each job keeps only its latest unsent value, and one writer thread sends what is pending;
//! while it writes, newer values replace older unsent ones. The host coalesces the same way
//! before posting, so the platform sees the latest value, never a stale one after a newer.
//!
//! Order: what a job reported before a chunk or its end goes out before that chunk's frame and
//! before its Done ([`LatestProgress::after_pending`]), so the host sees a job's frames in the
//! handler's order and no progress after the Done: the writer holds `writing` while it writes a
//! batch it took, and `after_pending` takes the job's value out and waits for `writing` before
//! it writes the chunk or the Done.

use crate::job::RawJson;
use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// Writes one progress frame for a job (`call`).
type WriteProgress = Box<dyn Fn(u64, &RawJson) + Send + Sync>;

/// The latest unsent progress value of each running job, and the thread that sends them.
pub(super) struct LatestProgress {
    pending: Mutex<HashMap<u64, RawJson>>,
    /// Signalled when a value arrives while none was pending (the writer waits then).
    arrived: Condvar,
    /// Held while values are written.
    writing: Mutex<()>,
    write: WriteProgress,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LatestProgress {
    /// Starts the writer thread; `write` sends one progress frame.
    pub(super) fn start(
        write: impl Fn(u64, &RawJson) + Send + Sync + 'static,
    ) -> std::io::Result<Arc<Self>> {
        let latest = Arc::new(Self {
            pending: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            writing: Mutex::new(()),
            write: Box::new(write),
        });
        let writer = latest.clone();
        std::thread::Builder::new()
            .name("runner-progress".into())
            .spawn(move || writer.write_forever())?;
        Ok(latest)
    }

    /// Keeps `value` as job `call`'s latest progress, replacing one not yet written.
    pub(super) fn report(&self, call: u64, value: RawJson) {
        let mut pending = lock(&self.pending);
        let was_empty = pending.is_empty();
        pending.insert(call, value);
        drop(pending);
        if was_empty {
            self.arrived.notify_one();
        }
    }

    /// Writes job `call`'s value still pending, then runs `write` (which writes the job's next
    /// chunk, or its Done frame), with no older progress of the job written after it.
    pub(super) fn after_pending<T>(&self, call: u64, write: impl FnOnce() -> T) -> T {
        let mut pending = lock(&self.pending);
        let last = pending.remove(&call);
        // A batch the writer took (with an older value of this job, perhaps) is written whole
        // before this goes on.
        let _writing = lock(&self.writing);
        drop(pending);
        if let Some(value) = last {
            (self.write)(call, &value);
        }
        write()
    }

    fn write_forever(&self) {
        loop {
            let mut pending = lock(&self.pending);
            while pending.is_empty() {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let batch = std::mem::take(&mut *pending);
            let _writing = lock(&self.writing);
            drop(pending);
            for (call, value) in batch {
                (self.write)(call, &value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn raw(text: &str) -> RawJson {
        serde_json::value::RawValue::from_string(text.to_owned()).unwrap()
    }

    /// A flood of values costs a few writes, never one after the job's end, and the last value
    /// written before the end is the job's last.
    #[test]
    fn a_flood_is_coalesced_and_its_last_value_precedes_the_end() {
        let (sender, written) = mpsc::channel();
        let progress = {
            let sender = Mutex::new(sender);
            LatestProgress::start(move |call, value| {
                let _ = lock(&sender).send((call, value.get().to_owned()));
            })
            .unwrap()
        };
        for n in 0..100_000 {
            progress.report(7, raw(&n.to_string()));
        }
        progress.after_pending(7, || {});
        let values: Vec<(u64, String)> = written.try_iter().collect();
        assert!(values.len() < 100_000, "{} writes", values.len());
        assert!(values.iter().all(|(call, _)| *call == 7));
        assert_eq!(values.last().unwrap().1, "99999");
        let numbers: Vec<u64> = values.iter().map(|(_, v)| v.parse().unwrap()).collect();
        assert!(
            numbers.windows(2).all(|pair| pair[0] < pair[1]),
            "{numbers:?}"
        );
    }
}
