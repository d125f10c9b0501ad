//! Any sequence of events: a final state never moves, a rule is opened at most once, and a
//! request that opened a rule ends only after it was closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::domain::{Event, State};

const EVENTS: [Event; 10] = [
    Event::Approve,
    Event::Deny,
    Event::Cancel,
    Event::TimeOut,
    Event::RuleOpened,
    Event::OpenRefused,
    Event::OpenAbandoned,
    Event::Due,
    Event::Revoke,
    Event::RuleClosed,
];

fuzz_target!(|events: &[u8]| {
    let mut state = State::Pending;
    let (mut opened, mut closed) = (0, 0);
    for byte in events {
        let event = EVENTS[usize::from(*byte) % EVENTS.len()];
        let before = state;
        match state.apply(event) {
            Ok(next) => {
                assert!(!before.is_final(), "{before:?} moved on {event:?}");
                opened += usize::from(event == Event::RuleOpened);
                closed += usize::from(event == Event::RuleClosed);
                state = next;
            }
            Err(_) => assert_eq!(state, before),
        }
    }
    assert!(opened <= 1 && closed <= 1, "{events:?}");
    if opened == 1 && state.is_final() {
        assert_eq!(closed, 1, "ended without its rule closed: {events:?}");
    }
});
