//! `embed-direct`: the embed handler's own time, with no host in between, for `embed-bench`
//! (tests/bench/embed_bench.rs) to set against the time through `worker-host`.
//!
//! Usage: `embed-direct MODEL_DIR BATCHES_JSON`, where the file holds `[["text", ...], ...]`,
//! one array per job. It loads the model as the handler's `init` does, embeds each batch in
//! turn, and prints `init_us=N`, then `job_us=N` for each batch, then `total_us=N` (the batches
//! alone).

use embed_handler::Model;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, batches] = &args[..] else {
        eprintln!("usage: embed-direct MODEL_DIR BATCHES_JSON");
        return ExitCode::from(2);
    };
    let batches: Vec<Vec<String>> = match std::fs::read(batches)
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_slice(&text).map_err(|e| e.to_string()))
    {
        Ok(batches) => batches,
        Err(error) => {
            eprintln!("embed-direct: {batches}: {error}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let model = match Model::load(Path::new(model_dir)) {
        Ok(model) => model,
        Err(error) => {
            eprintln!("embed-direct: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("init_us={}", started.elapsed().as_micros());
    let all = Instant::now();
    for batch in &batches {
        let job = Instant::now();
        if let Err(error) = model.embed(batch) {
            eprintln!("embed-direct: {error}");
            return ExitCode::FAILURE;
        }
        println!("job_us={}", job.elapsed().as_micros());
    }
    println!("total_us={}", all.elapsed().as_micros());
    ExitCode::SUCCESS
}
