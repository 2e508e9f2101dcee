//! Keeps the local dev API's OpenAPI document (`worker-host/src/dev_api/openapi.json`) true to
//! the server it describes:
//! - `GET /openapi.json` serves exactly that file, as JSON, without an API key;
//! - the document lists exactly the routes of the wire spec, each with the answers the spec gives
//!   it, and only schema keywords the validator below checks;
//! - every documented operation, exercised on the real `worker-host --rp_serve_api` both under
//!   `/v2/{endpoint_id}` and without that prefix, answers a status the document lists for it, as
//!   JSON, with a body that validates against the documented schema;
//! - the documented errors that are cheap to provoke (400, 401, 404, 413) are provoked and
//!   validated the same way, and so are a retried failed job and a cancelled running one;
//! - a job request the document's schema accepts is accepted by the server, and one it refuses is
//!   answered 400.
//!
//! Schemas are checked by a small validator for the JSON Schema subset the document uses. It
//! refuses any keyword it does not know, so the document cannot use one these tests would ignore.

use e2e::dev_api::DevApi;
use e2e::Sample;
use reqwest::blocking::Client;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The document, as the server embeds it.
const DOCUMENT: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../worker-host/src/dev_api/openapi.json"
));

/// The routes of the wire spec (method, documented path) and every status the spec says each can
/// answer when the host runs with `--api-key`. The document must list exactly these.
const ROUTES: &[(&str, &str, &[u16])] = &[
    ("post", "/v2/{endpoint_id}/run", &[200, 400, 401, 413, 503]),
    (
        "post",
        "/v2/{endpoint_id}/runsync",
        &[200, 400, 401, 413, 503],
    ),
    (
        "get",
        "/v2/{endpoint_id}/status/{job_id}",
        &[200, 400, 401, 404],
    ),
    (
        "post",
        "/v2/{endpoint_id}/status/{job_id}",
        &[200, 400, 401, 404],
    ),
    (
        "get",
        "/v2/{endpoint_id}/stream/{job_id}",
        &[200, 400, 401, 404],
    ),
    (
        "post",
        "/v2/{endpoint_id}/stream/{job_id}",
        &[200, 400, 401, 404],
    ),
    (
        "post",
        "/v2/{endpoint_id}/cancel/{job_id}",
        &[200, 400, 401, 404],
    ),
    (
        "post",
        "/v2/{endpoint_id}/retry/{job_id}",
        &[200, 400, 401, 404, 409, 503],
    ),
    ("get", "/v2/{endpoint_id}/health", &[200, 401]),
    ("post", "/v2/{endpoint_id}/purge-queue", &[200, 401]),
    ("get", "/openapi.json", &[200]),
    ("get", "/ping", &[200, 204, 503]),
    ("get", "/metrics", &[200, 401]),
];

/// The routes that need no key: the description and the health check.
const OPEN_ROUTES: [&str; 2] = ["/openapi.json", "/ping"];

/// The prefix every route but `/openapi.json` is documented under.
const PREFIX: &str = "/v2/{endpoint_id}";

/// The endpoint id the tests use: any is accepted.
const ENDPOINT_ID: &str = "ep-doc";

/// The API key of the host started with `--api-key`.
const KEY: &str = "k1";

/// The largest body /run and /runsync accept, in bytes.
const RUN_LIMIT: usize = 10 * 1024 * 1024;
const RUNSYNC_LIMIT: usize = 20 * 1024 * 1024;

/// How long a job may take to reach a state the test waits for.
const WAIT: Duration = Duration::from_secs(20);

/// The keywords the validator checks.
const CHECKED_KEYWORDS: &[&str] = &[
    "$ref",
    "type",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "not",
];

/// The keywords that only annotate a schema: the validator skips them.
const ANNOTATIONS: &[&str] = &["description", "title", "format", "default", "example"];

/// The document, parsed.
fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("openapi.json is valid JSON")
}

/// What `$ref` points to (a `#/...` reference into the document); panics if it resolves to
/// nothing. Anything that is not a reference is returned as it is.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{reference} is not a reference into the document"));
            resolve(
                doc,
                doc.pointer(pointer)
                    .unwrap_or_else(|| panic!("{reference} points to nothing in the document")),
            )
        }
        None => value,
    }
}

