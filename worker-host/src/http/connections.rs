//! The HTTP/1.1 connections of the host's servers (the dev API, the load-balancing server),
//! below the routers: accepting them (with `TCP_NODELAY`),
//! hyper's limits on a request's line and headers, the header read timeout, graceful shutdown,
//! and JSON bodies for the answers hyper gives by itself.
//!
//! hyper parses each request's line and headers before any router sees it, and answers what it
//! cannot take on its own, then closes the connection: 400 for a request that is not HTTP/1.1
//! (a garbled request line, a malformed header), 414 for a URL over [`MAX_URL_BYTES`], 431 for a
//! request line and headers over [`MAX_HEAD_BYTES`] or more than [`MAX_HEADERS`] headers. hyper
//! has no hook for those answers and sends them with an empty body, so each connection's socket is
//! wrapped to recognize them on their way out (exactly the bodyless, `connection: close` answer
//! hyper writes, alone in one write; the routers never send such an answer, their errors always
//! carry a JSON body) and give them the API's `{"error": "..."}` body. hyper writes its answer
//! alone once the previous answer is sent; should it ever share a write (a pipelined request
//! behind an answer the client is slow to read), it goes out unchanged, with its empty body. A
//! connection that opens with the HTTP/2 preface is closed without an answer (these servers speak
//! HTTP/1.1 only).
//!
//! A connection whose request line and headers have not all arrived [`HEADER_READ_TIMEOUT`] after
//! hyper started waiting for them is closed without an answer; hyper starts waiting when the
//! connection opens and again after each answer, so this is also how long an idle keep-alive
//! connection stays open. No answer is sent then: on an idle connection a client could take it for
//! the answer to its next request.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How long a client has to send a request's line and headers, counted from when the connection
/// opens or its previous answer was written; then the connection is closed (see the module doc).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// For tests only: a whole number of seconds that replaces [`HEADER_READ_TIMEOUT`] (undocumented
/// for users; a value that is not a positive integer is ignored).
pub const HEADER_READ_TIMEOUT_ENV: &str = "WORKER_HOST_DEV_API_HEADER_TIMEOUT_SECS";

/// The longest URL (request target: path and query) a request may have, in bytes: hyper's own
/// limit, which it does not let a server change. Longer ones get 414.
pub const MAX_URL_BYTES: usize = 65_534;

/// The most bytes a request's line and headers may take together (a URL up to [`MAX_URL_BYTES`]
/// included). Larger ones get 431.
pub const MAX_HEAD_BYTES: usize = 128 * 1024;

/// The most headers a request may have: hyper's default, kept (setting it moves hyper's header
/// buffer from the stack to the heap). More get 431.
pub const MAX_HEADERS: usize = 100;

/// How long accepting waits after an error that is not about one connection (such as too many
/// open files), before it tries again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The header read timeout in effect: [`HEADER_READ_TIMEOUT`], or the test override of
/// [`HEADER_READ_TIMEOUT_ENV`].
pub fn header_read_timeout() -> Duration {
    header_read_timeout_from(std::env::var(HEADER_READ_TIMEOUT_ENV).ok().as_deref())
}

/// The header read timeout for a value of [`HEADER_READ_TIMEOUT_ENV`] (`None`: not set).
fn header_read_timeout_from(value: Option<&str>) -> Duration {
    value
        .and_then(|value| value.trim().parse::<u64>().ok())
        .filter(|&seconds| seconds > 0)
        .map_or(HEADER_READ_TIMEOUT, Duration::from_secs)
}

/// Serves `router` over HTTP/1.1 on `listener` until `stop` resolves; then accepts no more
/// connections, lets each finish the request it is answering (idle ones close at once), and
/// returns when all have closed. Each connection runs in its own task. `header_read_timeout`
/// `None` never times a connection out (the worker's own loopback connections).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Option<Duration>,
    stop: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES);
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                tracing::error!("The server cannot accept connections: {error}");
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    () = &mut stop => break,
                }
            }
        };
        no_delay(&stream);
        let connection = builder.serve_connection(
            TokioIo::new(Socket::new(stream)),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!("A connection ended: {error}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A non-blocking listener on `host:port`, for [`serve`] to take over once a runtime runs.
pub fn bind(host: &str, port: u16) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind((host, port))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Waits up to `grace` for each of `servers` (tasks running [`serve`], told to stop) to end, and
/// aborts those still running then.
pub async fn close_within(servers: Vec<tokio::task::JoinHandle<()>>, grace: Duration) {
    for mut server in servers {
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            server.abort();
        }
    }
}

/// Whether an accept error is about the one connection (gone before it was accepted), not the
/// listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Small answers go out at once instead of waiting on Nagle's algorithm.
fn no_delay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {error}");
    }
}

/// A connection's TCP stream, which gives hyper's own bodyless rejections a JSON body on the way
/// out (see [`json_rejection`]); everything else passes through unchanged.
#[derive(Debug)]
struct Socket {
    /// The connection.
    stream: TcpStream,
    /// A rewritten rejection that hyper counts as written but that is not all sent yet.
    pending: Vec<u8>,
    /// How much of `pending` is sent.
    sent: usize,
}

