//! The process's few kept big buffers: a job's text, a handler's copy of its input, an output
//! read off the runner channel and the job-done body it becomes are each as large as the payload,
//! so a worker moving 10 MiB jobs would otherwise ask the allocator for several fresh 10 MiB
//! blocks per job. glibc keeps freed ones in the arena of the thread that freed them (one arena
//! per thread, so the resident memory grows to several times the payload), or, past its mmap
//! threshold, gives them back and faults fresh zeroed pages in for the next job (slower).
//!
//! Here a buffer of at least [`MIN_KEPT`] bytes is kept when dropped through [`give_back`] (at
//! most [`MAX_KEPT`] of them, the largest), and [`take`] hands a kept one out again when it is
//! large enough, so the same resident pages carry job after job. Small buffers are left to the
//! allocator. The cost is that an idle worker keeps up to [`MAX_KEPT`] of its largest recent
//! buffers, which are bounded by `--max-input-bytes` and `--max-output-bytes`.

use std::sync::{Mutex, PoisonError};

/// The smallest buffer worth keeping.
pub(crate) const MIN_KEPT: usize = 1024 * 1024;
/// How many buffers are kept at most: a job's text, its input copy and its output, the live set
/// of one job at a time.
pub(crate) const MAX_KEPT: usize = 3;

/// The kept buffers, each empty, with its capacity.
static KEPT: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with room for at least `capacity` bytes: a kept one when one is large enough
/// (the smallest such), else a new one.
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    if capacity >= MIN_KEPT {
        // Rounded up, so that a job's text, its input's copy and its output, which differ by a
        // few bytes, can use one another's buffers. Capacity never written is not resident.
        let capacity = capacity.next_multiple_of(MIN_KEPT);
        let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
        let fitting = kept
            .iter()
            .enumerate()
            .filter(|(_, buffer)| buffer.capacity() >= capacity)
            .min_by_key(|(_, buffer)| buffer.capacity())
            .map(|(index, _)| index);
        if let Some(index) = fitting {
            return kept.swap_remove(index);
        }
        return Vec::with_capacity(capacity);
    }
    Vec::with_capacity(capacity)
}

/// Drops `buffer`, keeping it for [`take`] if it is big: with [`MAX_KEPT`] kept already, the
/// smallest of them and it is the one freed.
pub(crate) fn give_back(mut buffer: Vec<u8>) {
    if buffer.capacity() < MIN_KEPT {
        return;
    }
    buffer.clear();
    let freed = {
        let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push(buffer);
        if kept.len() <= MAX_KEPT {
            return;
        }
        let smallest = kept
            .iter()
            .enumerate()
            .min_by_key(|(_, buffer)| buffer.capacity())
            .map(|(index, _)| index)
            .expect("more than MAX_KEPT");
        kept.swap_remove(smallest)
    };
    // Freed outside the lock.
    drop(freed);
}

/// A buffer that goes back through [`give_back`] when the last [`bytes::Bytes`] made of it drops
/// (`Bytes::from_owner`): a job-done body, once the HTTP client is done with it.
pub(crate) struct GivenBackOnDrop(pub(crate) Vec<u8>);

impl AsRef<[u8]> for GivenBackOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for GivenBackOnDrop {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept list is process-wide, so one test does it all, in order.
    #[test]
    fn big_buffers_are_reused_small_ones_are_not_kept_and_bytes_give_theirs_back() {
        let big = take(2 * MIN_KEPT);
        let address = big.as_ptr();
        give_back(big);
        let again = take(MIN_KEPT + 1);
        assert_eq!(
            again.as_ptr(),
            address,
            "the kept buffer is handed out again"
        );
        assert!(again.is_empty());
        give_back(again);
        assert!(
            take(4 * MIN_KEPT).capacity() >= 4 * MIN_KEPT,
            "one too small is not handed out"
        );
        give_back(Vec::with_capacity(16));
        for _ in 0..MAX_KEPT + 2 {
            give_back(Vec::with_capacity(MIN_KEPT));
        }
        let kept = KEPT.lock().unwrap();
        assert_eq!(kept.len(), MAX_KEPT, "at most MAX_KEPT are kept");
        assert!(
            kept.iter().any(|buffer| buffer.capacity() >= 2 * MIN_KEPT),
            "the largest is kept over smaller ones"
        );
        drop(kept);

        // Bytes made of a buffer give it back when the last of them drops.
        let mut buffer = take(3 * MIN_KEPT + 7);
        buffer.extend_from_slice(b"body");
        let bytes = bytes::Bytes::from_owner(GivenBackOnDrop(buffer));
        assert_eq!(&bytes[..], b"body");
        drop(bytes);
        let kept = KEPT.lock().unwrap();
        assert!(kept
            .iter()
            .any(|buffer| buffer.capacity() >= 3 * MIN_KEPT + 7 && buffer.is_empty()));
    }
}