/// Checks `value` against `schema` (within `doc`, for `$ref`s); the error names where the value
/// fails (`at`, a JSONPath-like trail) and why.
fn validate(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let rules = schema
        .as_object()
        .ok_or_else(|| format!("{at}: the schema {schema} is not an object"))?;
    for (keyword, rule) in rules {
        match keyword.as_str() {
            "$ref" => validate(doc, resolve(doc, schema), value, at)?,
            "type" => {
                // One type, or a list of them (any may match).
                let wanted: Vec<&str> = match rule {
                    Value::String(one) => vec![one.as_str()],
                    Value::Array(list) => list.iter().filter_map(Value::as_str).collect(),
                    _ => Vec::new(),
                };
                if wanted.is_empty() {
                    return Err(format!("{at}: unsupported type {rule}"));
                }
                if !wanted.iter().any(|wanted| has_type(value, wanted)) {
                    return Err(format!("{at}: {value} is not of type {rule}"));
                }
            }
            "enum" => {
                let allowed = rule.as_array().ok_or("enum is not an array")?;
                if !allowed.contains(value) {
                    return Err(format!("{at}: {value} is not one of {rule}"));
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in rule.as_array().ok_or("required is not an array")? {
                        let name = name.as_str().ok_or("required holds a non-string")?;
                        if !object.contains_key(name) {
                            return Err(format!("{at}: the required key {name} is missing"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(object) = value.as_object() {
                    let properties = rule.as_object().ok_or("properties is not an object")?;
                    for (name, property) in properties {
                        if let Some(member) = object.get(name) {
                            validate(doc, property, member, &format!("{at}.{name}"))?;
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = rules.get("properties").and_then(Value::as_object);
                    for (name, member) in object {
                        if known.is_some_and(|known| known.contains_key(name)) {
                            continue;
                        }
                        match rule {
                            Value::Bool(true) => {}
                            Value::Bool(false) => {
                                return Err(format!("{at}: the key {name} is not documented"))
                            }
                            extra => validate(doc, extra, member, &format!("{at}.{name}"))?,
                        }
                    }
                }
            }
            "items" => {
                if let Some(items) = value.as_array() {
                    for (index, item) in items.iter().enumerate() {
                        validate(doc, rule, item, &format!("{at}[{index}]"))?;
                    }
                }
            }
            "minimum" | "maximum" => {
                if let (Some(number), Some(bound)) = (value.as_f64(), rule.as_f64()) {
                    let outside = if keyword == "minimum" {
                        number < bound
                    } else {
                        number > bound
                    };
                    if outside {
                        return Err(format!("{at}: {value} is outside its {keyword} {rule}"));
                    }
                }
            }
            "not" => {
                if validate(doc, rule, value, at).is_ok() {
                    return Err(format!("{at}: {value} matches {rule}, which it must not"));
                }
            }
            annotation if ANNOTATIONS.contains(&annotation) => {}
            unknown => return Err(format!("{at}: the validator does not know {unknown}")),
        }
    }
    Ok(())
}

/// Whether `value` is of the JSON Schema type `wanted`.
fn has_type(value: &Value, wanted: &str) -> bool {
    match wanted {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|n| n.fract() == 0.0)
        }
        _ => false,
    }
}

/// Walks a schema and everything it contains, checking that it uses only keywords the validator
/// knows and that its references resolve.
fn check_keywords(doc: &Value, schema: &Value, at: &str) {
    let rules = schema
        .as_object()
        .unwrap_or_else(|| panic!("{at}: the schema {schema} is not an object"));
    for (keyword, rule) in rules {
        assert!(
            CHECKED_KEYWORDS.contains(&keyword.as_str()) || ANNOTATIONS.contains(&keyword.as_str()),
            "{at} uses the keyword {keyword}, which the validator does not check"
        );
        match keyword.as_str() {
            "$ref" => {
                resolve(doc, schema);
            }
            "properties" => {
                for (name, property) in rule.as_object().expect("properties is an object") {
                    check_keywords(doc, property, &format!("{at}.{name}"));
                }
            }
            "items" | "not" => check_keywords(doc, rule, &format!("{at}/{keyword}")),
            "additionalProperties" if rule.is_object() => {
                check_keywords(doc, rule, &format!("{at}/additionalProperties"))
            }
            _ => {}
        }
    }
}

/// One operation of the document.
#[derive(Debug, Clone)]
struct Operation {
    /// Lower case, as the document spells it.
    method: String,
    /// The documented path, with its `{endpoint_id}` and `{job_id}` templates.
    path: String,
    /// The operation object.
    spec: Value,
}

impl Operation {
    /// `METHOD /path`, for messages.
    fn name(&self) -> String {
        format!("{} {}", self.method.to_uppercase(), self.path)
    }

    /// Whether the path names a job.
    fn takes_job(&self) -> bool {
        self.path.contains("{job_id}")
    }

    /// Whether the document says the operation needs the API key: its own `security`, or the
    /// document's when it has none, lists a requirement.
    fn needs_key(&self, doc: &Value) -> bool {
        let security = self.spec.get("security").unwrap_or(&doc["security"]);
        security.as_array().is_some_and(|list| !list.is_empty())
    }

    /// The documented statuses.
    fn statuses(&self) -> BTreeSet<u16> {
        self.spec["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{} has no responses", self.name()))
            .keys()
            .map(|code| {
                code.parse().unwrap_or_else(|_| {
                    panic!("{}: the response key {code} is no status", self.name())
                })
            })
            .collect()
    }

    /// The request path in both forms, for `job_id`: the documented one (with an endpoint id),
    /// then the same route without the `/v2/{endpoint_id}` prefix (or, for a route documented
    /// without it, with it).
    fn request_paths(&self, job_id: &str) -> [String; 2] {
        let path = self.path.replace("{job_id}", job_id);
        let prefix = format!("/v2/{ENDPOINT_ID}");
        match path.strip_prefix(PREFIX) {
            Some(bare) => [format!("{prefix}{bare}"), bare.to_owned()],
            None => [path.clone(), format!("{prefix}{path}")],
        }
    }

    /// The query string of the documented query parameters, each set to its example.
    fn query(&self, doc: &Value) -> String {
        let pairs: Vec<String> = self.spec["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|parameter| resolve(doc, parameter))
            .filter(|parameter| parameter["in"] == "query")
            .map(|parameter| {
                let example = &parameter["example"];
                assert!(
                    !example.is_null(),
                    "{}: the query parameter {} has no example",
                    self.name(),
                    parameter["name"]
                );
                let value = match example {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                format!("{}={value}", parameter["name"].as_str().unwrap())
            })
            .collect();
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }

    /// The schema of the JSON request body, if the operation documents one.
    fn request_schema<'a>(&'a self, doc: &'a Value) -> Option<&'a Value> {
        let body = resolve(doc, self.spec.get("requestBody")?);
        Some(&body["content"]["application/json"]["schema"])
    }

    /// The documented answer for `status` (references resolved), if any.
    fn response<'a>(&'a self, doc: &'a Value, status: u16) -> Option<&'a Value> {
        let response = self.spec["responses"].get(status.to_string())?;
        Some(resolve(doc, response))
    }
}

/// Every operation in the document, in document order.
fn operations(doc: &Value) -> Vec<Operation> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    let mut operations = Vec::new();
    for (path, item) in paths {
        for (method, spec) in item.as_object().expect("a path item is an object") {
            if [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ]
            .contains(&method.as_str())
            {
                operations.push(Operation {
                    method: method.clone(),
                    path: path.clone(),
                    spec: spec.clone(),
                });
            }
        }
    }
    operations
}

/// The operation documented for `method` and `path`.
fn operation(doc: &Value, method: &str, path: &str) -> Operation {
    operations(doc)
        .into_iter()
        .find(|operation| operation.method == method && operation.path == path)
        .unwrap_or_else(|| panic!("the document has no {method} {path}"))
}

/// One HTTP answer, its body as text.
#[derive(Debug)]
struct Answer {
    /// `METHOD URL`, for messages.
    request: String,
    status: u16,
    /// The media type of `Content-Type`, without parameters; empty when there is none.
    media_type: String,
    body: String,
}

impl Answer {
    /// The body parsed as JSON.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answered {} with a body that is not JSON ({e}): {}",
                self.request, self.status, self.body
            )
        })
    }
}

/// A client that waits long enough for `/runsync` and `/stream` to answer.
fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a reqwest client")
}

