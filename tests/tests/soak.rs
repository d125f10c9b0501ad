//! The soak: thousands of full lifecycles through the real components, mixing auto and manual
//! approvals, revokes racing opens, extensions racing expiry, cancels, denials, policy
//! disables and deletes, while the emulator fails a fifth of ARM calls in every way it can and
//! the host fails a share of store reads, writes and swaps. Then, with the faults off and a
//! few sweeps: no allow rule without an active owner, every request ended, the audit chain
//! valid with one activation and at most one close per grant, and no rule ever put for a
//! request that was not approved.
//!
//! Bounded: `SOAK_LIFECYCLES` (default 2000) and `SOAK_SECONDS` (default 900) for the storm;
//! `SOAK_REPORT=<file>` also writes the summary line there.

#[path = "e2e/contract.rs"]
mod contract;
#[path = "e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use portcullis_host::emulator::{DEMO_NSG, DEMO_VM, Fault, FaultKind};
use portcullis_host::host::kv::StoreFaults;
use serde_json::{Value, json};
use support::*;

const POLICIES: [(&str, bool); 4] =
    [("soak-auto-a", true), ("soak-auto-b", true), ("soak-manual-a", false), ("soak-manual-b", false)];
const CONCURRENCY: usize = 12;

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn soak_policy(auto: bool) -> Value {
    let approval = if auto {
        json!({"mode": "auto"})
    } else {
        json!({"mode": "manual", "approvers": ["group:ops"], "required": 1, "pending_timeout": "PT10M"})
    };
    json!({
        "vm": DEMO_VM, "nsg": DEMO_NSG, "private_ip": "10.0.0.4",
        "ports": [
            {"port": 22, "protocol": "tcp", "max_duration": "PT15M", "allowed_sources": ["127.0.0.0/8"]},
            {"port": 3389, "protocol": "tcp", "max_duration": "PT15M", "allowed_sources": ["127.0.0.0/8"]},
        ],
        "approval": approval,
        "quotas": {"per_requester": 10, "per_vm": 1000},
    })
}

/// A fifth of ARM calls fail, spread over every kind of fault the emulator has.
fn storm() -> Vec<Fault> {
    let mut faults = Vec::new();
    let mut add = |method: Option<&'static str>, kind: FaultKind, retry_after: Option<u64>| {
        let mut fault = Fault::of(method, kind, u32::MAX);
        fault.rate = 0.025;
        fault.retry_after = retry_after;
        faults.push(fault);
    };
    add(None, FaultKind::Error { status: 429, code: "RetryableError" }, Some(1));
    add(None, FaultKind::Error { status: 500, code: "InternalServerError" }, None);
    add(None, FaultKind::Error { status: 503, code: "ServiceUnavailable" }, None);
    add(None, FaultKind::Slow(Duration::from_millis(1500)), None);
    add(None, FaultKind::Drop, None);
    add(None, FaultKind::Error { status: 409, code: "AnotherOperationInProgress" }, None);
    add(Some("PUT"), FaultKind::LandThenDrop, None);
    add(Some("DELETE"), FaultKind::LandThenError { status: 500, code: "InternalServerError" }, None);
    // The last two only match their method: weigh them up to a fifth overall.
    for fault in faults.iter_mut().skip(6) {
        fault.rate = 0.05;
    }
    faults
}

/// What the API answered, by status.
type Answers = Mutex<BTreeMap<u16, usize>>;

async fn call(
    world: &World,
    answers: &Answers,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let body = body.map(Value::to_string);
    let (status, value) = world.call(method, path, Some(key), body.as_deref()).await;
    *answers.lock().unwrap().entry(status).or_default() += 1;
    (status, value)
}

