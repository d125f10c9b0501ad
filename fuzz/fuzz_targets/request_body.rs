//! A request body, parsed as `POST /api/requests` does and checked against a policy: any
//! bytes are refused or accepted, never a panic; what is accepted lies inside the policy.
#![no_main]

use std::sync::LazyLock;

use chrono::{TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use shared::domain::policy::{PolicyError, PolicyLimits};
use shared::domain::{AccessDuration, AccessRequest, GroupName, Policy, PolicyName, Principal, RawRequest, RequestId};

static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    let document = serde_json::json!({
        "vm": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm",
        "nsg": "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/nsg",
        "private_ip": "10.0.0.4",
        "ports": [{"port": 22, "protocol": "tcp", "max_duration": "PT3H", "allowed_sources": ["203.0.113.0/24", "2001:db8::/32"]},
                  {"port": 3389, "protocol": "tcp", "max_duration": "PT1H", "allowed_sources": ["any"]}],
        "approval": {"mode": "auto"},
        "justification_pattern": "^INC-[0-9]+",
    });
    let raw = serde_json::from_value(document).expect("the fuzzing policy parses");
    let limits = PolicyLimits { max_duration: AccessDuration::parse("PT24H").unwrap() };
    Policy::from_raw::<PolicyError>(PolicyName::parse("vm").unwrap(), raw, limits, |_| unreachable!())
        .expect("the fuzzing policy is valid")
});

fuzz_target!(|body: &[u8]| {
    let Ok(raw) = shared::api::parse_json::<RawRequest>(body, true) else { return };
    let principal = Principal::parse("alice").unwrap();
    let groups = [GroupName::parse("devs").unwrap()];
    let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    let caller = Some("203.0.113.7".parse().unwrap());
    let id = RequestId::parse("r1").unwrap();
    if let Ok(request) = AccessRequest::from_raw(raw, &POLICY, &principal, &groups, caller, id, now) {
        assert!(!request.vms.is_empty(), "{request:?}");
        for vm in &request.vms {
            assert!(POLICY.vm(vm.as_str()).is_some(), "an accepted VM is in the policy: {request:?}");
        }
        for port in request.ports.iter() {
            let rule = POLICY.port(port).expect("an accepted port is in the policy");
            assert!(request.duration <= rule.max_duration, "{request:?}");
            assert!(rule.allowed_sources.iter().any(|allowed| allowed.admits(&request.source)), "{request:?}");
        }
    }
});