/// Sends one request; a JSON body goes with `Content-Type: application/json`, a key as
/// `Authorization: Bearer KEY`.
fn call(
    client: &Client,
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    key: Option<&str>,
) -> Answer {
    let verb = Method::from_bytes(method.to_uppercase().as_bytes()).expect("an HTTP method");
    let request = format!("{verb} {url}");
    let mut builder = client.request(verb, url);
    if let Some(body) = body {
        builder = builder
            .header("content-type", "application/json")
            .body(body);
    }
    if let Some(key) = key {
        builder = builder.bearer_auth(key);
    }
    let response = builder
        .send()
        .unwrap_or_else(|e| panic!("{request} got no answer: {e}"));
    let status = response.status().as_u16();
    let media_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let body = response
        .text()
        .unwrap_or_else(|e| panic!("{request}: the body could not be read: {e}"));
    Answer {
        request,
        status,
        media_type,
        body,
    }
}

/// Checks an answer against the document: its status is one the operation lists, its media type
/// is the one documented for that status, and its body validates against the documented schema.
/// Returns the body.
fn check(doc: &Value, operation: &Operation, answer: &Answer) -> Value {
    let response = operation.response(doc, answer.status).unwrap_or_else(|| {
        panic!(
            "{} answered {}, which the document does not list for {} (it lists {:?}); body: {}",
            answer.request,
            answer.status,
            operation.name(),
            operation.statuses(),
            answer.body
        )
    });
    if answer.status == 204 {
        assert!(
            answer.body.is_empty(),
            "{}: a 204 with a body",
            answer.request
        );
        return Value::Null;
    }
    let content = response["content"].as_object().unwrap_or_else(|| {
        panic!(
            "{}: the {} answer documents no content",
            operation.name(),
            answer.status
        )
    });
    let media = content.get(&answer.media_type).unwrap_or_else(|| {
        panic!(
            "{} answered {} with Content-Type {:?}, but the document gives {:?}; body: {}",
            answer.request,
            answer.status,
            answer.media_type,
            content.keys().collect::<Vec<_>>(),
            answer.body
        )
    });
    if !answer.media_type.ends_with("json") {
        // Text (the metrics): its media type was checked above.
        assert_eq!(media["schema"]["type"], "string", "{}", answer.request);
        return Value::String(answer.body.clone());
    }
    let body = answer.json();
    if let Err(problem) = validate(doc, &media["schema"], &body, "$") {
        panic!(
            "{} answered {} with a body that does not match the documented schema: {problem}; body: {}",
            answer.request, answer.status, answer.body
        );
    }
    body
}

