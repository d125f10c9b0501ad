//! The service benchmark: the real components (release wasm) in the test host, the ARM
//! emulator answering at once, timed over HTTP and counted at the store interface.
//!
//! ```sh
//! cargo bench -p portcullis-host --bench service
//! ```
//!
//! Prints, for comparison with `BENCHMARKS.md`:
//! 1. latency p50/p99 of each operation over `BENCH_CALLS` calls (default 2,000), interleaved
//!    in blocks, and its ratio to the floor (a spin-sdk component that answers 200 and touches
//!    nothing, `tests/floor`);
//!    The same again with the store's commits not flushed to disk one by one;
//! 2. the store operations, bytes and ARM calls of one call of each, counted by the host;
//! 3. the same latencies with every store operation 1 ms and 5 ms away (`BENCH_DELAYED_CALLS`,
//!    default 50);
//! 4. the sweep closing 100 due grants among 0, 10,000 and 100,000 grants that are not due
//!    (written straight into the store: copies of a real grant, due a day later), and the
//!    ratio of each to the first;
//! 5. throughput of 16 concurrent clients for `BENCH_SECONDS` (default 10) each, and the
//!    host's peak memory;
//! 6. the components' sizes, compile and instantiation times;
//! 7. on the outbound-Redis store (`store = "redis"`, a `redis-server` of its own): latency,
//!    Redis commands (round trips) per call, and latency with each command 1 ms and 5 ms away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use portcullis_host::local::{self, Local, LocalOptions};
use portcullis_host::redis_server::RedisServer;
use serde_json::{Value, json};

const ADMIN: &str = "demo-admin";
const ALICE: &str = "demo-alice";
const BOB: &str = "demo-bob";
const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Compute/virtualMachines/demo-vm";
const NSG: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Network/networkSecurityGroups/demo-nsg";

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The workspace's manifest with the floor component added at `/floor`.
fn manifest_with_floor(dir: &std::path::Path) -> std::path::PathBuf {
    let manifest = std::fs::read_to_string(portcullis_host::manifest_path()).expect("spin.toml");
    let floor = "\n[[trigger.http]]\nroute = \"/floor\"\ncomponent = \"floor-fn\"\n\n[component.floor-fn]\nsource = \"target/wasm32-wasip2/release/floor_fn.wasm\"\n";
    let path = dir.join("spin.toml");
    std::fs::write(&path, manifest + floor).expect("writing the benchmark's manifest");
    path
}

struct Bench {
    local: Local,
    client: reqwest::Client,
    url: String,
}

impl Bench {
    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> Value {
        let mut request = self.client.request(method.parse().unwrap(), format!("{}{path}", self.url)).bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("the host answers");
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method} {path} answered {status}: {body}");
        body
    }

    async fn floor(&self) {
        let response = self.client.get(format!("{}/floor", self.url)).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }

    async fn ask(&self, policy: &str) -> String {
        let body = json!({"policy": policy, "ports": [22], "duration": "PT1H", "justification": "BENCH-1"});
        self.call("POST", "/api/requests", ALICE, Some(body)).await["id"].as_str().unwrap().to_owned()
    }

    async fn revoke(&self, id: &str) {
        self.call("POST", &format!("/api/requests/{id}/revoke"), ALICE, Some(json!({}))).await;
    }

    async fn approve(&self, id: &str) {
        self.call("POST", &format!("/api/requests/{id}/approve"), BOB, Some(json!({}))).await;
    }

    /// Store operations by kind, bytes read and written, and ARM calls of `op`.
    async fn count<F: std::future::Future<Output = ()>>(&self, op: impl FnOnce() -> F) -> Vec<u64> {
        let store = self.local.host.store();
        let (before, bytes_before) = (store.operations(), store.bytes());
        self.local.emulator.clear_calls();
        op().await;
        let (after, bytes_after) = (store.operations(), store.bytes());
        let mut counts: Vec<u64> = (0..6).map(|i| after[i] - before[i]).collect();
        counts.push(counts.iter().sum());
        counts.extend([bytes_after[0] - bytes_before[0], bytes_after[1] - bytes_before[1]]);
        counts.push(self.local.emulator.calls().iter().filter(|c| c.path.contains("/providers/")).count() as u64);
        counts
    }
}

/// Latencies of one operation, in microseconds.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn percentile(&mut self, p: f64) -> f64 {
        self.0.sort_unstable();
        let index = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0.get(index).copied().unwrap_or(0) as f64 / 1000.0
    }
}

