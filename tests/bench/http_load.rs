//! A small closed-loop HTTP/1.1 load generator for the benches: `clients` keep-alive connections,
//! each sending one request, reading the whole answer, then sending the next, for a fixed time.
//! Hand-written on purpose: the client shares the machine with the server it measures, so it must
//! cost as little as a request can (no JSON parsing, no allocation per request beyond the read
//! buffer's growth).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// One request, as bytes on the wire, and what its answer must hold.
#[derive(Clone)]
pub struct Request {
    /// The whole request (line, headers, body).
    pub wire: Vec<u8>,
    /// A text every answer's body must contain.
    pub expect: String,
    /// The answer's status.
    pub status: u16,
    /// A status that refuses the request without failing the run (Cog's 409 "at capacity"):
    /// counted apart, not as an answer.
    pub refusal: Option<u16>,
}

impl Request {
    /// `method path` with a JSON body (or none), to `host`.
    pub fn new(
        method: &str,
        path: &str,
        host: &str,
        body: Option<&str>,
        expect: &str,
        status: u16,
    ) -> Self {
        let mut wire = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(body) = body {
            wire.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            ));
        } else {
            wire.push_str("\r\n");
        }
        Self {
            wire: wire.into_bytes(),
            expect: expect.to_owned(),
            status,
            refusal: None,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Answers checked and counted.
    pub requests: usize,
    /// The measured time.
    pub wall: Duration,
    /// Each answer's latency, sorted.
    pub latencies: Vec<Duration>,
    /// Requests refused with [`Request::refusal`] while measuring.
    pub refused: usize,
}

impl Measured {
    /// Answers per second.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.wall.as_secs_f64()
    }

    /// The latency at quantile `q` (0..1), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[index].as_secs_f64() * 1000.0
    }
}

/// Sends `request` over `clients` connections to `address` for `warm_up`, then for `duration`
/// (measured); every answer is checked. The error names the first bad answer.
pub fn run(
    address: &str,
    request: &Request,
    clients: usize,
    warm_up: Duration,
    duration: Duration,
) -> Result<Measured, String> {
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warm_up;
    let end = measure_from + duration;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let address = address.to_owned();
            let request = request.clone();
            std::thread::spawn(move || connection(&address, &request, measure_from, end))
        })
        .collect();
    let mut latencies = Vec::new();
    let mut refused = 0;
    for thread in threads {
        let (answered, refusals) = thread.join().map_err(|_| "a client thread panicked")??;
        latencies.extend(answered);
        refused += refusals;
    }
    latencies.sort_unstable();
    Ok(Measured {
        requests: latencies.len(),
        wall: duration,
        latencies,
        refused,
    })
}

fn connection(
    address: &str,
    request: &Request,
    measure_from: Instant,
    end: Instant,
) -> Result<(Vec<Duration>, usize), String> {
    let stream = TcpStream::connect(address).map_err(|e| format!("connect {address}: {e}"))?;
    stream.set_nodelay(true).ok();
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut refused = 0;
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        let sent = Instant::now();
        if sent >= end {
            return Ok((latencies, refused));
        }
        writer
            .write_all(&request.wire)
            .map_err(|e| format!("write: {e}"))?;
        // Status line and headers.
        line.clear();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("read: {e}"))?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.trim().eq_ignore_ascii_case("chunked");
                }
            }
        }
        body.clear();
        if chunked {
            loop {
                line.clear();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("read: {e}"))?;
                let size = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| format!("bad chunk size {line:?}"))?;
                let from = body.len();
                body.resize(from + size + 2, 0);
                reader
                    .read_exact(&mut body[from..])
                    .map_err(|e| format!("read: {e}"))?;
                body.truncate(from + size);
                if size == 0 {
                    break;
                }
            }
        } else {
            let length = length.unwrap_or(0);
            body.resize(length, 0);
            reader
                .read_exact(&mut body)
                .map_err(|e| format!("read: {e}"))?;
        }
        let answered = Instant::now();
        if Some(status) == request.refusal {
            if sent >= measure_from {
                refused += 1;
            }
            continue;
        }
        if status != request.status
            || !String::from_utf8_lossy(&body).contains(request.expect.as_str())
        {
            return Err(format!(
                "unexpected answer {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        if sent >= measure_from {
            latencies.push(answered - sent);
        }
    }
}
