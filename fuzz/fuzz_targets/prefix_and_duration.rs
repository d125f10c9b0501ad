//! Source prefixes, durations and names: any text is refused or accepted, never a panic, and
//! what is accepted prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::domain::{AccessDuration, AllowedSource, PolicyName, Principal, SourcePrefix};

fuzz_target!(|text: &str| {
    if let Ok(prefix) = SourcePrefix::parse(text) {
        assert_eq!(SourcePrefix::parse(&prefix.to_string()), Ok(prefix), "{text:?}");
    }
    if let Ok(duration) = AccessDuration::parse(text) {
        assert_eq!(AccessDuration::parse(&duration.to_string()), Ok(duration), "{text:?}");
        assert!(duration.as_secs() > 0, "{text:?}");
    }
    if let Ok(source) = AllowedSource::try_from(text.to_owned()) {
        assert_eq!(AllowedSource::try_from(String::from(source)), Ok(source), "{text:?}");
    }
    if let Ok(name) = PolicyName::parse(text) {
        assert_eq!(name.as_str(), text);
        assert!(!name.as_str().contains([':', '/', '\\', '?', '#']), "store keys must stay unambiguous: {text:?}");
    }
    if let Ok(principal) = Principal::parse(text) {
        assert_eq!(principal.as_str(), text);
        assert!(!principal.as_str().contains(['/', '\\', '?', '#']), "store keys must stay unambiguous: {text:?}");
    }
});
