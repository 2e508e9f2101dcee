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
const MAX_KEPT: usize = 3;

/// Kept buffers, each empty, with its capacity.
struct Pool(Mutex<Vec<Vec<u8>>>);

/// The process's kept buffers.
static KEPT: Pool = Pool::new();

impl Pool {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity < MIN_KEPT {
            return Vec::with_capacity(capacity);
        }
        // Rounded up, so that a job's text, its input's copy and its output, which differ by a
        // few bytes, can use one another's buffers. Capacity never written is not resident.
        let capacity = capacity
            .checked_next_multiple_of(MIN_KEPT)
            .unwrap_or(capacity);
        {
            let mut kept = self.kept();
            let fitting = kept
                .iter()
                .enumerate()
                .filter(|(_, buffer)| buffer.capacity() >= capacity)
                .min_by_key(|(_, buffer)| buffer.capacity())
                .map(|(index, _)| index);
            if let Some(index) = fitting {
                return kept.swap_remove(index);
            }
        }
        // Allocated outside the lock.
        Vec::with_capacity(capacity)
    }

    fn give_back(&self, mut buffer: Vec<u8>) {
        if buffer.capacity() < MIN_KEPT {
            return;
        }
        buffer.clear();
        let freed = {
            let mut kept = self.kept();
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
}

/// An empty buffer with room for at least `capacity` bytes: a kept one when one is large enough
/// (the smallest such), else a new one.
pub(crate) fn take(capacity: usize) -> Vec<u8> {
    KEPT.take(capacity)
}

/// Drops `buffer`, keeping it for [`take`] if it is big: with [`MAX_KEPT`] kept already, the
/// smallest of them and it is the one freed.
pub(crate) fn give_back(buffer: Vec<u8>) {
    KEPT.give_back(buffer);
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

    #[test]
    fn big_buffers_are_reused_and_small_ones_are_not_kept() {
        let pool = Pool::new();
        let big = pool.take(2 * MIN_KEPT);
        let address = big.as_ptr();
        pool.give_back(big);
        let again = pool.take(MIN_KEPT + 1);
        assert_eq!(
            again.as_ptr(),
            address,
            "the kept buffer is handed out again"
        );
        assert!(again.is_empty() && again.capacity() >= 2 * MIN_KEPT);
        assert!(
            pool.kept().is_empty(),
            "a buffer handed out is no longer kept"
        );
        pool.give_back(again);
        let larger = pool.take(4 * MIN_KEPT);
        assert!(
            larger.as_ptr() != address,
            "one too small is not handed out"
        );
        assert_eq!(pool.kept().len(), 1, "it stays kept");
        pool.give_back(Vec::with_capacity(MIN_KEPT - 1));
        assert_eq!(pool.kept().len(), 1, "a small buffer is not kept");
    }

    #[test]
    fn requests_are_rounded_up_so_that_near_sizes_share_a_buffer() {
        let pool = Pool::new();
        let text = pool.take(10 * MIN_KEPT + 40);
        assert_eq!(text.capacity(), 11 * MIN_KEPT);
        let address = text.as_ptr();
        pool.give_back(text);
        let output = pool.take(10 * MIN_KEPT + 60);
        assert_eq!(output.as_ptr(), address);
    }

    #[test]
    fn at_most_max_kept_are_kept_the_largest() {
        let pool = Pool::new();
        pool.give_back(Vec::with_capacity(8 * MIN_KEPT));
        for _ in 0..MAX_KEPT + 2 {
            pool.give_back(Vec::with_capacity(MIN_KEPT));
        }
        let kept = pool.kept();
        assert_eq!(kept.len(), MAX_KEPT);
        assert!(kept.iter().any(|buffer| buffer.capacity() >= 8 * MIN_KEPT));
    }

    #[test]
    fn bytes_made_of_a_buffer_give_it_back_when_the_last_drops() {
        // The process-wide pool: no other unit test moves buffers of a MiB or more.
        let mut buffer = take(5 * MIN_KEPT);
        buffer.extend_from_slice(b"body");
        let address = buffer.as_ptr();
        let bytes = bytes::Bytes::from_owner(GivenBackOnDrop(buffer));
        let retry = bytes.clone();
        drop(bytes);
        assert_eq!(&retry[..], b"body");
        drop(retry);
        let again = take(5 * MIN_KEPT);
        assert_eq!(again.as_ptr(), address);
    }
}
