//! Property tests (proptest): the parsers never panic and accept only what they can print
//! back, any sequence of events keeps the state machine's invariants, and any change to an
//! exported audit line is detected or refused, never a panic. `PROPTEST_CASES` bounds them
//! (CI sets it).

use proptest::prelude::*;

use crate::audit::export::{Format, line, parse_line};
use crate::audit::log::{Record, append, range};
use crate::audit::{Outcome, Subject, verify};
use crate::domain::{AccessDuration, Event, SourcePrefix};
use crate::store::MemStore;
use crate::testing::at;

proptest! {
    #[test]
    fn prefix_parsing_never_panics_and_round_trips(input in "\\\\PC{0,60}") {
        if let Ok(prefix) = SourcePrefix::parse(&input) {
            prop_assert_eq!(SourcePrefix::parse(&prefix.to_string()), Ok(prefix));
        }
    }

    #[test]
    fn prefix_like_input_never_panics(a in 0u32..400, b in 0u32..400, c in 0u32..400, d in 0u32..400, len in 0u32..200, zero in any::<bool>()) {
        let text = format!("{}{a}.{b}.{c}.{d}/{len}", if zero { "0" } else { "" });
        if let Ok(prefix) = SourcePrefix::parse(&text) {
            prop_assert!(a < 256 && b < 256 && c < 256 && d < 256 && len <= 32 && !zero);
            prop_assert_eq!(SourcePrefix::parse(&prefix.to_string()), Ok(prefix));
        }
    }

    #[test]
    fn duration_parsing_never_panics_and_round_trips(input in "[-+PTDHMS0-9.]{0,24}") {
        if let Ok(duration) = AccessDuration::parse(&input) {
            prop_assert_eq!(AccessDuration::parse(&duration.to_string()), Ok(duration));
        }
    }

    #[test]
    fn request_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = serde_json::from_slice::<crate::domain::RawRequest>(&body);
        let _ = crate::api::parse_json::<crate::domain::RawRequest>(&body, true);
    }

    /// Any sequence of events: a final state never moves, a rule is opened at most once, and
    /// a request that opened a rule can only end after it was closed.
    #[test]
    fn any_sequence_of_events_keeps_the_invariants(events in proptest::collection::vec(0..Event::ALL.len(), 0..30)) {
        let checked = crate::domain::state::check_sequence(events.iter().map(|i| Event::ALL[*i]));
        prop_assert!(checked.is_ok(), "{checked:?}");
    }

    /// Any single-byte change to any line of an export is refused or breaks the chain.
    #[test]
    fn any_byte_change_in_an_export_is_detected(line_index in 0usize..6, offset in any::<usize>(), byte in any::<u8>()) {
        let kv = MemStore::default();
        for n in 0..6u64 {
            let record = Record {
                actor: format!("user{n}"),
                action: "request.created",
                subject: Subject { request: Some(format!("r{n}")), policy: Some("demo-vm".into()) },
                source_ip: Some("203.0.113.7".into()),
                actor_name: None,
                outcome: Outcome::Ok,
                details: serde_json::json!({"n": n}),
            };
            append(&kv, record, at(n as i64), None).unwrap();
        }
        let mut lines: Vec<String> = range(&kv, 1, 6).map(|e| line(&e.unwrap(), Format::JsonLines)).collect();
        let mut bytes = lines[line_index].clone().into_bytes();
        let offset = offset % bytes.len();
        prop_assume!(bytes[offset] != byte);
        bytes[offset] = byte;
        let Ok(changed) = String::from_utf8(bytes) else { return Ok(()) };
        lines[line_index] = changed;
        let parsed: Result<Vec<_>, _> = lines.iter().map(|l| parse_line(l)).collect();
        if let Ok(events) = parsed {
            let original: Vec<_> = range(&kv, 1, 6).map(Result::unwrap).collect();
            if events != original {
                prop_assert!(verify(events, None).broken.is_some(), "a change went unnoticed");
            }
        }
    }
}
