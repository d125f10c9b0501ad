//! How long verifying an audit chain takes: builds 100,000 events, writes them as JSON Lines,
//! and times parsing plus verification (the offline path) and verification alone.
//! Run with `cargo bench -p portcullis-shared --bench audit_verify`.

use std::time::Instant;

use chrono::{TimeDelta, TimeZone, Utc};
use shared::audit::{AuditEvent, Outcome, Subject, verify};

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
}