/// A valid job request: the document's schema must accept it.
fn valid_request() -> Value {
    json!({
        "input": {"x": 1},
        "policy": {"executionTimeout": 60000, "ttl": 600000, "lowPriority": false},
        "s3Config": {},
        "extra": "passed through"
    })
}

/// Submits `{"input": input}` with `/run` and returns the job's id.
fn submit(client: &Client, api: &DevApi, key: Option<&str>, input: Value) -> String {
    let body = serde_json::to_vec(&json!({ "input": input })).unwrap();
    let answer = call(client, "post", &api.url("/run"), Some(body), key);
    assert_eq!(answer.status, 200, "/run refused the job: {}", answer.body);
    answer.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("/run answered no id: {}", answer.body))
        .to_owned()
}

/// Polls `/status/{id}` until the job's status is `wanted`; returns the last answer. Panics
/// with the last status object if that does not happen within [`WAIT`].
fn wait_for_status(client: &Client, api: &DevApi, id: &str, wanted: &str) -> Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = call(
            client,
            "get",
            &api.url(&format!("/status/{id}")),
            None,
            None,
        );
        if answer.status == 200 && answer.json()["status"] == wanted {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not become {wanted} within {WAIT:?}; last answer {}: {}",
            answer.status,
            answer.body
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The URL and body to send `operation` to `api` with, at the request path `form` (0: as
/// documented, 1: the other form): on a fresh echo job (submitted with `key`) where it names one,
/// with a valid job request where it takes a body, with each query parameter at its example.
fn prepare(
    client: &Client,
    api: &DevApi,
    doc: &Value,
    operation: &Operation,
    form: usize,
    key: Option<&str>,
) -> (String, Option<Vec<u8>>) {
    let job_id = if operation.takes_job() {
        submit(client, api, key, json!({"x": 1}))
    } else {
        String::new()
    };
    let path = &operation.request_paths(&job_id)[form];
    let url = api.url(&format!("{path}{}", operation.query(doc)));
    let body = operation
        .request_schema(doc)
        .map(|_| serde_json::to_vec(&valid_request()).unwrap());
    (url, body)
}

/// Sends `operation` as [`prepare`] builds it, with `key`.
fn exercise(
    client: &Client,
    api: &DevApi,
    doc: &Value,
    operation: &Operation,
    form: usize,
    key: Option<&str>,
) -> Answer {
    let (url, body) = prepare(client, api, doc, operation, form, key);
    call(client, &operation.method, &url, body, key)
}

/// A job-request body of exactly `size` bytes: `{"input":"aaa…"}`.
fn body_of_size(size: usize) -> Vec<u8> {
    let frame = br#"{"input":""}"#.len();
    let mut body = br#"{"input":""#.to_vec();
    body.resize(size - 2, b'a');
    body.extend_from_slice(br#""}"#);
    assert!(size > frame && body.len() == size);
    body
}

/// `/openapi.json` serves the file on disk, as JSON (with a key set, exactly; without one, with
/// no security requirement).
#[test]
fn serves_the_document_on_disk() {
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    let answer = call(&client, "get", &api.url("/openapi.json"), None, None);
    assert_eq!(answer.status, 200, "/openapi.json: {}", answer.body);
    assert_eq!(
        answer.media_type, "application/json",
        "/openapi.json's Content-Type"
    );
    // Without --api-key no route asks for a key, and the description says so.
    let mut expected = document();
    expected["security"] = json!([]);
    assert!(
        answer.json() == expected,
        "/openapi.json does not serve worker-host/src/dev_api/openapi.json (without its security \
         requirement, as no key is set); it served: {}",
        answer.body
    );
}

/// The document lists exactly the spec's routes with the statuses the spec gives each, describes
/// every answer as JSON with a schema, uses bearer auth everywhere but on `/openapi.json`, and
/// uses only schema keywords the validator checks.
#[test]
fn the_document_lists_exactly_the_spec_routes() {
    let doc = document();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "worker-host local dev API");
    assert_eq!(doc["info"]["version"], "0.1.0");
    let description = doc["info"]["description"].as_str().unwrap_or_default();
    assert!(
        description.contains("without the `/v2/{endpoint_id}` prefix")
            && description.contains("--api-key"),
        "info.description must say every route is also served without the prefix and that auth \
         applies only with --api-key: {description}"
    );

    let documented: BTreeSet<(String, String, BTreeSet<u16>)> = operations(&doc)
        .into_iter()
        .map(|operation| {
            let statuses = operation.statuses();
            (operation.method, operation.path, statuses)
        })
        .collect();
    let spec: BTreeSet<(String, String, BTreeSet<u16>)> = ROUTES
        .iter()
        .map(|(method, path, statuses)| {
            (
                method.to_string(),
                path.to_string(),
                statuses.iter().copied().collect(),
            )
        })
        .collect();
    assert_eq!(
        documented, spec,
        "the document's routes and statuses differ from the spec's"
    );

    assert_eq!(doc["security"], json!([{"bearerAuth": []}]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["type"],
        "http"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    let mut ids = BTreeSet::new();
    for operation in operations(&doc) {
        let name = operation.name();
        let id = operation.spec["operationId"].as_str().unwrap_or_default();
        assert!(
            ids.insert(id.to_owned()),
            "{name}: operationId {id:?} is missing or repeated"
        );
        assert_eq!(
            operation.needs_key(&doc),
            !OPEN_ROUTES.contains(&operation.path.as_str()),
            "{name}: only {OPEN_ROUTES:?} may be open"
        );
        for status in operation.statuses() {
            let response = operation.response(&doc, status).unwrap();
            if status == 204 {
                assert!(
                    response.get("content").is_none(),
                    "{name}: a 204 has no content"
                );
                continue;
            }
            if operation.path == "/metrics" && status == 200 {
                assert_eq!(
                    response["content"]["application/openmetrics-text"]["schema"]["type"], "string",
                    "{name}: the metrics are OpenMetrics text"
                );
                continue;
            }
            let schema = &response["content"]["application/json"]["schema"];
            assert!(
                schema.is_object(),
                "{name}: the {status} answer has no JSON schema"
            );
            check_keywords(&doc, schema, &format!("{name} {status}"));
        }
        if let Some(schema) = operation.request_schema(&doc) {
            check_keywords(&doc, schema, &format!("{name} request"));
        }
        for parameter in operation.spec["parameters"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let parameter = resolve(&doc, parameter);
            check_keywords(
                &doc,
                &parameter["schema"],
                &format!("{name} {}", parameter["name"]),
            );
        }
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        check_keywords(&doc, schema, name);
    }
    let request = operation(&doc, "post", "/v2/{endpoint_id}/run");
    let schema = request.request_schema(&doc).unwrap();
    validate(&doc, schema, &valid_request(), "$")
        .unwrap_or_else(|problem| panic!("the test's valid job request is not valid: {problem}"));
}

/// The validator refuses what the document's schemas refuse, so a passing check means something.
#[test]
fn the_validator_refuses_what_the_schemas_refuse() {
    let doc = document();
    let schema = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let health = json!({
        "jobs": {"completed": 1, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0},
        "workers": {"idle": 1, "running": 0}
    });
    let cases = [
        ("Health", health.clone(), true),
        ("Health", json!({"jobs": health["jobs"].clone()}), false),
        (
            "Health",
            json!({"jobs": health["jobs"].clone(), "workers": {"idle": 2, "running": 0}}),
            false,
        ),
        (
            "Health",
            json!({"jobs": health["jobs"].clone(), "workers": {"idle": 1, "running": 0.5}}),
            false,
        ),
        (
            "JobStatus",
            json!({"id": "j", "status": "COMPLETED", "output": null}),
            true,
        ),
        ("JobStatus", json!({"id": "j", "status": "DONE"}), false),
        ("JobStatus", json!({"status": "COMPLETED"}), false),
        (
            "JobStatus",
            json!({"id": "j", "status": "IN_QUEUE", "extra": 1}),
            false,
        ),
        (
            "JobStatus",
            json!({"id": "j", "status": "FAILED", "error": {"message": "x"}}),
            false,
        ),
        (
            "StreamAnswer",
            json!({"id": "j", "status": "COMPLETED", "stream": [{"output": 1}]}),
            true,
        ),
        (
            "StreamAnswer",
            json!({"id": "j", "status": "COMPLETED", "stream": [{"chunk": 1}]}),
            false,
        ),
        ("Error", json!({"error": "x"}), true),
        ("Error", json!({"message": "x"}), false),
        ("JobRequest", json!({"input": false, "anything": 1}), true),
        ("JobRequest", json!({"input": null}), false),
        (
            "JobRequest",
            json!({"input": 1, "policy": {"executionTimeout": 1e12}}),
            false,
        ),
    ];
    for (name, value, valid) in cases {
        let outcome = validate(&doc, &schema(name), &value, "$");
        assert_eq!(outcome.is_ok(), valid, "{name} {value}: {outcome:?}");
    }
}

/// Every documented operation, with and without the `/v2/{endpoint_id}` prefix, answers as
/// documented: 200 (409 for retrying a job that did not fail) with a body of the documented
/// schema.
#[test]
fn every_operation_answers_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    for operation in operations(&doc) {
        for form in 0..2 {
            let answer = exercise(&client, &api, &doc, &operation, form, None);
            check(&doc, &operation, &answer);
            let expected = if operation.path.contains("/retry/") {
                409
            } else {
                200
            };
            assert_eq!(
                answer.status, expected,
                "{} answered {}: {}",
                answer.request, answer.status, answer.body
            );
        }
    }
}

/// Requests the spec refuses with 400 are answered so, with the documented error body: a null
/// input, a body that is not JSON, and a `wait` that is not a whole number.
#[test]
fn bad_requests_answer_400_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    let runsync = operation(&doc, "post", "/v2/{endpoint_id}/runsync");
    for wait in ["abc", "-5"] {
        let url = api.url(&format!("{}?wait={wait}", runsync.request_paths("")[1]));
        let body = serde_json::to_vec(&valid_request()).unwrap();
        let answer = call(&client, "post", &url, Some(body), None);
        assert_eq!(answer.status, 400, "{}: {}", answer.request, answer.body);
        check(&doc, &runsync, &answer);
    }
    for path in ["/v2/{endpoint_id}/run", "/v2/{endpoint_id}/runsync"] {
        let operation = operation(&doc, "post", path);
        let url = api.url(&operation.request_paths("")[0]);
        for body in [&br#"{"input": null}"#[..], b"{not json"] {
            let answer = call(&client, "post", &url, Some(body.to_vec()), None);
            assert_eq!(
                answer.status,
                400,
                "{} with {}: {}",
                answer.request,
                String::from_utf8_lossy(body),
                answer.body
            );
            check(&doc, &operation, &answer);
        }
    }
}

/// Unknown job ids are answered 404 `{"error": "request does not exist"}` by every route that
/// names a job.
#[test]
fn unknown_jobs_answer_404_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    for operation in operations(&doc).iter().filter(|o| o.takes_job()) {
        for path in operation.request_paths("no-such-job") {
            let answer = call(&client, &operation.method, &api.url(&path), None, None);
            assert_eq!(answer.status, 404, "{}: {}", answer.request, answer.body);
            let body = check(&doc, operation, &answer);
            assert_eq!(
                body,
                json!({"error": "request does not exist"}),
                "{}",
                answer.request
            );
        }
    }
}

/// A job id that is not UTF-8 once percent-decoded (`%ff`) is answered 400 with the documented
/// error body by every route that names a job.
#[test]
fn undecodable_job_ids_answer_400_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    for operation in operations(&doc).iter().filter(|o| o.takes_job()) {
        for path in operation.request_paths("%ff") {
            let answer = call(&client, &operation.method, &api.url(&path), None, None);
            assert_eq!(answer.status, 400, "{}: {}", answer.request, answer.body);
            check(&doc, operation, &answer);
        }
    }
}

