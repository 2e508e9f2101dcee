//! A real model, served: the embed sample handler (all-MiniLM-L6-v2 on the CPU) through the real
//! `worker-host` binary, in the one-shot run, the queue worker and the dev API. Its embeddings
//! are checked against reference vectors computed independently
//! (`tests/fixtures/embed_reference.json`, from `sample-handlers/embed/reference.py`).
//!
//! The model comes from `sample-handlers/embed/fetch-model.sh`; without it these tests fail with
//! that command (or skip, with `WORKER_HOST_TESTS_ALLOW_SKIPS=1` outside CI).

use e2e::platform::{results_by_id, Platform};
use e2e::{embed, worker_host, Run, Sample, WorkerProcess};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(120);

/// The most a component may differ from the reference.
const TOLERANCE: f32 = 1e-4;

/// The committed reference: its sentences and their embeddings.
fn reference() -> (Vec<String>, Vec<Vec<f32>>) {
    let text = include_str!("fixtures/embed_reference.json");
    let fixture: Value = serde_json::from_str(text).expect("the fixture is JSON");
    let sentences = serde_json::from_value(fixture["sentences"].clone()).expect("sentences");
    let embeddings = serde_json::from_value(fixture["embeddings"].clone()).expect("embeddings");
    (sentences, embeddings)
}

/// The `embeddings` of a handler output.
fn embeddings(output: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(output["embeddings"].clone())
        .unwrap_or_else(|e| panic!("{e}: no embeddings in {output}"))
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts that `got` is `want` to [`TOLERANCE`] in every component.
fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "one embedding per text");
    for (n, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), 384, "embedding {n} has 384 dimensions");
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= TOLERANCE,
            "embedding {n} differs from the reference by up to {worst}"
        );
    }
}

/// The model directory and the handler config naming it; `None` when the test is skipped.
fn model(what: &str) -> Option<(PathBuf, String)> {
    let dir = embed::model_dir(what)?;
    let config = embed::config(&dir);
    Some((dir, config))
}

/// A one-shot run of the embed handler on `input`.
fn one_shot(config: &str, input: Value) -> Run {
    Run::of(
        worker_host()
            .arg("--handler")
            .arg(embed::library())
            .args(["--handler-config", config])
            .arg("--test_input")
            .arg(json!({ "input": input }).to_string()),
    )
}

/// The `error_message` of a one-shot run's failed result.
fn one_shot_error(run: &Run) -> String {
    let body = run.result();
    let payload: Value =
        serde_json::from_str(body["error"].as_str().expect("an error")).expect("error JSON");
    payload["error_message"].as_str().unwrap().to_owned()
}

/// The one-shot run embeds a batch as the reference does: 384 unit-length dimensions per text,
/// each component within 1e-4 of the independently computed vector; `init` logs its time and
/// the model's size.
#[test]
fn one_shot_matches_the_reference() {
    let Some((_, config)) = model("the embed one-shot test") else {
        return;
    };
    let (sentences, want) = reference();
    let run = one_shot(&config, json!({ "texts": sentences }));
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let got = embeddings(&run.result()["output"]);
    for (n, vector) in got.iter().enumerate() {
        let norm = cosine(vector, vector).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "embedding {n} has length {norm}");
    }
    assert_close(&got, &want);
    let init_line = run
        .stderr
        .lines()
        .find(|line| line.contains("embed: loaded all-MiniLM-L6-v2"))
        .unwrap_or_else(|| panic!("no init line in {}", run.stderr));
    assert!(
        init_line.contains(" ms: ") && init_line.contains("22713728 parameters, 90.9 MB"),
        "{init_line}"
    );
}

/// The same texts give bit-identical embeddings in two processes, and a text alone gives (to
/// the tolerance) what it gives inside a padded batch: padding does not leak into the mean.
#[test]
fn embeddings_are_deterministic_and_independent_of_the_batch() {
    let Some((_, config)) = model("the embed determinism test") else {
        return;
    };
    let (sentences, _) = reference();
    let first = one_shot(&config, json!({ "texts": sentences }));
    let second = one_shot(&config, json!({ "texts": sentences }));
    assert_eq!(first.code, Some(0), "stderr: {}", first.stderr);
    let first = embeddings(&first.result()["output"]);
    assert_eq!(first, embeddings(&second.result()["output"]));
    // The shortest sentence, alone: no padding at all.
    let alone = one_shot(&config, json!({ "text": sentences[0] }));
    assert_close(&embeddings(&alone.result()["output"]), &first[..1]);
}

