//! Approval workflows end to end: auto-approval rules, justification patterns, pending
//! timeouts, revoke, extend, break-glass, quotas, duplicates, dry runs and approvers' queues.

use serde_json::{Value, json};

use crate::support::*;

/// A manual policy (2 approvers from ops) with extra settings merged in.
async fn workflow_policy(world: &World, extra: Value) {
    let mut body = policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1}));
    for (k, v) in extra.as_object().unwrap() {
        if k == "approval" {
            for (ak, av) in v.as_object().unwrap() {
                body["approval"][ak] = av.clone();
            }
        } else {
            body[k] = v.clone();
        }
    }
    let (status, answer) = world.put_policy("demo-vm", &body).await;
    assert!(status == 200 || status == 201, "{answer}");
    world.local.emulator.clear_calls();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_first_matching_auto_rule_approves_and_anything_else_waits_for_approvers() {
    let world = World::start().await;
    // Days and hours are pinned by unit tests (`domain::decide`); here the order and the fallback.
    let rules = json!([
        {"name": "ops-only", "groups": ["ops"]},
        {"name": "devs-short-ssh", "groups": ["devs"], "max_duration": "PT1H", "ports": [22], "sources": ["127.0.0.0/8"]},
    ]);
    workflow_policy(&world, json!({"approval": {"auto_rules": rules}})).await;
    let (status, quick) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!(
        (status, quick["state"].as_str(), quick["auto_rule"].as_str()),
        (201, Some("active"), Some("devs-short-ssh")),
        "{quick}"
    );
    let (_, long) = world
        .request(ALICE, &json!({"policy": "demo-vm", "ports": [3389], "duration": "PT1H", "justification": "x"}))
        .await;
    assert_eq!((long["state"].as_str(), long.get("auto_rule")), (Some("pending"), None), "{long}");
    let (_, ops) = world.request(CAROL, &ssh("PT2H")).await;
    assert_eq!(ops["auto_rule"], "ops-only", "carol is in ops: the first rule decides");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_justification_must_match_the_policys_pattern() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"mode": "auto"}, "justification_pattern": "^(INC|CHG)-\\d+$"})).await;
    let mut body = ssh("PT1H");
    body["justification"] = json!("just checking something");
    let (status, answer) = world.request(ALICE, &body).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("justification_mismatch")));
    assert!(answer["error"]["message"].as_str().unwrap().contains("^(INC|CHG)-\\d+$"), "{answer}");
    body["justification"] = json!("CHG-42");
    assert_eq!(world.request(ALICE, &body).await.1["state"], "active");
    let mut bad = policy(json!({"mode": "auto"}));
    bad["justification_pattern"] = json!("(unclosed");
    let (status, answer) = world.put_policy("demo-vm", &bad).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("invalid_policy")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_request_times_out_at_the_sweep_after_its_timeout() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"pending_timeout": "PT5M"}})).await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    world.advance_minutes(4);
    world.tick().await;
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");
    world.advance_minutes(2);
    world.tick().await;
    let timed_out = world.get_request(&id(&request)).await;
    assert_eq!(timed_out["state"], "timed_out", "{timed_out}");
    assert_eq!(world.decide(&id(&request), "approve", BOB).await.0, 409);
    assert!(world.jit_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn revoke_closes_the_rule_at_once_for_the_requester_an_approver_or_an_admin_only() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"mode": "manual", "auto_rules": [{"name": "all"}]}})).await;
    let (_, mine) = world.request(ALICE, &ssh("PT1H")).await;
    let (_, carols) = world.request(CAROL, &ssh("PT1H")).await;
    assert_eq!(world.jit_rules().len(), 2);
    // A stranger cannot see, let alone revoke, someone else's grant.
    assert_eq!(world.call("POST", &format!("/api/requests/{}/revoke", id(&carols)), Some(ALICE), None).await.0, 404);

    let (status, revoked) = world
        .call("POST", &format!("/api/requests/{}/revoke", id(&mine)), Some(ALICE), Some(r#"{"reason":"done early"}"#))
        .await;
    assert_eq!((status, revoked["state"].as_str()), (200, Some("revoked")), "{revoked}");
    assert_eq!(world.jit_rules().len(), 1, "the rule goes before the answer, not at the next tick");
    let (status, revoked) = world.call("POST", &format!("/api/requests/{}/revoke", id(&carols)), Some(BOB), None).await;
    assert_eq!((status, revoked["ended"]["by"].as_str()), (200, Some("bob")));
    assert!(world.jit_rules().is_empty());
    assert_eq!(world.call("POST", &format!("/api/requests/{}/revoke", id(&carols)), Some(ADMIN), None).await.0, 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn extend_moves_the_end_within_the_maximum_and_the_sweep_honours_it() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    let (status, extended) = extend(&world, &grant, "PT1H").await;
    assert_eq!((status, extended["extensions"][0]["by_duration"].as_str()), (200, Some("PT1H")), "{extended}");
    let (status, refused) = extend(&world, &grant, "PT1H30M").await;
    assert_eq!((status, refused["error"]["code"].as_str()), (422, Some("extension_too_long")), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("PT3H"));

    world.advance_minutes(61);
    world.tick().await;
    assert_eq!(world.get_request(&id(&grant)).await["state"], "active", "the old end no longer closes it");
    world.advance_minutes(60);
    world.tick().await;
    assert_eq!(world.get_request(&id(&grant)).await["state"], "expired");
    assert!(world.jit_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_can_require_an_approver_to_extend() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"auto_rules": [{"name": "all"}]}, "extensions": "approval"})).await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    let path = format!("/api/requests/{}/extend", id(&grant));
    let (status, refused) = world.call("POST", &path, Some(ALICE), Some(r#"{"duration":"PT30M"}"#)).await;
    assert_eq!((status, refused["error"]["code"].as_str()), (403, Some("extension_needs_approval")));
    let (status, extended) = world.call("POST", &path, Some(BOB), Some(r#"{"duration":"PT30M"}"#)).await;
    assert_eq!((status, extended["extensions"][0]["by"].as_str()), (200, Some("bob")), "{extended}");
}

#[tokio::test(flavor = "multi_thread")]
async fn break_glass_self_activates_for_members_only_capped_flagged_and_within_sources() {
    let world = World::start().await;
    workflow_policy(&world, json!({"break_glass": {"members": ["group:oncall"], "max_duration": "PT30M"}})).await;
    let glass = |duration: &str| json!({"policy": "demo-vm", "ports": [22], "duration": duration, "justification": "INC-9 outage", "break_glass": true});
    let (status, opened) = world.request(ERIN, &glass("PT30M")).await;
    assert_eq!(
        (status, opened["state"].as_str(), opened["break_glass"].as_bool()),
        (201, Some("active"), Some(true)),
        "{opened}"
    );
    assert!(opened["approvals"].as_array().unwrap().is_empty());
    assert!(world.local.host.guest_logs().contains("BREAK-GLASS: erin"), "a break-glass use must be loud");

    let (status, too_long) = world.request(ERIN, &glass("PT45M")).await;
    assert_eq!((status, too_long["error"]["code"].as_str()), (422, Some("duration_too_long")));
    let (status, not_member) = world.request(ALICE, &glass("PT10M")).await;
    assert_eq!((status, not_member["error"]["code"].as_str()), (403, Some("break_glass_not_allowed")));
    let mut elsewhere = glass("PT10M");
    elsewhere["source"] = json!("198.51.100.7");
    let (status, outside) = world.request(ERIN, &elsewhere).await;
    assert_eq!(
        (status, outside["error"]["code"].as_str()),
        (422, Some("source_not_allowed")),
        "break-glass never bypasses sources"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quotas_and_duplicates_are_refused() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"auto_rules": [{"name": "short", "max_duration": "PT1H"}]}, "quotas": {"per_requester": 1, "per_vm": 2}})).await;
    assert_eq!(world.request(ALICE, &ssh("PT1H")).await.1["state"], "active");
    let rdp = json!({"policy": "demo-vm", "ports": [3389], "duration": "PT1H", "justification": "x"});
    let (status, answer) = world.request(ALICE, &rdp).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("quota_exceeded")), "{answer}");
    // Replacing her own grant on the same port is not a new grant.
    assert_eq!(world.request(ALICE, &ssh("PT30M")).await.1["state"], "active");
    assert_eq!(world.request(CAROL, &ssh("PT1H")).await.1["state"], "active");
    let (status, answer) = world.request(ERIN, &ssh("PT1H")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (422, Some("quota_exceeded")), "per VM: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_pending_request_for_the_same_ports_is_a_duplicate() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let (_, pending) = world.request(CAROL, &ssh("PT2H")).await;
    assert_eq!(pending["state"], "pending", "{pending}");
    let (status, answer) = world.request(CAROL, &ssh("PT1H")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (409, Some("duplicate_request")), "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains(&id(&pending)));
    // Once decided, asking again is fine.
    world.decide(&id(&pending), "deny", BOB).await;
    assert_eq!(world.request(CAROL, &ssh("PT1H")).await.0, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn evaluate_explains_the_decision_and_changes_nothing() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"required": 2, "auto_rules": [{"name": "devs-short", "groups": ["devs"], "max_duration": "PT1H"}]}})).await;
    let before = world.store_keys();
    let request = json!({"ports": [22], "duration": "PT1H", "source": "127.0.0.1", "justification": "x"});

    let (status, auto) = evaluate(&world, json!({"principal": "alice", "groups": ["devs"], "request": request})).await;
    assert_eq!(
        (status, auto["auto_approved"].as_bool(), auto["rule"].as_str()),
        (200, Some(true), Some("devs-short")),
        "{auto}"
    );
    let (_, manual) = evaluate(&world, json!({"principal": "carol", "groups": ["ops"], "request": request})).await;
    assert_eq!(
        (manual["allowed"].as_bool(), manual["auto_approved"].as_bool(), manual["required_approvals"].as_u64()),
        (Some(true), Some(false), Some(2))
    );
    assert!(manual["rules"][0]["why_not"].as_str().unwrap().contains("none of the groups devs"), "{manual}");
    let mut outside = request.clone();
    outside["source"] = json!("198.51.100.7");
    let (_, refused) = evaluate(&world, json!({"principal": "alice", "request": outside})).await;
    assert_eq!((refused["allowed"].as_bool(), refused["code"].as_str()), (Some(false), Some("source_not_allowed")));

    assert_eq!(world.store_keys(), before, "a dry run changed state");
    assert!(world.arm_calls().is_empty());
    assert_eq!(world.call("POST", "/api/policies/demo-vm/evaluate", Some(ALICE), Some("{}")).await.0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn approvers_see_what_awaits_them_until_they_have_approved() {
    let world = World::start().await;
    workflow_policy(&world, json!({"approval": {"required": 2}})).await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let (_, own) = world.request(CAROL, &ssh("PT1H")).await;
    assert_eq!(awaiting(&world, BOB).await, [id(&own), id(&request)]);
    assert_eq!(awaiting(&world, CAROL).await, [id(&request)], "never one's own request");
    world.decide(&id(&request), "approve", BOB).await;
    assert_eq!(awaiting(&world, BOB).await, [id(&own)]);
    assert_eq!(awaiting(&world, DAVE).await, [id(&own), id(&request)]);
}

async fn extend(world: &World, grant: &Value, duration: &str) -> (u16, Value) {
    let body = json!({"duration": duration}).to_string();
    world.call("POST", &format!("/api/requests/{}/extend", id(grant)), Some(ALICE), Some(&body)).await
}

async fn evaluate(world: &World, body: Value) -> (u16, Value) {
    world.call("POST", "/api/policies/demo-vm/evaluate", Some(ADMIN), Some(&body.to_string())).await
}

async fn awaiting(world: &World, key: &str) -> Vec<String> {
    let (_, body) = world.call("GET", "/api/requests?awaiting=me", Some(key), None).await;
    body["requests"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_complete_policy_in_the_readme_is_accepted_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let after = readme.split("A complete policy:").nth(1).expect("the README shows a complete policy");
    let block = after.split("```json").nth(1).unwrap().split("```").next().unwrap();
    let mut documented: Value = serde_json::from_str(block).expect("the README's policy is valid JSON");
    documented["vm"] = json!(portcullis_host::emulator::DEMO_VM);
    let world = World::start().await;
    let (status, stored) = world.put_policy("documented", &documented).await;
    assert_eq!(status, 201, "{stored}");
    assert_eq!(stored["approval"]["auto_rules"][0]["name"], "devs-office-hours-ssh");
    assert_eq!(stored["justification_pattern"], "^(INC|CHG)-\\d+");
}