/// Times `calls` rounds of every operation, interleaved in blocks of 50, answering each
/// operation's samples.
async fn latencies(bench: &Bench, calls: usize, read: &str) -> BTreeMap<&'static str, Samples> {
    let mut samples: BTreeMap<&'static str, Samples> = BTreeMap::new();
    let timed = |samples: &mut BTreeMap<&'static str, Samples>, name: &'static str, started: Instant| {
        samples.entry(name).or_default().0.push(started.elapsed().as_micros() as u64);
    };
    let mut done = 0;
    while done < calls {
        let block = 50.min(calls - done);
        for _ in 0..block {
            let started = Instant::now();
            bench.floor().await;
            timed(&mut samples, "floor (trivial component)", started);
        }
        for _ in 0..block {
            let started = Instant::now();
            bench.call("GET", &format!("/api/requests/{read}"), ALICE, None).await;
            timed(&mut samples, "GET /api/requests/{id}", started);
        }
        for _ in 0..block {
            let started = Instant::now();
            bench.call("GET", "/api/policies", ALICE, None).await;
            timed(&mut samples, "GET /api/policies", started);
        }
        for _ in 0..block {
            let started = Instant::now();
            let id = bench.ask("auto").await;
            timed(&mut samples, "POST /api/requests (auto-approved, rule opened)", started);
            let started = Instant::now();
            bench.revoke(&id).await;
            timed(&mut samples, "POST .../revoke (rule removed)", started);
        }
        for _ in 0..block {
            let id = bench.ask("manual").await;
            let started = Instant::now();
            bench.approve(&id).await;
            timed(&mut samples, "POST .../approve (rule opened)", started);
            bench.revoke(&id).await;
        }
        done += block;
    }
    samples
}

/// Starts the service with the floor added, and the benchmark's settings plus `extra`.
async fn start(dir: &std::path::Path, extra: &[(&str, String)]) -> anyhow::Result<Arc<Bench>> {
    let mut variables: std::collections::HashMap<String, String> =
        [("rate_limits", "off".to_owned()), ("api_keys", api_keys(100))]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
    variables.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let local = local::start(LocalOptions {
        polls: 0,
        variables,
        manifest: Some(manifest_with_floor(dir)),
        ..LocalOptions::ephemeral(&dir.join("kv"))
    })
    .await?;
    let url = local.host.url();
    Ok(Arc::new(Bench { local, client: reqwest::Client::new(), url }))
}

/// The policies every run uses; answers the id of the request every read reads (it waits in
/// `held`, out of the other policies' way).
async fn policies(bench: &Bench) -> String {
    let quotas = json!({"per_requester": 1000, "per_vm": 1000});
    let port = json!([{"port": 22, "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8"]}]);
    for (name, approval) in [
        ("auto", json!({"mode": "auto"})),
        ("manual", json!({"mode": "manual", "approvers": ["group:ops"], "required": 1})),
        ("held", json!({"mode": "manual", "approvers": ["group:ops"], "required": 1})),
    ] {
        let policy = json!({"vm": VM, "nsg": NSG, "private_ip": "10.0.0.4", "ports": port, "approval": approval, "quotas": quotas});
        bench.call("PUT", &format!("/api/policies/{name}"), ADMIN, Some(policy)).await;
    }
    bench.ask("held").await
}

/// p50 latencies of the store-bound calls with every store round trip 1 ms, then 5 ms away.
async fn with_network_delay(bench: &Bench, calls: usize, read: &str) -> BTreeMap<&'static str, Vec<f64>> {
    let mut delayed: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for delay in [1, 5] {
        bench.local.host.store().set_delay(Duration::from_millis(delay));
        let mut samples = BTreeMap::<&str, Samples>::new();
        let mut time =
            |name, started: Instant| samples.entry(name).or_default().0.push(started.elapsed().as_micros() as u64);
        for _ in 0..calls {
            let started = Instant::now();
            bench.call("GET", &format!("/api/requests/{read}"), ALICE, None).await;
            time("GET /api/requests/{id}", started);
            let started = Instant::now();
            let id = bench.ask("auto").await;
            time("POST /api/requests (auto-approved)", started);
            let started = Instant::now();
            bench.revoke(&id).await;
            time("POST .../revoke", started);
            let id = bench.ask("manual").await;
            let started = Instant::now();
            bench.approve(&id).await;
            time("POST .../approve", started);
            bench.revoke(&id).await;
        }
        for (name, mut s) in samples {
            delayed.entry(name).or_default().push(s.percentile(0.5));
        }
    }
    bench.local.host.store().set_delay(Duration::ZERO);
    delayed
}