impl Socket {
    /// Wraps `stream`.
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            pending: Vec::new(),
            sent: 0,
        }
    }

    /// Sends what is left of a rewritten rejection.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.pending.len() {
            let written =
                ready!(Pin::new(&mut self.stream).poll_write(cx, &self.pending[self.sent..]))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += written;
        }
        self.pending.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// When `write` is one of hyper's rejections, sends the JSON one instead and answers for the
    /// whole of `write` (the rest goes out on the next write, flush or shutdown).
    fn poll_rejection(
        &mut self,
        cx: &mut Context<'_>,
        write: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        self.pending = json_rejection(write)?;
        self.sent = 0;
        Some(match self.poll_pending(cx) {
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Ready(Ok(())) | Poll::Pending => Poll::Ready(Ok(write.len())),
        })
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        if let Some(poll) = this.poll_rejection(cx, buf) {
            return poll;
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        let mut filled = bufs.iter().filter(|buf| !buf.is_empty());
        if let (Some(only), None) = (filled.next(), filled.next()) {
            if let Some(poll) = this.poll_rejection(cx, only) {
                return poll;
            }
        }
        Pin::new(&mut this.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pending(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// The status lines of the answers hyper sends by itself for a request it cannot parse, and what
/// the JSON body of each says.
fn rejection_message(status_line: &str) -> Option<String> {
    Some(match status_line {
        "HTTP/1.1 400 Bad Request" => {
            "the request is not valid HTTP/1.1: its request line or a header is malformed"
                .to_owned()
        }
        "HTTP/1.1 414 URI Too Long" => {
            format!("the URL is longer than {MAX_URL_BYTES} bytes, this API's limit")
        }
        "HTTP/1.1 431 Request Header Fields Too Large" => format!(
            "the request line and headers are over this API's limits: {} KiB in all, \
             {MAX_HEADERS} headers",
            MAX_HEAD_BYTES / 1024
        ),
        _ => return None,
    })
}

/// hyper's rejections are short: a status line, `connection`, `content-length` and `date`.
const MAX_REJECTION_BYTES: usize = 256;

/// When `write` is exactly one of hyper's own rejections (a 400, 414 or 431 head with
/// `content-length: 0` and `connection: close`, no content type and nothing after it), the same
/// answer with a JSON body `{"error": "..."}`; otherwise `None`.
fn json_rejection(write: &[u8]) -> Option<Vec<u8>> {
    if write.len() > MAX_REJECTION_BYTES || !write.starts_with(b"HTTP/1.1 4") {
        return None;
    }
    let head = std::str::from_utf8(write).ok()?.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let message = rejection_message(status_line)?;
    let headers: Vec<&str> = lines.collect();
    let has = |wanted: &str| headers.iter().any(|line| line.eq_ignore_ascii_case(wanted));
    let names = |name: &str| headers.iter().any(|line| names_header(line, name));
    if headers.iter().any(|line| line.is_empty())
        || !has("content-length: 0")
        || !has("connection: close")
        || names("content-type")
        || names("transfer-encoding")
    {
        return None;
    }
    let body = serde_json::json!({ "error": message }).to_string();
    let mut answer = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for line in headers
        .iter()
        .filter(|line| !names_header(line, "content-length"))
    {
        answer.push_str(line);
        answer.push_str("\r\n");
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    Some(answer.into_bytes())
}

/// Whether the header line `line` is a `name` header.
fn names_header(line: &str, name: &str) -> bool {
    line.split_once(':')
        .is_some_and(|(found, _)| found.trim().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What hyper 1.x writes for a URL it will not take.
    const HYPER_414: &[u8] = b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Wed, 02 Dec 2026 02:25:41 GMT\r\n\r\n";

    /// hyper's 400, 414 and 431 get a JSON body and a matching length, its other headers kept.
    #[test]
    fn hyper_rejections_get_a_json_body() {
        let answer = json_rejection(HYPER_414).expect("rewritten");
        let text = String::from_utf8(answer).expect("ASCII");
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        assert!(head.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{head}");
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(head.contains("\r\ndate: Wed, 02 Dec 2026"), "{head}");
        assert!(!head.contains("content-length: 0"), "{head}");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert!(json["error"].as_str().is_some_and(|e| e.contains("65534")));
        for status in ["400 Bad Request", "431 Request Header Fields Too Large"] {
            let write =
                format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
            assert!(json_rejection(write.as_bytes()).is_some(), "{status}");
        }
    }

    /// Anything but exactly a bodyless rejection of hyper's, alone in the write, passes as is.
    #[test]
    fn other_answers_pass_unchanged() {
        for write in [
            // The routers' own errors: JSON already.
            &b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
               content-length: 0\r\nconnection: close\r\n\r\n"[..],
            // Kept alive: not hyper's rejection.
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
            // A body follows.
            b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
               content-length: 0\r\n\r\n{}",
            // Another status.
            b"HTTP/1.1 401 Unauthorized\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"{\"error\": \"HTTP/1.1 414 URI Too Long\"}",
        ] {
            assert!(
                json_rejection(write).is_none(),
                "{}",
                String::from_utf8_lossy(write)
            );
        }
    }

    /// The test override takes a positive whole number of seconds; anything else is ignored.
    #[test]
    fn the_timeout_override_is_a_positive_whole_number_of_seconds() {
        assert_eq!(header_read_timeout_from(None), HEADER_READ_TIMEOUT);
        assert_eq!(
            header_read_timeout_from(Some(" 2 ")),
            Duration::from_secs(2)
        );
        for ignored in ["0", "-1", "1.5", "soon", ""] {
            assert_eq!(
                header_read_timeout_from(Some(ignored)),
                HEADER_READ_TIMEOUT,
                "{ignored}"
            );
        }
    }
}
