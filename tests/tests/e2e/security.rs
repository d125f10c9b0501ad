//! Authentication and authorisation through every component.

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn every_api_call_needs_a_known_key() {
    let world = World::start().await;
    world.auto_policy().await;
    let calls = [
        ("GET", "/api/policies"),
        ("PUT", "/api/policies/x"),
        ("POST", "/api/requests"),
        ("GET", "/api/requests/abc"),
        ("POST", "/api/requests/abc/approve"),
        ("POST", "/api/requests/abc/deny"),
    ];
    for (method, path) in calls {
        for key in [None, Some("not-a-key"), Some("demo-admin ")] {
            let (status, body) = world.call(method, path, key.filter(|k| !k.ends_with(' ')), Some("{}")).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthenticated")),
                "{method} {path} with {key:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_are_enforced() {
    let world = World::start().await;
    let (status, body) = world
        .call("PUT", "/api/policies/demo-vm", Some(ALICE), Some(&policy(json!({"mode": "auto"})).to_string()))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("admin_required")));
    world.auto_policy().await;
    let (status, body) = world.request(BOB, &ssh("PT1H")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("requester_role_required")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_requester_who_is_also_an_approver_can_never_approve_their_own_request() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let (_, request) = world.request(CAROL, &ssh("PT30M")).await;
    let (status, body) = world.decide(&id(&request), "approve", CAROL).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("self_approval")), "{body}");
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");
    assert!(world.jit_rules().is_empty());
    // Someone outside the approver list cannot approve either.
    let (_, request) = world.request(ALICE, &ssh("PT30M")).await;
    world.put_policy("demo-vm", &policy(json!({"mode": "manual", "approvers": ["dave"]}))).await;
    let (status, body) = world.decide(&id(&request), "approve", BOB).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("not_an_approver")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_client_address_header_is_ignored() {
    let world = World::start().await;
    let mut only_documentation_range = policy(json!({"mode": "auto"}));
    only_documentation_range["ports"][0]["allowed_sources"] = json!(["203.0.113.0/24"]);
    world.put_policy("demo-vm", &only_documentation_range).await;
    let response = reqwest::Client::new()
        .post(format!("{}/api/requests", world.local.host.url()))
        .bearer_auth(ALICE)
        .header("spin-client-addr", "203.0.113.7:4000")
        .header("x-forwarded-for", "203.0.113.7")
        .body(ssh("PT1H").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "source_not_allowed");
    assert!(body["error"]["message"].as_str().unwrap().contains("127.0.0.1/32"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_endpoint_needs_the_sweep_secret() {
    let world = World::start().await;
    for key in [None, Some(ADMIN), Some("demo-sweep-secre")] {
        let (status, _) = world.call("POST", "/internal/sweep", key, None).await;
        assert_eq!(status, 401, "{key:?}");
    }
    let (status, report) =
        world.call("POST", "/internal/sweep", Some(portcullis_host::local::DEMO_SWEEP_SECRET), None).await;
    assert_eq!((status, report["closed"].as_u64()), (200, Some(0)), "{report}");
    assert_eq!(
        world.call("GET", "/internal/sweep", Some(portcullis_host::local::DEMO_SWEEP_SECRET), None).await.0,
        405
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_never_reach_the_store_or_responses() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert!(!body.to_string().contains("demo-secret"));
    for (key, value) in world.local.host.dump_store() {
        assert!(!value.contains("demo-secret") && !value.contains("demo-alice"), "{key} holds a secret");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_token_encryption_key_the_cached_arm_token_is_sealed_in_the_store() {
    let world = World::with_variables(&[("token_encryption_key", "a-long-random-secret-of-at-least-32-chars")]).await;
    world.auto_policy().await;
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = world.request(CAROL, &ssh("PT1H")).await;
    assert_eq!(status, 201, "{body}");
    let store = world.local.host.dump_store();
    let cached = &store.iter().find(|(key, _)| key == "cache:arm-token").expect("a cached token").1;
    assert!(cached.contains("\"sealed\":\"v1.") && !cached.contains("emu-"), "{cached}");
    assert!(store.iter().all(|(_, value)| !value.contains("emu-")), "no bearer token in plain text anywhere");
    assert_eq!(world.local.emulator.tokens_issued("client_credentials"), 1, "the sealed token is reused");
}