/// Served by the queue worker at concurrency 2, every job gets its texts' reference embeddings,
/// and paraphrases are much closer to each other than to unrelated sentences.
#[test]
fn queue_worker_serves_embeddings_and_paraphrases_are_close() {
    let Some((_, config)) = model("the embed queue worker test") else {
        return;
    };
    let (sentences, want) = reference();
    let platform = Platform::start();
    for (n, sentence) in sentences.iter().enumerate() {
        platform.push_job(json!({"id": format!("ref-{n}"), "input": {"text": sentence}}));
    }
    let pairs = [
        (
            "How do I reset my password?",
            "I forgot my password; how can I change it?",
            "The train leaves the station at noon.",
        ),
        (
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Interest rates rose again this quarter.",
        ),
    ];
    for (n, (a, b, unrelated)) in pairs.iter().enumerate() {
        platform
            .push_job(json!({"id": format!("pair-{n}"), "input": {"texts": [a, b, unrelated]}}));
    }
    let jobs = sentences.len() + pairs.len();
    let _worker = WorkerProcess::start(
        &platform,
        Sample::Embed,
        &["--concurrency", "2", "--handler-config", &config],
        &[],
    );
    let requests = platform.wait_for(WAIT, "every embedding job's result", |r| {
        results_by_id(r).len() >= jobs
    });
    let by_id = results_by_id(&requests);
    for (n, want) in want.iter().enumerate() {
        let body = &by_id[&format!("ref-{n}")];
        assert_close(&embeddings(&body["output"]), std::slice::from_ref(want));
    }
    for n in 0..pairs.len() {
        let got = embeddings(&by_id[&format!("pair-{n}")]["output"]);
        let paraphrase = cosine(&got[0], &got[1]);
        let unrelated = cosine(&got[0], &got[2]).max(cosine(&got[1], &got[2]));
        assert!(
            paraphrase > 0.6 && unrelated < 0.2 && paraphrase - unrelated > 0.5,
            "pair {n}: paraphrase cosine {paraphrase}, unrelated {unrelated}"
        );
    }
}

/// The dev API serves the model: `/runsync` answers the reference embeddings, the same request
/// twice answers the same vectors, and bad inputs fail with their reason.
#[test]
fn dev_api_serves_embeddings_and_refuses_bad_input() {
    let Some((_, config)) = model("the embed dev API test") else {
        return;
    };
    let (sentences, want) = reference();
    let api = e2e::dev_api::DevApi::start(Sample::Embed, &["--handler-config", &config]);
    let http = reqwest::blocking::Client::new();
    let runsync = |input: Value| -> Value {
        http.post(api.url("/runsync"))
            .json(&json!({ "input": input }))
            .timeout(WAIT)
            .send()
            .and_then(|reply| reply.json())
            .expect("/runsync answers JSON")
    };
    let first = runsync(json!({ "texts": sentences }));
    assert_eq!(first["status"], "COMPLETED", "{first}");
    assert_close(&embeddings(&first["output"]), &want);
    let second = runsync(json!({ "texts": sentences }));
    assert_eq!(first["output"], second["output"]);

    let long_text = "word ".repeat(300);
    for (input, reason) in [
        (json!({ "texts": [] }), "no text to embed"),
        (json!({}), "no text to embed"),
        (json!({ "text": "a", "texts": ["b"] }), "not both"),
        (json!({ "texts": ["fine", "  "] }), "text 1 is empty"),
        (
            json!({ "text": long_text }),
            "text 0 is 302 tokens long; the model reads at most 256",
        ),
        (
            json!({ "texts": vec!["a"; 129] }),
            "129 texts in one job; at most 128",
        ),
    ] {
        let reply = runsync(input.clone());
        assert_eq!(reply["status"], "FAILED", "{input}: {reply}");
        let error: Value = serde_json::from_str(reply["error"].as_str().unwrap()).unwrap();
        assert_eq!(error["error_type"], "ValueError", "{input}: {error}");
        let message = error["error_message"].as_str().unwrap();
        assert!(message.contains(reason), "{input}: {message}");
    }
}

/// A one-shot run refuses an empty batch with a sentence saying what to send, exit 1.
#[test]
fn one_shot_refuses_an_empty_batch() {
    let Some((_, config)) = model("the embed empty-input test") else {
        return;
    };
    let run = one_shot(&config, json!({ "texts": [] }));
    assert_eq!(run.code, Some(1));
    assert!(
        one_shot_error(&run).contains("no text to embed: give {\"texts\""),
        "{}",
        run.stdout
    );
}

/// A model directory without the model fails `init` (exit 8) with a sentence naming the missing
/// file and the script that fetches it; one with a broken config.json names that file. No model
/// is needed for this test.
#[test]
fn a_bad_model_directory_fails_init_with_a_sentence() {
    let empty = tempfile::tempdir().expect("a temporary directory");
    let run = one_shot(&embed::config(empty.path()), json!({ "text": "hello" }));
    assert_eq!(run.code, Some(8), "stderr: {}", run.stderr);
    let config_path = empty.path().join("config.json");
    assert!(
        run.stderr
            .contains(&format!("cannot read {}", config_path.display()))
            && run.stderr.contains("sample-handlers/embed/fetch-model.sh"),
        "{}",
        run.stderr
    );

    std::fs::write(&config_path, "{\"hidden_size\": 384}").unwrap();
    let run = one_shot(&embed::config(empty.path()), json!({ "text": "hello" }));
    assert_eq!(run.code, Some(8), "stderr: {}", run.stderr);
    assert!(
        run.stderr
            .contains("is not a BERT config.json: missing field"),
        "{}",
        run.stderr
    );
}