/// One lifecycle; which kind comes from `n`.
async fn lifecycle(world: &World, answers: &Answers, keys: &[String], n: usize) {
    let key = keys[n % keys.len()].as_str();
    let (name, _) = POLICIES[n % POLICIES.len()];
    let ports = if n.is_multiple_of(3) { json!([22, 3389]) } else { json!([22]) };
    let body = json!({"policy": name, "ports": ports, "duration": format!("PT{}M", 2 + n % 8), "justification": format!("INC-{n}")});
    let kind = (n / POLICIES.len()) % 4;
    if kind == 0 {
        // A revoke racing the open: the requester revokes whatever of theirs is approved.
        let create = call(world, answers, "POST", "/api/requests", key, Some(&body));
        let revoke = async {
            tokio::time::sleep(Duration::from_millis((n % 7) as u64 * 15)).await;
            let (_, mine) = call(world, answers, "GET", "/api/requests?mine=true&state=approved", key, None).await;
            for request in mine["requests"].as_array().into_iter().flatten().take(1) {
                let path = format!("/api/requests/{}/revoke", request["id"].as_str().unwrap_or_default());
                call(world, answers, "POST", &path, key, Some(&json!({}))).await;
            }
        };
        tokio::join!(create, revoke);
        return;
    }
    let (status, created) = call(world, answers, "POST", "/api/requests", key, Some(&body)).await;
    let Some(id) = created["id"].as_str().filter(|_| status == 201) else { return };
    let at = |action: &str| format!("/api/requests/{id}/{action}");
    match (created["state"].as_str(), kind) {
        (Some("pending"), 1) => {
            call(world, answers, "POST", &at("approve"), BOB, Some(&json!({}))).await;
        }
        (Some("pending"), 2) => {
            call(world, answers, "POST", &at("cancel"), key, Some(&json!({}))).await;
        }
        (Some("pending"), _) => {
            // Approval racing the requester's own revoke.
            let (empty, approve_path) = (json!({}), at("approve"));
            let (other, who) = if n.is_multiple_of(2) { (at("deny"), DAVE) } else { (at("revoke"), key) };
            let approve = call(world, answers, "POST", &approve_path, BOB, Some(&empty));
            let deny_or_revoke = call(world, answers, "POST", &other, who, Some(&empty));
            tokio::join!(approve, deny_or_revoke);
        }
        (_, 1) => {
            // An extension racing expiry (the clock driver ticks meanwhile).
            tokio::time::sleep(Duration::from_millis(200)).await;
            call(world, answers, "POST", &at("extend"), key, Some(&json!({"duration": "PT2M"}))).await;
        }
        (_, 2) => {
            call(world, answers, "POST", &at("revoke"), key, Some(&json!({}))).await;
        }
        _ => {}
    }
}

/// Now and then an admin disables a policy (revoking its grants) and enables it again, or
/// deletes it and puts it back.
async fn admin_churn(world: &World, answers: &Answers, n: usize) {
    let (name, auto) = POLICIES[(n / 100) % POLICIES.len()];
    let path = format!("/api/policies/{name}");
    if n.is_multiple_of(200) {
        call(world, answers, "DELETE", &format!("{path}?revoke=true"), ADMIN, None).await;
    } else {
        let mut disabled = soak_policy(auto);
        disabled["enabled"] = json!(false);
        call(world, answers, "PUT", &format!("{path}?revoke=true"), ADMIN, Some(&disabled)).await;
    }
    call(world, answers, "PUT", &path, ADMIN, Some(&soak_policy(auto))).await;
}

