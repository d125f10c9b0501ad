//! Any sequence of events: a final state never moves, a rule is opened at most once, and a
//! request that opened a rule ends only after it was closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::domain::Event;
use shared::domain::state::check_sequence;

fuzz_target!(|events: &[u8]| {
    let sequence = events.iter().map(|b| Event::ALL[usize::from(*b) % Event::ALL.len()]);
    if let Err(broken) = check_sequence(sequence) {
        panic!("{broken}: {events:?}");
    }
});