/// A body one byte over the route's limit is answered 413 with the documented error body naming
/// the limit; /run accepts a body of exactly its limit.
#[test]
fn bodies_over_the_limit_answer_413_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    let run = operation(&doc, "post", "/v2/{endpoint_id}/run");
    let url = api.url(&run.request_paths("")[0]);
    let answer = call(&client, "post", &url, Some(body_of_size(RUN_LIMIT)), None);
    assert_eq!(
        answer.status, 200,
        "a /run body of exactly {RUN_LIMIT} bytes: {}",
        answer.body
    );
    check(&doc, &run, &answer);

    for (path, limit) in [
        ("/v2/{endpoint_id}/run", RUN_LIMIT),
        ("/v2/{endpoint_id}/runsync", RUNSYNC_LIMIT),
    ] {
        let operation = operation(&doc, "post", path);
        let url = api.url(&operation.request_paths("")[0]);
        let answer = call(&client, "post", &url, Some(body_of_size(limit + 1)), None);
        assert_eq!(
            answer.status,
            413,
            "{} with {} bytes: {}",
            answer.request,
            limit + 1,
            answer.body
        );
        let body = check(&doc, &operation, &answer);
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(&limit.to_string()),
            "{}: the 413 message does not name the limit {limit}: {message}",
            answer.request
        );
    }
}

