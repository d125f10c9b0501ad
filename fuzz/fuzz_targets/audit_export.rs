//! The audit verifier: any file is read and judged, never a panic; and any change to a
//! genuine export (the input says which bytes) is refused by the parser or breaks the chain.
#![no_main]

use std::sync::LazyLock;

use chrono::{TimeDelta, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use shared::audit::export::{Format, line, parse_line};
use shared::audit::log::{append, range};
use shared::audit::{AuditEvent, Outcome, Record, Subject, verify};
use shared::store::MemStore;

/// Six genuine events, and their export.
static GENUINE: LazyLock<(Vec<AuditEvent>, Vec<String>)> = LazyLock::new(|| {
    let kv = MemStore::default();
    let start = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    for n in 0..6u64 {
        let record = Record {
            actor: format!("user{n}"),
            actor_name: (n % 2 == 0).then(|| format!("User {n}")),
            action: "request.created",
            subject: Subject { request: Some(format!("r{n}")), policy: Some("vm".into()) },
            source_ip: Some("203.0.113.7".into()),
            outcome: Outcome::Ok,
            details: serde_json::json!({"n": n, "note": "ü ✓"}),
        };
        append(&kv, record, start + TimeDelta::minutes(n as i64), None).unwrap();
    }
    let events: Vec<AuditEvent> = range(&kv, 1, 6).map(Result::unwrap).collect();
    let format = |n: u64| if n % 2 == 0 { Format::JsonLines } else { Format::CloudEvents };
    let lines = events.iter().map(|e| line(e, format(e.seq))).collect();
    (events, lines)
});

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    if mode % 2 == 0 {
        // Any file at all.
        let text = String::from_utf8_lossy(rest);
        let events: Vec<AuditEvent> = text.lines().filter_map(|l| parse_line(l).ok()).collect();
        let _ = verify(events, None);
        return;
    }
    // Changes to a genuine export: each 3 bytes say which line, where, and what byte.
    let (original, lines) = &*GENUINE;
    let mut lines: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
    for change in rest.chunks_exact(3) {
        let line = &mut lines[usize::from(change[0]) % 6];
        let at = usize::from(change[1]) * 7 % line.len();
        line[at] = change[2];
    }
    let Ok(lines) = lines.into_iter().map(String::from_utf8).collect::<Result<Vec<_>, _>>() else { return };
    let Ok(events) = lines.iter().map(|l| parse_line(l)).collect::<Result<Vec<_>, _>>() else { return };
    if &events != original {
        assert!(verify(events, None).broken.is_some(), "a change went unnoticed");
    }
});
