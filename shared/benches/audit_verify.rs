//! What the audit trail costs: store operations per append, and the time to verify 100,000
//! events in memory, from an exported JSON Lines file (the offline path), and from the store
//! (`GET /api/audit/verify`'s walk, over an in-memory store).
//! Run with `cargo bench -p portcullis-shared --bench audit_verify`.

use std::cell::Cell;
use std::time::Instant;

use chrono::{TimeDelta, TimeZone, Utc};
use shared::audit::log::{self, Checkpointing};
use shared::audit::{AuditEvent, Outcome, Record, Subject, verify};
use shared::store::{KvStore, MemStore, StoreError};

/// Counts the calls an append makes.
#[derive(Default)]
struct Counting {
    inner: MemStore,
    gets: Cell<u64>,
    sets: Cell<u64>,
    swaps: Cell<u64>,
}

impl KvStore for Counting {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.gets.set(self.gets.get() + 1);
        self.inner.get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.sets.set(self.sets.get() + 1);
        self.inner.set(key, value)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)
    }
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        self.swaps.set(self.swaps.get() + 1);
        self.inner.compare_and_swap(key, expected, value)
    }
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.increment(key, delta)
    }
}

fn record(n: u64) -> Record {
    Record {
        actor: format!("user{}", n % 97),
        action: ["request.created", "request.approved", "rule.put", "rule.deleted"][(n % 4) as usize],
        subject: Subject { request: Some(format!("{n:024x}")), policy: Some("demo-vm".into()) },
        source_ip: Some("203.0.113.7".into()),
        actor_name: None,
        outcome: Outcome::Ok,
        details: serde_json::json!({"ports": [22], "duration": "PT1H", "arm_request_id": "00000000-0000-0000-0000-000000000000"}),
    }
}

const EVENTS: u64 = 100_000;

fn main() {
    let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    let mut events: Vec<AuditEvent> = Vec::with_capacity(EVENTS as usize);
    let built = Instant::now();
    for n in 0..EVENTS {
        let event = AuditEvent {
            seq: 0,
            at: start + TimeDelta::seconds(n as i64),
            actor: format!("user{}", n % 97),
            action: ["request.created", "request.approved", "rule.put", "rule.deleted"][(n % 4) as usize].into(),
            subject: Subject { request: Some(format!("{n:024x}")), policy: Some("demo-vm".into()) },
            source_ip: Some("203.0.113.7".into()),
            actor_name: None,
            outcome: Outcome::Ok,
            details: serde_json::json!({"ports": [22], "duration": "PT1H", "arm_request_id": "00000000-0000-0000-0000-000000000000"}),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let previous = events.last().map(|e| (e.seq, e.hash.as_str()));
        events.push(event.seal(previous));
    }
    let sealing = built.elapsed();
    let lines: String = events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect();

    let timed = Instant::now();
    let report = verify(events.clone(), None);
    let verifying = timed.elapsed();
    assert_eq!(report.checked, EVENTS);

    let timed = Instant::now();
    let parsed: Vec<AuditEvent> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let report = verify(parsed, None);
    let offline = timed.elapsed();
    assert_eq!(report.checked, EVENTS);

    println!("audit chain of {EVENTS} events ({:.1} MB as JSON Lines)", lines.len() as f64 / 1e6);
    println!("  seal (hash) all:        {:>8.1} ms", sealing.as_secs_f64() * 1e3);
    println!(
        "  verify in memory:       {:>8.1} ms ({:.0} events/s)",
        verifying.as_secs_f64() * 1e3,
        EVENTS as f64 / verifying.as_secs_f64()
    );
    println!(
        "  parse + verify (JSONL): {:>8.1} ms ({:.0} events/s)",
        offline.as_secs_f64() * 1e3,
        EVENTS as f64 / offline.as_secs_f64()
    );

    stored(start);
}

/// Appends through the real append path and verifies from the store.
fn stored(start: chrono::DateTime<Utc>) {
    let kv = Counting::default();
    let checkpointing = Some(Checkpointing { key: b"bench key", every: 1000 });
    let timed = Instant::now();
    for n in 0..EVENTS {
        log::append(&kv, record(n), start + TimeDelta::seconds(n as i64), checkpointing).unwrap();
    }
    let appending = timed.elapsed();
    let per = |count: &Cell<u64>| count.get() as f64 / EVENTS as f64;
    println!(
        "  append (in memory):     {:>8.1} ms ({:.1} us each; per append: {:.2} gets, {:.2} compare-and-swaps, {:.2} sets, checkpoints included)",
        appending.as_secs_f64() * 1e3,
        appending.as_secs_f64() * 1e6 / EVENTS as f64,
        per(&kv.gets),
        per(&kv.swaps),
        per(&kv.sets),
    );
    let timed = Instant::now();
    let report = log::verify_stored(&kv, 1, None, checkpointing).unwrap();
    let verifying = timed.elapsed();
    assert_eq!((report.chain.checked, report.chain.broken), (EVENTS, None));
    println!(
        "  verify from the store:  {:>8.1} ms ({:.0} events/s, checkpoint {:?})",
        verifying.as_secs_f64() * 1e3,
        EVENTS as f64 / verifying.as_secs_f64(),
        report.checkpoint.map(|c| c.seq),
    );
}
