//! A policy document, parsed as `PUT /api/policies/{name}` does: any bytes are refused or
//! accepted, never a panic; an accepted policy keeps its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::domain::policy::{PolicyError, PolicyLimits};
use shared::domain::{AccessDuration, Policy, PolicyName, RawPolicy};

/// Refusals, from the parser or from the VM lookup (which a fuzzer cannot reach).
struct Refused;

impl From<PolicyError> for Refused {
    fn from(_: PolicyError) -> Self {
        Refused
    }
}

fuzz_target!(|body: &[u8]| {
    let Ok(raw) = shared::api::parse_json::<RawPolicy>(body, false) else { return };
    let limits = PolicyLimits { max_duration: AccessDuration::parse("PT24H").unwrap() };
    let name = PolicyName::parse("vm").unwrap();
    if let Ok(policy) = Policy::from_raw::<Refused>(name, raw, limits, |_| Err(Refused)) {
        assert!(!policy.ports.is_empty());
        for rule in &policy.ports {
            assert!(rule.max_duration <= limits.max_duration, "{policy:?}");
        }
        // What is stored reads back as the same policy.
        let stored = serde_json::to_vec(&policy).expect("a policy serializes");
        let read: Policy = serde_json::from_slice(&stored).expect("a stored policy reads back");
        assert_eq!(read, policy);
    }
});
