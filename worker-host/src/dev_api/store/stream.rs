//! Stream chunks: what a streaming job's worker posts, kept until `/stream` reads it.
//!
//! A job's unread chunks are bounded by bytes ([`MAX_UNREAD_STREAM_BYTES`] by default); past it
//! the oldest are dropped, and the next `/stream` answer logs how many.

use super::record::{Record, Status};
use super::Store;
use crate::job::RawJson;
use serde::Serialize;
use serde_json::value::RawValue;
use std::time::Duration;

/// The most bytes of stream chunks one job keeps until `/stream` reads them. A streaming job
/// submitted with `/run` and followed only with `/status` would otherwise keep its whole output
/// for as long as it runs; past this the oldest unread chunks are dropped.
pub const MAX_UNREAD_STREAM_BYTES: usize = 64 * 1024 * 1024;

/// A `/stream` answer.
#[derive(Serialize)]
struct StreamAnswer<'a> {
    id: &'a str,
    status: Status,
    stream: Vec<ChunkObject<'a>>,
}

/// One chunk of a `/stream` answer.
#[derive(Serialize)]
struct ChunkObject<'a> {
    output: &'a RawValue,
}

impl Record {
    /// Whether `/stream` has something to hand out now.
    fn has_unread(&self) -> bool {
        !self.unread.is_empty() || self.output_unread
    }

    /// The `/stream` answer, handing out (and forgetting) what was unread. Chunks dropped
    /// unread since the last answer (over `limit` bytes were waiting) are logged: the answer's
    /// shape, the platform's, has no place for them.
    fn drain_stream(&mut self, id: &str, limit: usize) -> String {
        let dropped = std::mem::take(&mut self.unread_dropped);
        if dropped > 0 {
            tracing::warn!(
                job_id = %id,
                "/stream: {dropped} older chunk(s) of this job were dropped before this read: \
                 over {limit} bytes of chunks were waiting. Read /stream more often."
            );
        }
        self.unread_bytes = 0;
        let chunks = std::mem::take(&mut self.unread);
        let output = std::mem::take(&mut self.output_unread)
            .then_some(self.output.as_deref())
            .flatten();
        let answer = StreamAnswer {
            id,
            status: self.status,
            stream: chunks
                .iter()
                .map(|chunk| &**chunk)
                .chain(output)
                .map(|output| ChunkObject { output })
                .collect(),
        };
        serde_json::to_string(&answer).expect("a stream answer always serializes")
    }
}

impl Store {
    /// The `/stream` answer: the chunks not returned before (waiting up to `wait` for one, or for
    /// the job's end, when there is none yet), or `None` for an unknown job.
    pub async fn read_stream(&self, id: &str, wait: Duration) -> Option<String> {
        self.wait_for_job(
            id,
            wait,
            |job| job.has_unread() || job.status.is_final(),
            |job| job.drain_stream(id, self.limits.max_unread_stream_bytes),
        )
        .await
    }

    /// Records a stream chunk the worker posted for a running job (others are ignored). Past
    /// [`StoreLimits::max_unread_stream_bytes`](super::StoreLimits::max_unread_stream_bytes)
    /// unread, the oldest unread chunks are dropped.
    pub fn add_chunk(&self, id: &str, chunk: RawJson) {
        let mut state = self.state();
        let Some(job) = state.jobs.get_mut(id) else {
            return;
        };
        if job.status != Status::InProgress {
            return;
        }
        job.unread_bytes += chunk.get().len();
        job.unread.push_back(chunk);
        job.streamed = true;
        let dropped_before = job.unread_dropped;
        while job.unread_bytes > self.limits.max_unread_stream_bytes {
            let Some(oldest) = job.unread.pop_front() else {
                break;
            };
            job.unread_bytes -= oldest.get().len();
            job.unread_dropped += 1;
        }
        if dropped_before == 0 && job.unread_dropped > 0 {
            tracing::warn!(
                job_id = %id,
                "Over {} bytes of this job's stream chunks wait for /stream: the oldest are \
                 dropped until it reads them.",
                self.limits.max_unread_stream_bytes
            );
        }
        job.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::super::*;
    use serde_json::value::RawValue;
    use std::time::Duration;

    /// `/stream` hands each chunk out once; a non-streaming job's output is one chunk.
    #[tokio::test]
    async fn stream_chunks_are_handed_out_once() {
        let (store, _) = store(StoreLimits::default());
        let streaming = store.submit(job(Submission::Async));
        assert_eq!(store.take(1).len(), 1);
        let chunk = |text: &str| RawValue::from_string(text.to_owned()).expect("valid JSON");
        store.add_chunk(&streaming, chunk("1"));
        store.add_chunk(&streaming, chunk("2"));
        let wait = Duration::from_millis(10);
        let first = store.read_stream(&streaming, wait).await.expect("known");
        assert_eq!(
            first,
            format!(
                r#"{{"id":"{streaming}","status":"IN_PROGRESS","stream":[{{"output":1}},{{"output":2}}]}}"#
            )
        );
        store.add_chunk(&streaming, chunk("3"));
        store.add_result(&streaming, request(r#"{"output": []}"#), true);
        let last = store.read_stream(&streaming, wait).await.expect("known");
        assert!(
            last.ends_with(r#""status":"COMPLETED","stream":[{"output":3}]}"#),
            "{last}"
        );
        let empty = store.read_stream(&streaming, wait).await.expect("known");
        assert!(empty.ends_with(r#""stream":[]}"#), "{empty}");

        let plain = store.submit(job(Submission::Async));
        run(&store, &plain, r#"{"output": {"a": 1}}"#);
        let answer = store.read_stream(&plain, wait).await.expect("known");
        assert!(
            answer.ends_with(r#""stream":[{"output":{"a": 1}}]}"#),
            "{answer}"
        );
    }

    /// A streaming job nobody reads keeps at most `max_unread_stream_bytes` of chunks: the
    /// oldest are dropped (and counted, for the next `/stream` to log), the newest come out in
    /// order, and reading starts the count anew.
    #[tokio::test]
    async fn unread_stream_chunks_are_capped_by_bytes() {
        assert_eq!(
            StoreLimits::default().max_unread_stream_bytes,
            MAX_UNREAD_STREAM_BYTES
        );
        let (store, _) = store(StoreLimits {
            max_unread_stream_bytes: 10,
            ..StoreLimits::default()
        });
        let id = started(&store);
        let chunk = |n: usize| RawValue::from_string(format!(r#""{n}""#)).expect("valid JSON");
        for n in 0..10 {
            store.add_chunk(&id, chunk(n));
        }
        let unread = |store: &Store| {
            let state = store.state();
            let job = &state.jobs[&id];
            (job.unread.len(), job.unread_bytes, job.unread_dropped)
        };
        assert_eq!(
            unread(&store),
            (3, 9, 7),
            "three 3-byte chunks fit in 10 bytes"
        );
        let wait = Duration::from_millis(10);
        let answer = store.read_stream(&id, wait).await.expect("known");
        assert!(
            answer.ends_with(r#""stream":[{"output":"7"},{"output":"8"},{"output":"9"}]}"#),
            "{answer}"
        );
        assert_eq!(unread(&store), (0, 0, 0));
        store.add_chunk(&id, chunk(10));
        assert_eq!(unread(&store), (1, 4, 0));
    }
}
