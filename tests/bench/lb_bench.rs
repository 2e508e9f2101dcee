//! `lb-bench`: the load-balancing mode against what RunPod's load-balancing users run today, side
//! by side in one run, over real HTTP on loopback; run by hand, not by CI.
//!
//! Echo requests per second and p50/p99 latency with 1 and 8 closed-loop keep-alive clients
//! ([`http_load`]) against:
//! - `worker-host --load-balancing` (release build, echo handler, `--concurrency 8`), in the
//!   default runner isolation and in process (`--isolation none`);
//! - the same server's `GET /ping`, which runs no job: the limit of its HTTP path;
//! - a FastAPI app on uvicorn with the same echo (`lb/fastapi_echo.py`, what the platform's guide
//!   has users write; FastAPI and uvicorn come with `pip install runpod`);
//! - Cog's runtime (`pip install coglet cog`; `python -m cog.server.http` with the echo predictor
//!   `lb/predict.py`): a Rust server in front of a Python child, the nearest design to ours.
//!
//! Every answer is checked (status, and the echoed text in the body); the bench exits 1 when one
//! is not what it should be. Cog refuses a request with 409 while its one prediction slot is
//! busy (even the next request on a connection, just after an answer): those are counted in
//! `refused`, not as answers.
//!
//! ```text
//! cargo build --release -p worker-host -p echo-handler
//! cargo run --release -p e2e --bin lb-bench -- [--seconds S] [--skip-python] [--cog-python PATH]
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)] // lb-bench needs the artefacts and the machine's description only
#[path = "common.rs"]
mod common;
#[path = "http_load.rs"]
mod http_load;
use common::{artefact, cpu_model, describe_binary};
use http_load::{Measured, Request};

/// How long a server may take to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Sent before measuring (connections, allocator and caches warm up).
const WARM_UP: Duration = Duration::from_millis(500);
/// The client counts measured.
const CLIENTS: [usize; 2] = [1, 8];
/// The echo body.
const BODY: &str = r#"{"prompt":"hello"}"#;

const USAGE: &str = "\
usage: lb-bench [--seconds S] [--skip-python] [--cog-python PATH]

  --seconds S        measured seconds per row (default 5)
  --skip-python      do not run the FastAPI app or Cog
  --cog-python PATH  the python that has coglet and cog installed (default: python3, if it has
                     them; otherwise Cog is skipped with a note)";

struct Options {
    seconds: f64,
    skip_python: bool,
    cog_python: Option<PathBuf>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 5.0,
        skip_python: false,
        cog_python: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                options.seconds = args
                    .next()
                    .and_then(|value| value.parse().ok())
                    .filter(|seconds: &f64| *seconds > 0.0)
                    .ok_or("--seconds needs a positive number")?;
            }
            "--skip-python" => options.skip_python = true,
            "--cog-python" => {
                options.cog_python = Some(args.next().ok_or("--cog-python needs a path")?.into());
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(options)
}

/// A server process; killed when dropped.
struct Server {
    name: String,
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// Waits until `GET path` answers 200 with `ready` in its body.
fn wait_ready(server: &mut Server, path: &str, ready: &str) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let probe = Request::new("GET", path, &server.address, None, ready, 200);
    loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            return Err(format!(
                "{} exited ({status}) before it was ready",
                server.name
            ));
        }
        let once = http_load::run(
            &server.address,
            &probe,
            1,
            Duration::ZERO,
            Duration::from_millis(1),
        );
        if once.is_ok_and(|measured| measured.requests > 0) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} was not ready in {STARTUP_TIMEOUT:?}",
                server.name
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn worker_host(binary: &Path, handler: &Path, isolation: &str) -> Result<Server, String> {
    let port = free_port();
    let child = Command::new(binary)
        .args(["--handler"])
        .arg(handler)
        .args(["--load-balancing", "--port", &port.to_string()])
        .args(["--concurrency", "8", "--isolation", isolation])
        .args(["--rp_log_level", "WARN"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("worker-host cannot start: {e}"))?;
    let mut server = Server {
        name: format!("worker-host ({isolation})"),
        child,
        address: format!("127.0.0.1:{port}"),
    };
    wait_ready(&mut server, "/ping", "ready")?;
    Ok(server)
}

fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/lb")
}

