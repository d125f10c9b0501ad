//! The audit trail through the real components: seeds 100,000 events into the host's SQLite
//! store by the components' own append path, then times `GET /api/audit/verify`, a streamed
//! `GET /api/audit/export` and a filtered page, over HTTP.
//! Run with `cargo bench -p portcullis-host --bench audit_host` (add `--profile dev` to skip
//! building wasmtime optimised: the guests run compiled by Cranelift either way).

use std::time::Instant;

use chrono::{TimeDelta, Utc};
use portcullis_host::host::kv::KvBackend;
use portcullis_host::local::{self, LocalOptions};
use shared::audit::log;
use shared::audit::{Outcome, Record, Subject};
use shared::store::{KvStore, StoreError};

const EVENTS: u64 = 100_000;

/// The host's store, seen through the components' port.
struct Backend<'a>(&'a KvBackend);

fn backend(error: anyhow::Error) -> StoreError {
    StoreError::Backend(error.to_string())
}

impl KvStore for Backend<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get("default", key).map_err(backend)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0.set("default", key, value).map_err(backend)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.0.delete("default", key).map_err(backend)
    }
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        self.0.compare_and_swap("default", key, expected, value).map_err(backend)
    }
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.0.increment("default", key, delta).map_err(backend)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let service = local::start(LocalOptions::ephemeral(state.path())).await?;
    let store = Backend(service.host.store());
    let start = Utc::now() - TimeDelta::days(30);
    let timed = Instant::now();
    for n in 0..EVENTS {
        let record = Record {
            actor: format!("user{}", n % 97),
            action: ["request.created", "request.approved", "rule.put", "rule.deleted"][(n % 4) as usize],
            subject: Subject { request: Some(format!("{n:024x}")), policy: Some("demo-vm".into()) },
            source_ip: Some("203.0.113.7".into()),
            actor_name: None,
            outcome: Outcome::Ok,
            details: serde_json::json!({"ports": [22], "duration": "PT1H"}),
        };
        log::append(&store, record, start + TimeDelta::seconds(n as i64), None)?;
    }
    let seeding = timed.elapsed();
    println!("audit trail of {EVENTS} events in the host's SQLite store");
    println!(
        "  append (native, SQLite):     {:>8.1} s ({:.0} us each)",
        seeding.as_secs_f64(),
        seeding.as_secs_f64() * 1e6 / EVENTS as f64
    );

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{}{path}", service.host.url())).bearer_auth("demo-admin").send();

    let timed = Instant::now();
    let report: serde_json::Value = get("/api/audit/verify").await?.json().await?;
    let verifying = timed.elapsed();
    assert_eq!((report["valid"].as_bool(), report["checked"].as_u64()), (Some(true), Some(EVENTS)), "{report}");
    println!(
        "  GET /api/audit/verify:       {:>8.1} s ({:.0} events/s, in the component)",
        verifying.as_secs_f64(),
        EVENTS as f64 / verifying.as_secs_f64()
    );

    let timed = Instant::now();
    let export = get("/api/audit/export").await?.bytes().await?;
    let exporting = timed.elapsed();
    assert_eq!(export.iter().filter(|b| **b == b'\n').count() as u64, EVENTS);
    println!(
        "  GET /api/audit/export:       {:>8.1} s ({:.1} MB streamed)",
        exporting.as_secs_f64(),
        export.len() as f64 / 1e6
    );

    let timed = Instant::now();
    let page: serde_json::Value = get("/api/audit?actor=user5&limit=100").await?.json().await?;
    let paging = timed.elapsed();
    println!(
        "  GET /api/audit (filtered):   {:>8.1} ms ({} events, next_cursor {})",
        paging.as_secs_f64() * 1e3,
        page["events"].as_array().map_or(0, Vec::len),
        page["next_cursor"]
    );
    Ok(())
}
