//! Bad input gets a clear 4xx JSON error and changes nothing: no stored state, no ARM call.

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_malformed_or_out_of_policy_request_is_refused_and_changes_nothing() {
    let world = World::start().await;
    world.auto_policy().await;
    let keys_before = world.store_keys();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", "{\"policy\": ".into(), 400, "invalid_json"),
        ("not an object", "[]".into(), 400, "invalid_body"),
        ("unknown field", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "justification": "x", "sorce": "1.2.3.4"}).to_string(), 400, "invalid_body"),
        ("wrong type", json!({"policy": "demo-vm", "ports": "22", "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_body"),
        ("port out of range", json!({"policy": "demo-vm", "ports": [70000], "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_port"),
        ("port zero", json!({"policy": "demo-vm", "ports": [0], "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_port"),
        ("no ports", json!({"policy": "demo-vm", "ports": [], "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_ports"),
        ("duplicate port", json!({"policy": "demo-vm", "ports": [22, 22], "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_ports"),
        ("unparseable duration", json!({"policy": "demo-vm", "ports": [22], "duration": "1 hour", "justification": "x"}).to_string(), 400, "invalid_duration"),
        ("zero duration", json!({"policy": "demo-vm", "ports": [22], "duration": "PT0M", "justification": "x"}).to_string(), 400, "invalid_duration"),
        ("unparseable prefix", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "10.0.0.0/33", "justification": "x"}).to_string(), 400, "invalid_source"),
        ("host bits set", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "203.0.113.7/24", "justification": "x"}).to_string(), 400, "invalid_source"),
        ("no justification", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H"}).to_string(), 400, "justification_required"),
        ("bad policy name", json!({"policy": "../x", "ports": [22], "duration": "PT1H", "justification": "x"}).to_string(), 400, "invalid_policy_name"),
        ("unknown policy", json!({"policy": "nope", "ports": [22], "duration": "PT1H", "justification": "x"}).to_string(), 404, "policy_not_found"),
        ("port not in policy", json!({"policy": "demo-vm", "ports": [80], "duration": "PT1H", "justification": "x"}).to_string(), 422, "port_not_in_policy"),
        ("longer than the maximum", json!({"policy": "demo-vm", "ports": [22], "duration": "PT4H", "justification": "x"}).to_string(), 422, "duration_too_long"),
        ("shorter than a minute", json!({"policy": "demo-vm", "ports": [22], "duration": "PT30S", "justification": "x"}).to_string(), 422, "duration_too_short"),
        ("source outside", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "198.51.100.7", "justification": "x"}).to_string(), 422, "source_not_allowed"),
        ("wider source", json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "203.0.112.0/23", "justification": "x"}).to_string(), 422, "source_not_allowed"),
        ("one port's limit", json!({"policy": "demo-vm", "ports": [22, 3389], "duration": "PT2H", "justification": "x"}).to_string(), 422, "duration_too_long"),
    ];
    for (case, body, status, code) in cases {
        let (got, answer) = world.call("POST", "/api/requests", Some(ALICE), Some(&body)).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{case}: {answer}");
        assert!(!answer["error"]["message"].as_str().unwrap_or_default().is_empty(), "{case}: no message");
    }
    assert_eq!(world.store_keys(), keys_before, "a refused request left state behind");
    assert!(world.arm_calls().is_empty(), "a refused request called ARM: {:?}", world.arm_calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_narrower_prefix_inside_an_allowed_one_is_granted_as_asked() {
    let world = World::start().await;
    world.auto_policy().await;
    let (status, body) = world.request(ALICE, &json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "203.0.113.16/28", "justification": "x"})).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    assert_eq!(world.jit_rules()[0]["properties"]["sourceAddressPrefix"], "203.0.113.16/28");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_policies_are_refused_and_change_nothing() {
    let world = World::start().await;
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("malformed JSON", "{".into(), 400, "invalid_json"),
        (
            "unknown field",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["prots"] = json!([]);
                p.to_string()
            },
            400,
            "invalid_body",
        ),
        (
            "port out of range",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["ports"][0]["port"] = json!(65536);
                p.to_string()
            },
            422,
            "invalid_policy",
        ),
        (
            "bad duration",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["ports"][0]["max_duration"] = json!("3 hours");
                p.to_string()
            },
            422,
            "invalid_policy",
        ),
        (
            "bad prefix",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["ports"][0]["allowed_sources"] = json!(["300.1.1.1/8"]);
                p.to_string()
            },
            422,
            "invalid_policy",
        ),
        (
            "internet without 'any'",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["ports"][0]["allowed_sources"] = json!(["0.0.0.0/0"]);
                p.to_string()
            },
            422,
            "invalid_policy",
        ),
        (
            "bad vm id",
            {
                let mut p = policy(json!({"mode": "auto"}));
                p["vm"] = json!("demo-vm");
                p.to_string()
            },
            422,
            "invalid_policy",
        ),
        ("unknown approval mode", policy(json!({"mode": "sometimes"})).to_string(), 400, "invalid_body"),
    ];
    for (case, body, status, code) in cases {
        let (got, answer) = world.call("PUT", "/api/policies/demo-vm", Some(ADMIN), Some(&body)).await;
        assert_eq!((got, answer["error"]["code"].as_str()), (status, Some(code)), "{case}: {answer}");
    }
    let (status, answer) = world
        .call("PUT", "/api/policies/bad%20name", Some(ADMIN), Some(&policy(json!({"mode": "auto"})).to_string()))
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_policy_name")));
    assert!(world.store_keys().is_empty(), "{:?}", world.store_keys());
    assert_eq!(world.call("GET", "/api/nothing-here", Some(ADMIN), None).await.0, 404);
    assert_eq!(world.call("PATCH", "/api/policies/demo-vm", Some(ADMIN), Some("{}")).await.0, 405);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_refused_with_413_before_anything_reads_them() {
    let world = World::start().await;
    world.auto_policy().await;
    let keys_before = world.store_keys();
    let trail_before = world.audit("").await.len();
    for size in [64 * 1024 + 1, 1 << 20, 20 << 20] {
        let body = format!("{{\"justification\": \"{}\"}}", "x".repeat(size));
        for (key, path) in
            [(Some(ALICE), "/api/requests"), (None, "/api/requests"), (Some(BOB), "/api/requests/x/approve")]
        {
            let (status, answer) = world.call("POST", path, key, Some(&body)).await;
            assert_eq!((status, answer["error"]["code"].as_str()), (413, Some("body_too_large")), "{size} {path}");
        }
    }
    // Just under the limit is read (and refused for what it says, not its size).
    let body = format!(
        "{{\"policy\": \"demo-vm\", \"ports\": [22], \"duration\": \"PT1H\", \"justification\": \"{}\"}}",
        "x".repeat(60_000)
    );
    assert_eq!(
        world.call("POST", "/api/requests", Some(ALICE), Some(&body)).await.1["error"]["code"],
        "invalid_justification"
    );
    assert_eq!(world.store_keys(), keys_before, "nothing stored");
    assert_eq!(world.audit("").await.len(), trail_before, "nothing recorded");
    assert!(world.jit_rules().is_empty());
}