/// Section 7: the outbound-Redis store.
async fn on_redis(calls: usize, delayed_calls: usize) -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let dir = tempfile::tempdir()?;
    let extra = [("store", "redis".to_owned()), ("redis_url", redis.url()), ("redis_host", redis.host())];
    let bench = start(dir.path(), &extra).await?;
    let read = policies(&bench).await;
    latencies(&bench, 10, &read).await;
    let commands = || bench.local.host.stats().redis_commands();
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let before = commands();
    bench.call("GET", &format!("/api/requests/{read}"), ALICE, None).await;
    counts.insert("GET /api/requests/{id}", commands() - before);
    let before = commands();
    bench.call("GET", "/api/policies", ALICE, None).await;
    counts.insert("GET /api/policies", commands() - before);
    let before = commands();
    let id = bench.ask("auto").await;
    counts.insert("POST /api/requests (auto-approved, rule opened)", commands() - before);
    let before = commands();
    bench.revoke(&id).await;
    counts.insert("POST .../revoke (rule removed)", commands() - before);
    let id = bench.ask("manual").await;
    let before = commands();
    bench.approve(&id).await;
    counts.insert("POST .../approve (rule opened)", commands() - before);
    bench.revoke(&id).await;
    println!("\n## On the outbound-Redis store (a local redis-server; {calls} calls each)\n");
    println!("| operation | p50 ms | p99 ms | p50 / floor | Redis commands (round trips) |\n|---|---|---|---|---|");
    let mut samples = latencies(&bench, calls, &read).await;
    let floor = samples.get_mut("floor (trivial component)").unwrap().percentile(0.5);
    for (name, s) in samples.iter_mut() {
        let (p50, p99) = (s.percentile(0.5), s.percentile(0.99));
        let count = counts.get(name).map_or("-".to_owned(), u64::to_string);
        println!("| {name} | {p50:.2} | {p99:.2} | {:.1} | {count} |", p50 / floor);
    }
    println!("\n| operation | p50 ms, 1 ms a Redis command | p50 ms, 5 ms a Redis command |\n|---|---|---|");
    for (name, p50s) in with_network_delay(&bench, delayed_calls, &read).await {
        println!("| {name} | {:.1} | {:.1} |", p50s[0], p50s[1]);
    }
    Ok(())
}

/// Keys of requesters of their own (a person's new grant replaces their older one).
fn requester_key(n: usize) -> String {
    format!("bench-requester-{n}")
}

/// The demo keys and `n` requesters', as the `api_keys` variable.
fn api_keys(n: usize) -> String {
    use sha2::Digest;
    let mut keys: Vec<Value> = serde_json::from_str(&local::api_keys_json(&local::DEMO_KEYS)).expect("JSON");
    for i in 0..n {
        let hash = hex::encode(sha2::Sha256::digest(requester_key(i).as_bytes()));
        keys.push(
            json!({"sha256": hash, "principal": format!("bench{i}"), "groups": ["devs"], "roles": ["requester"]}),
        );
    }
    Value::Array(keys).to_string()
}

/// Sweeps until `n` due grants (of `n` people) are closed: (latency, sweeps, store
/// operations). A sweep closes what its time budget allows and leaves the rest to the next.
async fn sweep(bench: &Bench, n: usize) -> (f64, u64, Vec<u64>) {
    for i in 0..n {
        let body = json!({"policy": "auto", "ports": [22], "duration": "PT1M", "justification": "BENCH-1"});
        bench.call("POST", "/api/requests", &requester_key(i), Some(body)).await;
    }
    bench.local.host.clock().advance(TimeDelta::minutes(2));
    let started = Instant::now();
    let mut sweeps = 0;
    let counts = bench
        .count(|| async {
            let mut closed = 0;
            while closed < n as u64 {
                let response = bench
                    .client
                    .post(format!("{}/internal/sweep", bench.url))
                    .bearer_auth(local::DEMO_SWEEP_SECRET)
                    .send()
                    .await
                    .unwrap();
                let report: Value = response.json().await.unwrap();
                closed += report["closed"].as_u64().unwrap_or(0);
                sweeps += 1;
                assert!(sweeps < 50, "the sweeps stopped closing: {report}");
            }
        })
        .await;
    (started.elapsed().as_secs_f64() * 1000.0, sweeps, counts)
}