fn fastapi() -> Result<Server, String> {
    let port = free_port();
    let child = Command::new("python3")
        .arg(bench_dir().join("fastapi_echo.py"))
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("python3 cannot start: {e}"))?;
    let mut server = Server {
        name: "FastAPI on uvicorn".into(),
        child,
        address: format!("127.0.0.1:{port}"),
    };
    wait_ready(&mut server, "/ping", "healthy")?;
    Ok(server)
}

/// The python to run Cog with: the one given, or python3 when it has coglet.
fn cog_python(given: Option<PathBuf>) -> Result<PathBuf, String> {
    let python = given.unwrap_or_else(|| "python3".into());
    let has = Command::new(&python)
        .args(["-c", "import coglet, cog"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if has {
        Ok(python)
    } else {
        Err(format!(
            "{} cannot import coglet and cog (pip install coglet cog, or --cog-python PATH)",
            python.display()
        ))
    }
}

fn cog(python: &Path) -> Result<Server, String> {
    let port = free_port();
    // Cog's orchestrator starts its Python worker with the `python` on PATH: put the chosen
    // interpreter's directory first.
    let mut path = python
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.as_os_str().to_owned())
        .unwrap_or_default();
    if let Some(existing) = std::env::var_os("PATH") {
        if !path.is_empty() {
            path.push(":");
        }
        path.push(existing);
    }
    let child = Command::new(python)
        .args(["-m", "cog.server.http", "--host", "127.0.0.1"])
        .current_dir(bench_dir())
        .env("PORT", port.to_string())
        .env("PATH", path)
        .env("COG_PREDICT_TYPE_STUB", "predict.py:Predictor")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{} cannot start: {e}", python.display()))?;
    let mut server = Server {
        name: "Cog (coglet)".into(),
        child,
        address: format!("127.0.0.1:{port}"),
    };
    wait_ready(&mut server, "/health-check", "READY")?;
    Ok(server)
}

/// One row of the table: a server, a request, a client count.
struct Row {
    name: String,
    clients: usize,
    measured: Measured,
}

fn measure(
    rows: &mut Vec<Row>,
    name: &str,
    server: &Server,
    request: &Request,
    seconds: f64,
) -> Result<(), String> {
    for clients in CLIENTS {
        let measured = http_load::run(
            &server.address,
            request,
            clients,
            WARM_UP,
            Duration::from_secs_f64(seconds),
        )
        .map_err(|error| format!("{name}, {clients} clients: {error}"))?;
        println!(
            "{name:<34} {clients:>7} {:>9} {:>10.0} {:>8.3} {:>8.3} {:>9}",
            measured.requests,
            measured.rate(),
            measured.quantile_ms(0.5),
            measured.quantile_ms(0.99),
            measured.refused
        );
        rows.push(Row {
            name: name.to_owned(),
            clients,
            measured,
        });
    }
    Ok(())
}

fn find<'a>(rows: &'a [Row], name: &str, clients: usize) -> Option<&'a Measured> {
    rows.iter()
        .find(|row| row.name == name && row.clients == clients)
        .map(|row| &row.measured)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lb-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let options = options()?;
    let binary = artefact("worker-host")?;
    let handler = artefact("libecho_handler.so")?;
    println!("{}", describe_binary(&binary));
    println!("machine: {} ({} CPUs)", cpu_model(), num_cpus());
    println!(
        "echo body {BODY}; closed-loop keep-alive clients; {} s per row after {:?} warm-up",
        options.seconds, WARM_UP
    );
    println!();
    println!(
        "{:<34} {:>7} {:>9} {:>10} {:>8} {:>8} {:>9}",
        "server", "clients", "answered", "answers/s", "p50 ms", "p99 ms", "refused"
    );
    let mut rows = Vec::new();
    const WORKER_HOST: &str = "worker-host --load-balancing";
    const IN_PROCESS: &str = "worker-host (--isolation none)";
    const PING: &str = "worker-host GET /ping (no job)";
    const FASTAPI: &str = "FastAPI on uvicorn";
    const COG: &str = "Cog (coglet 0.23)";
    {
        let server = worker_host(&binary, &handler, "runner")?;
        let echo = Request::new("POST", "/echo", &server.address, Some(BODY), "hello", 200);
        measure(&mut rows, WORKER_HOST, &server, &echo, options.seconds)?;
        let ping = Request::new("GET", "/ping", &server.address, None, "ready", 200);
        measure(&mut rows, PING, &server, &ping, options.seconds)?;
    }
    {
        let server = worker_host(&binary, &handler, "none")?;
        let echo = Request::new("POST", "/echo", &server.address, Some(BODY), "hello", 200);
        measure(&mut rows, IN_PROCESS, &server, &echo, options.seconds)?;
    }
    let mut notes = Vec::new();
    if options.skip_python {
        notes.push("FastAPI and Cog skipped (--skip-python)".to_owned());
    } else {
        match fastapi() {
            Ok(server) => {
                let echo = Request::new("POST", "/echo", &server.address, Some(BODY), "hello", 200);
                measure(&mut rows, FASTAPI, &server, &echo, options.seconds)?;
            }
            Err(error) => notes.push(format!("FastAPI skipped: {error}")),
        }
        match cog_python(options.cog_python.clone()).and_then(|python| cog(&python)) {
            Ok(server) => {
                let body = format!(r#"{{"input":{BODY}}}"#);
                let mut predict = Request::new(
                    "POST",
                    "/predictions",
                    &server.address,
                    Some(&body),
                    "\"succeeded\"",
                    200,
                );
                // Cog answers 409 "at capacity" while its one slot is busy, even to the next
                // request on the same connection just after an answer: counted apart.
                predict.refusal = Some(409);
                measure(&mut rows, COG, &server, &predict, options.seconds)?;
            }
            Err(error) => notes.push(format!("Cog skipped: {error}")),
        }
    }
    println!();
    for note in notes {
        println!("note: {note}");
    }
    let (Some(ours), Some(ping)) = (find(&rows, WORKER_HOST, 8), find(&rows, PING, 8)) else {
        return Ok(());
    };
    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let of_ping = ours.rate() / ping.rate();
    println!(
        "8 clients: worker-host echo / its own /ping = {:.0} / {:.0} req/s = {of_ping:.2} (target >= 0.5: {})",
        ours.rate(),
        ping.rate(),
        met(of_ping >= 0.5)
    );
    if let Some(fastapi) = find(&rows, FASTAPI, 8) {
        let ratio = ours.rate() / fastapi.rate();
        println!(
            "8 clients: worker-host / FastAPI = {:.0} / {:.0} req/s = {ratio:.2}x (target >= 4: {}); p50 {:.3} vs {:.3} ms (target lower: {})",
            ours.rate(),
            fastapi.rate(),
            met(ratio >= 4.0),
            ours.quantile_ms(0.5),
            fastapi.quantile_ms(0.5),
            met(ours.quantile_ms(0.5) < fastapi.quantile_ms(0.5))
        );
    }
    if let Some(cog) = find(&rows, COG, 8) {
        println!(
            "8 clients: worker-host / Cog = {:.0} / {:.0} req/s = {:.2}x; p50 {:.3} vs {:.3} ms",
            ours.rate(),
            cog.rate(),
            ours.rate() / cog.rate(),
            ours.quantile_ms(0.5),
            cog.quantile_ms(0.5)
        );
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