/// With `--api-key`, every operation the document secures answers 401 (documented body) without
/// the key and as usual with `Authorization: Bearer KEY`; `/openapi.json` needs no key.
#[test]
fn api_key_is_required_where_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &["--api-key", KEY]);
    let client = client();
    for operation in operations(&doc) {
        for form in 0..2 {
            let (url, body) = prepare(&client, &api, &doc, &operation, form, Some(KEY));
            let without = call(&client, &operation.method, &url, body, None);
            check(&doc, &operation, &without);
            let expected = if operation.needs_key(&doc) { 401 } else { 200 };
            assert_eq!(
                without.status, expected,
                "{} without a key: {}",
                without.request, without.body
            );

            let with = exercise(&client, &api, &doc, &operation, form, Some(KEY));
            check(&doc, &operation, &with);
            assert!(
                with.status == 200 || (with.status == 409 && operation.path.contains("/retry/")),
                "{} with the key answered {}: {}",
                with.request,
                with.status,
                with.body
            );
        }
    }
    let answer = call(&client, "get", &api.url("/openapi.json"), None, None);
    assert_eq!(
        answer.status, 200,
        "/openapi.json without a key: {}",
        answer.body
    );
    assert!(
        answer.json() == document(),
        "/openapi.json served: {}",
        answer.body
    );
}

