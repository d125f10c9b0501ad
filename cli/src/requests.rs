//! Asking for access and deciding: `request` (with `--wait`), `status`, `list`, `approve`,
//! `deny`, `cancel`, `revoke`, `extend`, `evaluate` and `whoami`.

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};

use crate::api::{Api, Failure, encode};
use crate::show::{self, Format};

/// What `portcullis request` sends.
pub struct Ask {
    pub policy: String,
    pub ports: Vec<u16>,
    pub duration: String,
    pub reason: String,
    pub source: Option<String>,
}

/// States a request does not leave by waiting.
const SETTLED: [&str; 8] = ["active", "expired", "revoked", "denied", "cancelled", "timed_out", "failed", "revoking"];

/// `POST /api/requests`, then with `wait` until it is active or decided (or, with a limit,
/// until that much time has passed).
pub fn request(api: &Api, format: Format, ask: Ask, wait: Option<Option<Duration>>) -> Result<(), Failure> {
    let mut body =
        json!({"policy": ask.policy, "ports": ask.ports, "duration": ask.duration, "justification": ask.reason});
    if let Some(source) = ask.source {
        body["source"] = json!(source);
    }
    let created = api.call("POST", "/api/requests", Some(&body))?;
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    let settled = match wait {
        Some(limit) => {
            // Whatever happens while waiting, the request exists: say which it is first.
            eprintln!("Request {id} is {}.", created["state"].as_str().unwrap_or("created"));
            wait_for(api, &id, format, limit)?
        }
        None => created,
    };
    if !show::machine(format, &settled) {
        println!("{}", show::request(&settled, Utc::now()));
    }
    match settled["state"].as_str() {
        Some("denied" | "cancelled" | "timed_out" | "failed") => {
            Err(Failure::Local(format!("request {id} is {}", settled["state"].as_str().unwrap_or_default())))
        }
        _ => Ok(()),
    }
}

/// Polls a request until it settles, with a spinner for people; the server or the network
/// failing for a while only slows the polling down. Ctrl-C ends the waiting (the process),
/// never the request.
fn wait_for(api: &Api, id: &str, format: Format, limit: Option<Duration>) -> Result<Value, Failure> {
    let spinner = indicatif::ProgressBar::new_spinner();
    if format != Format::Table {
        spinner.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    spinner.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let mut pause = Duration::from_secs(1);
    loop {
        if limit.is_some_and(|limit| started.elapsed() >= limit) {
            spinner.finish_and_clear();
            return Err(Failure::Local(format!("request {id} is still waiting; it stays (portcullis status {id})")));
        }
        let request = match api.call("GET", &format!("/api/requests/{}", encode(id)), None) {
            Ok(request) => request,
            Err(failure) if failure.is_transient() => {
                spinner.set_message(format!("{failure}; trying again in {} s", pause.as_secs()));
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(30));
                continue;
            }
            Err(failure) => return Err(failure),
        };
        pause = Duration::from_secs(1);
        let state = request["state"].as_str().unwrap_or_default();
        if SETTLED.contains(&state) {
            spinner.finish_and_clear();
            return Ok(request);
        }
        let approvals = request["approvals"].as_array().map_or(0, Vec::len);
        spinner.set_message(format!(
            "request {id} is {state} ({approvals} approval{}), {} s; Ctrl-C stops waiting, the request stays",
            if approvals == 1 { "" } else { "s" },
            started.elapsed().as_secs()
        ));
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// One request, or the caller's open ones.
pub fn status(api: &Api, format: Format, id: Option<&str>) -> Result<(), Failure> {
    match id {
        Some(id) => {
            let request = api.call("GET", &format!("/api/requests/{}", encode(id)), None)?;
            if !show::machine(format, &request) {
                println!("{}", show::request(&request, Utc::now()));
            }
            Ok(())
        }
        None => {
            let mine = api.call("GET", "/api/requests?mine=true", None)?;
            let open: Vec<Value> = mine["requests"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| matches!(r["state"].as_str(), Some("pending" | "approved" | "active" | "revoking")))
                .cloned()
                .collect();
            if !show::machine(format, &json!({"requests": open})) {
                println!(
                    "{}",
                    if open.is_empty() { "Nothing open.".to_owned() } else { show::requests(&open, Utc::now()) }
                );
            }
            Ok(())
        }
    }
}

/// `GET /api/requests` with its filters.
pub fn list(api: &Api, format: Format, mine: bool, awaiting_me: bool, state: Option<&str>) -> Result<(), Failure> {
    let mut query = vec![];
    if mine {
        query.push("mine=true".to_owned());
    }
    if awaiting_me {
        query.push("awaiting=me".to_owned());
    }
    if let Some(state) = state {
        query.push(format!("state={}", encode(state)));
    }
    let path = if query.is_empty() { "/api/requests".to_owned() } else { format!("/api/requests?{}", query.join("&")) };
    let answer = api.call("GET", &path, None)?;
    if !show::machine(format, &answer) {
        let list = answer["requests"].as_array().cloned().unwrap_or_default();
        println!("{}", if list.is_empty() { "No requests.".to_owned() } else { show::requests(&list, Utc::now()) });
    }
    Ok(())
}

/// A decision on a request: `approve`, `deny`, `cancel`, `revoke` or `extend`.
pub fn decide(api: &Api, format: Format, id: &str, action: &str, body: Value) -> Result<(), Failure> {
    let answer = api.call("POST", &format!("/api/requests/{}/{action}", encode(id)), Some(&body))?;
    if !show::machine(format, &answer) {
        println!("{}", show::request(&answer, Utc::now()));
    }
    Ok(())
}

/// The dry run: would this request be allowed, and approved at once?
pub fn evaluate(
    api: &Api,
    format: Format,
    policy: &str,
    principal: &str,
    groups: &[String],
    request: Value,
) -> Result<(), Failure> {
    let body = json!({"principal": principal, "groups": groups, "request": request});
    let answer = api.call("POST", &format!("/api/policies/{}/evaluate", encode(policy)), Some(&body))?;
    if !show::machine(format, &answer) {
        let verdict = match (answer["allowed"].as_bool(), answer["auto_approved"].as_bool()) {
            (Some(false), _) => format!(
                "refused: {} ({})",
                answer["reason"].as_str().unwrap_or_default(),
                answer["code"].as_str().unwrap_or_default()
            ),
            (_, Some(true)) => format!("allowed, approved at once by rule {}", answer["rule"].as_str().unwrap_or("-")),
            _ => format!("allowed, needs {} approval(s)", answer["required_approvals"].as_u64().unwrap_or(1)),
        };
        println!("{verdict}");
        for rule in answer["rules"].as_array().into_iter().flatten() {
            let why = rule["why_not"].as_str().map_or("matches".to_owned(), |w| format!("no: {w}"));
            println!("  rule {}: {why}", rule["rule"].as_str().unwrap_or("?"));
        }
    }
    // A request the policy would refuse exits as a refused one would.
    match answer["allowed"].as_bool() {
        Some(false) => Err(Failure::Local("the policy would refuse this request".into())),
        _ => Ok(()),
    }
}

/// Who the credential names.
pub fn whoami(api: &Api, format: Format) -> Result<(), Failure> {
    let me = api.call("GET", "/api/whoami", None)?;
    if !show::machine(format, &me) {
        let list = |key: &str| {
            me[key].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", ")
        };
        println!("{}", me["principal"].as_str().unwrap_or_default());
        println!("roles    {}", list("roles"));
        println!("groups   {}", list("groups"));
        println!("address  {}", me["address"].as_str().unwrap_or("unknown"));
    }
    Ok(())
}
