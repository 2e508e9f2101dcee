//! The runner's stdout and stderr: read line by line on a thread each, logged by the host (target
//! `handler`, in the span of the job when exactly one job runs), and the last lines kept for a
//! crash report. The runner's stdio are pipes of their own, never the control channel, so a
//! handler's `printf` can never corrupt the protocol.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::Span;

/// How much of the runner's last output a crash report carries.
pub(crate) const TAIL_BYTES: usize = 16 * 1024;
/// The longest line logged whole; a longer one is cut (its tail still counts for the report).
const MAX_LINE: usize = 64 * 1024;

/// The last lines a runner wrote, at most [`TAIL_BYTES`] in all.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: String) {
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.bytes > TAIL_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.len() + 1,
                None => break,
            }
        }
    }

    /// The kept lines, one per line; the first may be cut at its start to fit.
    pub(crate) fn text(&self) -> String {
        let text = self.lines.iter().fold(String::new(), |mut text, line| {
            text.push_str(line);
            text.push('\n');
            text
        });
        if text.len() <= TAIL_BYTES {
            return text;
        }
        let mut start = text.len() - TAIL_BYTES;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        text[start..].to_owned()
    }
}

/// Says which span a captured line belongs in: the span of the job when exactly one runs.
pub(crate) trait LineContext: Send + Sync {
    /// The span to log a line in now.
    fn span(&self) -> Span;
}

/// One runner's captured output.
#[derive(Debug)]
pub(crate) struct Capture {
    tail: Mutex<Tail>,
    /// One message from each stream's thread when it reaches the end of its pipe.
    ended: Mutex<mpsc::Receiver<()>>,
    ended_sender: mpsc::Sender<()>,
}

impl Capture {
    pub(crate) fn new() -> Arc<Self> {
        let (ended_sender, ended) = mpsc::channel();
        Arc::new(Self {
            tail: Mutex::new(Tail::default()),
            ended: Mutex::new(ended),
            ended_sender,
        })
    }

    /// Reads `stream` (the runner's `name`, "stdout" or "stderr") on a thread of its own until
    /// its end.
    pub(crate) fn follow(
        self: &Arc<Self>,
        name: &'static str,
        stream: impl Read + Send + 'static,
        context: Arc<dyn LineContext>,
    ) {
        let capture = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("runner-{name}"))
            .spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut reader)
                        .take(MAX_LINE as u64)
                        .read_until(b'\n', &mut line)
                    {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    context.span().in_scope(|| {
                        tracing::info!(target: "handler", stream = name, "{text}");
                    });
                    capture.tail().push(text.to_owned());
                }
                let _ = capture.ended_sender.send(());
            });
        if let Err(error) = spawned {
            tracing::warn!("The runner's {name} cannot be captured: {error}");
        }
    }

    /// Keeps a line that did not come through the pipes (a log line of the handler's) in the
    /// tail too.
    pub(crate) fn keep(&self, line: String) {
        self.tail().push(line);
    }

    /// The last output kept so far.
    pub(crate) fn recent(&self) -> String {
        self.tail().text()
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last output, after waiting up to `wait` for both streams to end (a process that just
    /// died may have lines in its pipes that are not read yet).
    pub(crate) fn last_output(&self, wait: Duration) -> String {
        let deadline = std::time::Instant::now() + wait;
        let ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if ended.recv_timeout(left).is_err() {
                break;
            }
        }
        self.tail().text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tail keeps the last lines within its bound.
    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut tail = Tail::default();
        for index in 0..10_000 {
            tail.push(format!("line {index}"));
        }
        let text = tail.text();
        assert!(text.len() <= TAIL_BYTES);
        assert!(
            text.ends_with("line 9999\n"),
            "{}",
            &text[text.len() - 20..]
        );
        assert!(!text.contains("line 1\n"));
        let mut long = Tail::default();
        long.push("é".repeat(TAIL_BYTES));
        assert!(long.text().len() <= TAIL_BYTES);
    }
}