/// A failed job's status, its retry and the cancelling of a running job answer as documented.
#[test]
fn failed_retried_and_cancelled_jobs_answer_as_documented() {
    let doc = document();
    let api = DevApi::start(Sample::Faulty, &[]);
    let client = client();
    let status = operation(&doc, "get", "/v2/{endpoint_id}/status/{job_id}");
    let retry = operation(&doc, "post", "/v2/{endpoint_id}/retry/{job_id}");
    let cancel = operation(&doc, "post", "/v2/{endpoint_id}/cancel/{job_id}");

    let id = submit(
        &client,
        &api,
        None,
        json!({"mode": "error", "message": "boom"}),
    );
    let failed = wait_for_status(&client, &api, &id, "FAILED");
    let body = check(&doc, &status, &failed);
    assert!(
        body["error"].is_string(),
        "a FAILED job's error: {}",
        failed.body
    );

    let url = api.url(&retry.request_paths(&id)[0]);
    let answer = call(&client, "post", &url, None, None);
    assert_eq!(answer.status, 200, "{}: {}", answer.request, answer.body);
    let body = check(&doc, &retry, &answer);
    assert_eq!(
        body,
        json!({"id": id, "status": "IN_QUEUE"}),
        "{}",
        answer.request
    );

    let id = submit(&client, &api, None, json!({"mode": "sleep", "ms": 30000}));
    wait_for_status(&client, &api, &id, "IN_PROGRESS");
    let url = api.url(&cancel.request_paths(&id)[1]);
    let answer = call(&client, "post", &url, None, None);
    assert_eq!(answer.status, 200, "{}: {}", answer.request, answer.body);
    let body = check(&doc, &cancel, &answer);
    assert_eq!(
        body,
        json!({"id": id, "status": "CANCELLED"}),
        "{}",
        answer.request
    );
}