/// Writes grants `from..to` that are not due straight into the store: copies of the active
/// grant `template` under ids of their own, listed in the due index from the minute `due` on,
/// 1,000 a minute, as the service lists them (`from` and `to` are multiples of 1,000).
fn seed_not_due(bench: &Bench, template: &str, due: chrono::DateTime<chrono::Utc>, from: usize, to: usize) {
    let store = bench.local.host.store();
    let document = store.get("default", &format!("req:{template}")).unwrap().expect("the template grant");
    let document = String::from_utf8(document).unwrap();
    let mut entries = Vec::new();
    for n in from..to {
        let id = format!("{:024x}", 0xbe00_0000_0000_0000_0000_0000_u128 + n as u128);
        entries.push((format!("req:{id}"), document.replace(template, &id).into_bytes()));
        let minute = (due + TimeDelta::minutes((n / 1000) as i64)).format("%Y%m%d%H%M");
        let slot = n % 1000 + 1;
        entries.push((format!("due:{minute}:{slot}"), id.into_bytes()));
        if slot == 1000 {
            entries.push((format!("due:{minute}:n"), slot.to_string().into_bytes()));
            store.set_many("default", &std::mem::take(&mut entries)).unwrap();
        }
    }
    store.checkpoint().unwrap();
}

/// Calls per second of 16 clients doing `op` for `seconds`.
async fn throughput(bench: &Arc<Bench>, seconds: u64, auto_approve: bool, read: &str) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut clients = Vec::new();
    for client in 0..16 {
        let (bench, done, read) = (bench.clone(), done.clone(), read.to_owned());
        clients.push(tokio::spawn(async move {
            // A requester each: a person's new grant would replace their own older one.
            let key = requester_key(client);
            while Instant::now() < until {
                if auto_approve {
                    let body = json!({"policy": "auto", "ports": [22], "duration": "PT1H", "justification": "BENCH-1"});
                    let created = bench.call("POST", "/api/requests", &key, Some(body)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    let id = created["id"].as_str().unwrap();
                    bench.call("POST", &format!("/api/requests/{id}/revoke"), &key, Some(json!({}))).await;
                } else {
                    bench.call("GET", &format!("/api/requests/{read}"), ALICE, None).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / seconds as f64
}

fn peak_memory_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let (calls, delayed_calls, seconds) =
        (setting("BENCH_CALLS", 2000), setting("BENCH_DELAYED_CALLS", 50), setting("BENCH_SECONDS", 10) as u64);
    let state = tempfile::tempdir()?;
    let bench = start(state.path(), &[]).await?;
    let read = policies(&bench).await;
    // Warm: the ARM token, the policies and every component compiled.
    latencies(&bench, 10, &read).await;

    println!("# portcullis service benchmark\n");
    println!("{} calls per operation, interleaved in blocks of 50; ARM emulator answering at once.\n", calls);
    let mut samples = latencies(&bench, calls, &read).await;
    let floor = samples.get_mut("floor (trivial component)").unwrap().percentile(0.5);
    println!("## Latency\n\n| operation | p50 ms | p99 ms | p50 / floor |\n|---|---|---|---|");
    for (name, s) in samples.iter_mut() {
        let (p50, p99) = (s.percentile(0.5), s.percentile(0.99));
        println!("| {name} | {p50:.2} | {p99:.2} | {:.1} |", p50 / floor);
    }

    // The same without an fsync per store write: what the components and the host cost
    // apart from the disk (the profile of the run above is mostly the kernel's fsync).
    println!("\n## Latency, the store's commits not flushed one by one (SQLite `synchronous = NORMAL`)\n");
    println!("| operation | p50 ms | p99 ms | p50 / floor |\n|---|---|---|---|");
    bench.local.host.store().flush_each_commit(false)?;
    let mut samples = latencies(&bench, (calls / 4).max(50), &read).await;
    bench.local.host.store().flush_each_commit(true)?;
    let floor = samples.get_mut("floor (trivial component)").unwrap().percentile(0.5);
    for (name, s) in samples.iter_mut() {
        let (p50, p99) = (s.percentile(0.5), s.percentile(0.99));
        println!("| {name} | {p50:.2} | {p99:.2} | {:.1} |", p50 / floor);
    }

    println!("\n## Store operations and ARM calls of one call\n");
    println!(
        "| operation | get | set | delete | swap | increment | batch | total | bytes read | bytes written | ARM calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<(&str, Vec<u64>)> = vec![];
    let read_path = format!("/api/requests/{read}");
    rows.push(("GET /api/requests/{id}", bench.count(|| bench.call("GET", &read_path, ALICE, None).map_unit()).await));
    rows.push(("GET /api/policies", bench.count(|| bench.call("GET", "/api/policies", ALICE, None).map_unit()).await));
    let mut auto = String::new();
    rows.push(("POST /api/requests (auto-approved)", bench.count(|| async { auto = bench.ask("auto").await }).await));
    rows.push(("POST .../revoke (rule removed)", bench.count(|| bench.revoke(&auto)).await));
    let mut pending = String::new();
    rows.push((
        "POST /api/requests (manual, pending)",
        bench.count(|| async { pending = bench.ask("manual").await }).await,
    ));
    rows.push(("POST .../approve (rule opened)", bench.count(|| bench.approve(&pending)).await));
    bench.revoke(&pending).await;
    let older = bench.ask("auto").await;
    let mut newer = String::new();
    rows.push((
        "POST /api/requests (auto, replaces own grant)",
        bench.count(|| async { newer = bench.ask("auto").await }).await,
    ));
    for id in [&older, &newer] {
        let _ = bench
            .client
            .post(format!("{}/api/requests/{id}/revoke", bench.url))
            .bearer_auth(ALICE)
            .json(&json!({}))
            .send()
            .await;
    }
    for (name, counts) in &rows {
        let cells: Vec<String> = counts.iter().map(u64::to_string).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    let (sweep_ms, sweeps, sweep_counts) = sweep(&bench, 100).await;
    let cells: Vec<String> = sweep_counts.iter().map(u64::to_string).collect();
    println!("| sweeps closing 100 due grants ({sweeps} sweeps, {sweep_ms:.0} ms) | {} |", cells.join(" | "));

    println!("\n## The sweep among grants that are not due\n");
    println!(
        "| grants not due | sweeps closing 100 due grants, ms | store operations | ratio to 0 |\n|---|---|---|---|"
    );
    let template = bench.ask("auto").await;
    let due = bench.local.host.clock().now() + TimeDelta::days(1);
    let mut seeded = 0;
    let mut baseline = None;
    for not_due in [0, 10_000, 100_000] {
        seed_not_due(&bench, &template, due, seeded, not_due);
        seeded = not_due;
        // The best of three: one slow sweep (the host's scheduler) says nothing of the design.
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(sweep(&bench, 100).await);
        }
        let (ms, _, counts) = runs.into_iter().min_by(|a, b| a.0.total_cmp(&b.0)).expect("three runs");
        let baseline = *baseline.get_or_insert(ms);
        println!("| {not_due} | {ms:.0} | {} | {:.2} |", counts[6], ms / baseline);
    }
    bench.revoke(&template).await;

    println!("\n## With a network store ({delayed_calls} calls each)\n");
    println!("| operation | p50 ms, 1 ms a store call | p50 ms, 5 ms a store call |\n|---|---|---|");
    let delayed = with_network_delay(&bench, delayed_calls, &read).await;
    for (name, p50s) in delayed {
        println!("| {name} | {:.1} | {:.1} |", p50s[0], p50s[1]);
    }

    println!("\n## Throughput, 16 concurrent clients for {seconds} s\n");
    let reads = throughput(&bench, seconds, false, &read).await;
    let asks = throughput(&bench, seconds, true, &read).await;
    println!("| workload | calls/s |\n|---|---|");
    println!("| GET /api/requests/{{id}} | {reads:.0} |");
    println!("| POST /api/requests (auto-approved; each then revoked) | {asks:.0} |");
    println!("\nHost peak memory (VmHWM): {:.0} MiB", peak_memory_mib());

    println!("\n## Components\n\n| component | bytes | compile ms (Cranelift) |\n|---|---|---|");
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let engine = wasmtime::Engine::new(&config)?;
    for name in ["request_fn", "approve_fn", "admin_fn", "expire_fn", "web_fn", "floor_fn"] {
        let path = std::path::Path::new(portcullis_host::GUEST_DIR).join(format!("{name}.wasm"));
        let bytes = std::fs::read(&path)?;
        let compiled = Instant::now();
        wasmtime::component::Component::new(&engine, &bytes)?;
        println!("| {name} | {} | {:.0} |", bytes.len(), compiled.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "\nInstantiating a compiled component (pre-instantiated, as Spin does) is part of every call \
         above: the floor's p50 is that, plus the HTTP round trip."
    );
    on_redis((calls / 4).max(50), delayed_calls).await?;
    println!("\nRan in {:.0} s on {} cores.", started.elapsed().as_secs_f64(), std::thread::available_parallelism()?);
    Ok(())
}

/// Drops an answer: some counted calls only matter for their cost.
trait MapUnit {
    fn map_unit(self) -> impl std::future::Future<Output = ()>;
}

impl<F: std::future::Future<Output = Value>> MapUnit for F {
    async fn map_unit(self) {
        self.await;
    }
}
