//! The floor `queue-bench` measures `worker-host` against: a bare loop that does what a queue
//! worker must and nothing else. It takes one job (`RUNPOD_WEBHOOK_GET_JOB`), posts its input
//! back as the output (`RUNPOD_WEBHOOK_POST_OUTPUT`), and takes the next, over one keep-alive
//! connection, with no handler, no heartbeat, no limits and no retries, on one thread (an async
//! client on a current-thread runtime: no hand-off between threads). It is the bench binary
//! itself, started as `queue-bench __bare-loop` with the platform's variables, and exits 0 on
//! SIGTERM like `worker-host`.

use serde_json::value::RawValue;
use std::process::ExitCode;

/// The argument that starts the bare loop instead of the bench.
pub const ARGUMENT: &str = "__bare-loop";

/// A taken job: its id and its input, not parsed further.
#[derive(serde::Deserialize)]
struct TakenJob<'a> {
    id: String,
    #[serde(borrow)]
    input: &'a RawValue,
}

/// Runs the loop until SIGTERM.
pub fn main() -> ExitCode {
    // SIGTERM is waited for on a thread of its own (blocked everywhere else), then ends the
    // process with 0, as a drained worker would.
    let mut terminate = nix::sys::signal::SigSet::empty();
    terminate.add(nix::sys::signal::Signal::SIGTERM);
    if terminate.thread_block().is_err() {
        eprintln!("bare loop: cannot block SIGTERM");
        return ExitCode::FAILURE;
    }
    std::thread::spawn(move || {
        if terminate.wait().is_ok() {
            std::process::exit(0);
        }
    });
    let variable = |name: &str| std::env::var(name).unwrap_or_default();
    let pod = variable("RUNPOD_POD_ID");
    let take_url = variable("RUNPOD_WEBHOOK_GET_JOB").replace("$ID", &pod);
    let done_template = variable("RUNPOD_WEBHOOK_POST_OUTPUT").replace("$RUNPOD_POD_ID", &pod);
    let key = variable("RUNPOD_AI_API_KEY");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bare loop: no runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let client = match reqwest::Client::builder().pool_max_idle_per_host(1).build() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("bare loop: no HTTP client: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        loop {
            take_and_answer(&client, &take_url, &done_template, &key).await;
        }
    })
}

/// One take, and the job's input posted back as its output.
async fn take_and_answer(client: &reqwest::Client, take_url: &str, done_template: &str, key: &str) {
    {
        let answer = match client
            .get(take_url)
            .header("Authorization", key)
            .send()
            .await
        {
            Ok(answer) => answer,
            Err(error) => {
                eprintln!("bare loop: take failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                return;
            }
        };
        if answer.status() != reqwest::StatusCode::OK {
            return;
        }
        let Ok(body) = answer.bytes().await else {
            return;
        };
        let Ok(job) = serde_json::from_slice::<TakenJob<'_>>(&body) else {
            eprintln!("bare loop: a take answer that is not one job");
            return;
        };
        let input = job.input.get();
        let mut output = String::with_capacity(input.len() + 12);
        output.push_str("{\"output\":");
        output.push_str(input);
        output.push('}');
        let url = done_template.replace("$ID", &job.id);
        if let Err(error) = client
            .post(url)
            .header("Authorization", key)
            .header("Content-Type", "application/json")
            .body(output)
            .send()
            .await
        {
            eprintln!("bare loop: job-done failed: {error}");
        }
    }
}