/// The document's job-request schema agrees with the server: each request it accepts is
/// accepted (200), each it refuses is answered 400. (`webhook` is left out: its http(s) check is
/// a format, which the schema only annotates.)
#[test]
fn job_request_schema_agrees_with_the_server() {
    let doc = document();
    let api = DevApi::start(Sample::Echo, &[]);
    let client = client();
    let run = operation(&doc, "post", "/v2/{endpoint_id}/run");
    let schema = run.request_schema(&doc).unwrap().clone();
    let url = api.url(&run.request_paths("")[0]);
    let requests = [
        json!({"input": 0}),
        json!({"input": {"x": 1}, "other": [1, 2]}),
        json!({"input": null}),
        json!({"inputs": {"x": 1}}),
        json!([{"input": 1}]),
        json!({"input": 1, "policy": 5}),
        json!({"input": 1, "policy": {"executionTimeout": 5000}}),
        json!({"input": 1, "policy": {"executionTimeout": 4999}}),
        json!({"input": 1, "policy": {"executionTimeout": 604800000}}),
        json!({"input": 1, "policy": {"executionTimeout": 604800001}}),
        json!({"input": 1, "policy": {"executionTimeout": "60000"}}),
        json!({"input": 1, "policy": {"ttl": 10000}}),
        json!({"input": 1, "policy": {"ttl": 9999}}),
        json!({"input": 1, "policy": {"ttl": 604800000}}),
        json!({"input": 1, "policy": {"ttl": 604800001}}),
        json!({"input": 1, "policy": {"lowPriority": true}}),
        json!({"input": 1, "policy": {"lowPriority": "yes"}}),
    ];
    for request in requests {
        let documented_valid = validate(&doc, &schema, &request, "$").is_ok();
        let answer = call(
            &client,
            "post",
            &url,
            Some(serde_json::to_vec(&request).unwrap()),
            None,
        );
        check(&doc, &run, &answer);
        assert_eq!(
            answer.status,
            if documented_valid { 200 } else { 400 },
            "{request} is {} by the document's schema, but {} answered {}: {}",
            if documented_valid {
                "accepted"
            } else {
                "refused"
            },
            answer.request,
            answer.status,
            answer.body
        );
    }
}