fn requests_in_store(world: &World) -> HashMap<String, Value> {
    world
        .local
        .host
        .dump_store()
        .into_iter()
        .filter_map(|(key, value)| {
            let id = key.strip_prefix("req:")?.to_owned();
            let document: Value = serde_json::from_str(&value).ok()?;
            Some((id, document["doc"].clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_lifecycles_under_faults_leave_no_rule_open() {
    let target = setting("SOAK_LIFECYCLES", 2000) as usize;
    let cap = Duration::from_secs(setting("SOAK_SECONDS", 900));
    let keys: Vec<String> = (0..48).map(|n| format!("soak-key-{n}")).collect();
    let world = World::with_keys(&keys, &[("arm_timeout", "PT1S")]).await;
    let answers = Answers::default();
    for (name, auto) in POLICIES {
        let (status, body) = world.put_policy(name, &soak_policy(auto)).await;
        assert_eq!(status, 201, "{body}");
    }
    for fault in storm() {
        world.inject(fault);
    }
    world.local.host.store().inject(StoreFaults {
        reads: 0.003,
        writes: 0.003,
        swaps: 0.003,
        ..StoreFaults::default()
    });

    let started = Instant::now();
    let storming = AtomicBool::new(true);
    let mut sweeps_during = 0;
    let driver = async {
        // Virtual time runs at a minute per 250 ms, with a sweep each minute, racing everything.
        while storming.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            world.advance_minutes(1);
            let _ = world.local.host.tick().await;
            sweeps_during += 1;
        }
    };
    let completed = std::sync::atomic::AtomicUsize::new(0);
    let lifecycles = async {
        futures_util::stream::iter(0..target)
            .take_while(|_| std::future::ready(started.elapsed() < cap))
            .for_each_concurrent(CONCURRENCY, |n| {
                let (world, answers, keys, completed) = (&world, &answers, &keys, &completed);
                async move {
                    if n > 0 && n.is_multiple_of(100) {
                        admin_churn(world, answers, n).await;
                    }
                    lifecycle(world, answers, keys, n).await;
                    completed.fetch_add(1, Ordering::SeqCst);
                }
            })
            .await;
        storming.store(false, Ordering::SeqCst);
    };
    tokio::join!(driver, lifecycles);
    let storm_time = started.elapsed();
    let completed = completed.into_inner();

    // Faults off; make sure every policy is back, then sweep until everything has settled.
    let arm_faults: Vec<String> =
        world.local.emulator.faults().iter().map(|f| format!("{:?} x{}", f.kind, f.hits)).collect();
    let [reads, writes, swaps, _] = world.local.host.store().injected();
    world.local.emulator.clear_faults();
    world.local.host.store().inject(StoreFaults::default());
    for (name, auto) in POLICIES {
        world.put_policy(name, &soak_policy(auto)).await;
    }
    world.advance_minutes(20);
    let mut sweeps = 0;
    let settled = loop {
        world.tick().await;
        sweeps += 1;
        let open = requests_in_store(&world).values().filter(|r| !is_final(r)).count();
        if (world.jit_rules().is_empty() && open == 0) || sweeps == 120 {
            break open == 0 && world.jit_rules().is_empty();
        }
        world.advance_minutes(1);
    };
    let summary = format!(
        "soak: {completed} lifecycles in {:.1} s ({} sweeps during the storm); ARM faults: {}; store faults: {reads} reads, {writes} writes, {swaps} swaps; answers by status: {:?}; {sweeps} sweeps to converge",
        storm_time.as_secs_f64(),
        sweeps_during,
        arm_faults.join(", "),
        answers.lock().unwrap()
    );
    println!("{summary}");
    // CI prints it (cargo keeps a passing test's output to itself).
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        std::fs::write(path, format!("{summary}\n")).expect("writing the soak report");
    }
    assert_eq!(completed, target, "the storm ran out of time ({cap:?}) before {target} lifecycles");
    let requests = requests_in_store(&world);
    assert!(
        settled,
        "not settled after {sweeps} sweeps: rules {:?}, open requests {:?}",
        world.jit_rules(),
        requests.iter().filter(|(_, r)| !is_final(r)).map(|(id, r)| format!("{id} {}", r["state"])).collect::<Vec<_>>()
    );

    // No rule ever existed for a request that was not approved.
    for call in world.local.emulator.calls() {
        let Some(name) = call.path.rsplit('/').next().filter(|n| n.starts_with("jit-") && !n.starts_with("jit-deny-"))
        else {
            continue;
        };
        if call.method != "PUT" {
            continue;
        }
        let id = &name["jit-".len()..];
        let request = requests.get(id).unwrap_or_else(|| panic!("a PUT for {id}, which has no request"));
        assert!(request["approved_at"].is_string(), "a rule was put for {id}, never approved: {request}");
    }

    // The trail is whole, with one activation and at most one close per grant.
    let (status, verdict) = world.call("GET", "/api/audit/verify", Some(ADMIN), None).await;
    assert_eq!((status, verdict["valid"].as_bool()), (200, Some(true)), "{verdict}");
    let (_, _, export) = world.get_text("/api/audit/export", ADMIN).await;
    let mut net: HashMap<(String, String), isize> = HashMap::new();
    let mut trails: HashMap<String, Vec<String>> = HashMap::new();
    for line in export.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        let (Some(request), Some(action)) = (event["subject"]["request"].as_str(), event["action"].as_str()) else {
            continue;
        };
        trails
            .entry(request.to_owned())
            .or_default()
            .push(format!("{action} {} {}", event["outcome"], event["details"]));
        let step = match event["outcome"].as_str() {
            Some("ok") => 1,
            Some("failed") => -1,
            _ => 0,
        };
        let action = if matches!(action, "request.expired" | "request.revoked") { "close" } else { action };
        *net.entry((request.to_owned(), action.to_owned())).or_default() += step;
    }
    for (id, request) in &requests {
        let activations = net.get(&(id.clone(), "request.activated".into())).copied().unwrap_or(0);
        let closes = net.get(&(id.clone(), "close".into())).copied().unwrap_or(0);
        assert!(
            activations <= 1 && closes <= 1,
            "{id}: {activations} activations, {closes} closes: {request}\n{:#?}",
            trails.get(id)
        );
        if request["activated_at"].is_string() {
            assert_eq!(activations, 1, "{id}: {request}");
        }
    }
}

fn is_final(request: &Value) -> bool {
    matches!(request["state"].as_str(), Some("expired" | "revoked" | "denied" | "cancelled" | "timed_out" | "failed"))
}
