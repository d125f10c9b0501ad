//! The offline audit verifier as a user runs it: on a good export, a tampered one, and
//! against a checkpoint after the tail was cut off.

use std::process::Command;

use chrono::{TimeZone, Utc};
use shared::audit::{AuditEvent, Checkpoint, Outcome, Subject};

fn chain(n: u64) -> Vec<AuditEvent> {
    let mut events: Vec<AuditEvent> = Vec::new();
    for i in 0..n {
        let event = AuditEvent {
            seq: 0,
            at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, i as u32).unwrap(),
            actor: "alice".into(),
            action: "request.created".into(),
            subject: Subject { request: Some(format!("r{i}")), policy: Some("demo-vm".into()) },
            source_ip: None,
            actor_name: None,
            outcome: Outcome::Ok,
            details: serde_json::json!({}),
            prev_hash: String::new(),
            hash: String::new(),
        };
        let previous = events.last().map(|e| (e.seq, e.hash.as_str()));
        events.push(event.seal(previous));
    }
    events
}

fn run(events: &[AuditEvent], checkpoint: Option<&Checkpoint>) -> (bool, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trail.jsonl");
    std::fs::write(&file, events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect::<String>()).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis-audit"));
    command.arg("verify").arg(&file).env("PORTCULLIS_AUDIT_KEY", "k");
    if let Some(checkpoint) = checkpoint {
        let path = dir.path().join("checkpoint.json");
        std::fs::write(&path, serde_json::to_vec(checkpoint).unwrap()).unwrap();
        command.arg("--checkpoint").arg(path);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr))),
    )
}

#[test]
fn a_good_export_verifies_and_a_tampered_one_names_the_broken_event() {
    let events = chain(4);
    let (ok, report) = run(&events, None);
    assert!(ok);
    assert_eq!(report["checked"], 4);

    let mut tampered = events.clone();
    tampered[1].actor = "mallory".into();
    let (ok, report) = run(&tampered, None);
    assert!(!ok);
    assert_eq!(report["broken"]["seq"], 2);
}

#[test]
fn a_cut_off_tail_fails_its_checkpoint() {
    let events = chain(4);
    let checkpoint = Checkpoint::sign(b"k", 4, &events[3].hash);
    assert!(run(&events, Some(&checkpoint)).0);
    let (ok, report) = run(&events[..2], Some(&checkpoint));
    assert!(!ok);
    assert_eq!(report["broken"]["seq"], 3, "{report}");
}
