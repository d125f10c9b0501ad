//! Interleavings, with ARM slowed down so the windows are wide: a revoke while the PUT is in
//! flight, expiry racing an extension, two sweeps at once, a close racing a narrowing re-PUT,
//! and a sweep with more work than one invocation may swap for. Whatever the order, no allow
//! rule outlives its grant.

use std::time::Duration;

use portcullis_host::emulator::{Fault, FaultKind};
use serde_json::{Value, json};

use crate::support::*;

/// Slows the next `times` calls of `method` on grant rules by `seconds`.
fn slow(world: &World, method: &'static str, seconds: u64, times: u32) {
    let mut fault = Fault::of(Some(method), FaultKind::Slow(Duration::from_secs(seconds)), times);
    fault.path_contains = Some("/securityRules/jit-".into());
    world.inject(fault);
}

/// The id of alice's request in `state`, as she sees it listed, once it appears.
async fn wait_for_state(world: &World, key: &str, state: &str) -> String {
    for _ in 0..200 {
        let (_, body) = world.call("GET", "/api/requests?mine=true", Some(key), None).await;
        if let Some(found) = body["requests"].as_array().into_iter().flatten().find(|r| r["state"] == state) {
            return found["id"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no request of {key} became {state}");
}

/// How many times `action` took effect: write-ahead records `ok` before the change and a
/// `failed` after it when another writer won, so the net count is what happened.
fn net(trail: &[String], action: &str) -> isize {
    let count = |outcome: &str| trail.iter().filter(|a| **a == format!("{action} {outcome}")).count() as isize;
    count("ok") - count("failed")
}

/// Grants of alice, carol and erin on port 22 for ten minutes, all ending in the same minute.
async fn three_grants_of_ten_minutes(world: &World) -> Vec<String> {
    let mut ids = Vec::new();
    for key in [ALICE, CAROL, ERIN] {
        let body = json!({"policy": "demo-vm", "ports": [22], "duration": "PT10M", "justification": "INC-1"});
        let (status, grant) = world.request(key, &body).await;
        assert_eq!(status, 201, "{grant}");
        ids.push(id(&grant));
    }
    ids
}

async fn actions(world: &World, id: &str) -> Vec<String> {
    world
        .audit(&format!("request={id}"))
        .await
        .iter()
        .map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_revoke_while_the_put_is_in_flight_leaves_no_rule() {
    // Reported: the revoke answered 200 `revoked`, the create 409, and `jit-<id>` stayed on the
    // NSG for good, because the revoke deleted nothing (no rule was saved yet).
    let world = World::start().await;
    world.auto_policy().await;
    slow(&world, "PUT", 2, 1);
    let body = ssh("PT1H");
    let create = world.request(ALICE, &body);
    let revoke = async {
        let id = wait_for_state(&world, ALICE, "approved").await;
        let answer = world.call("POST", &format!("/api/requests/{id}/revoke"), Some(ALICE), Some("{}")).await;
        (id, answer)
    };
    let ((created_status, created), (id, (revoked_status, revoked))) = tokio::join!(create, revoke);
    assert_eq!(revoked_status, 200, "{revoked}");
    assert_eq!(created_status, 201, "the opener reports what became of its request: {created}");
    assert!(world.jit_rules().is_empty(), "the rule the slow PUT put is gone: {:?}", world.jit_rules());
    let request = world.get_request(&id).await;
    assert_eq!(request["state"], "revoked", "{request}");
    // Nothing brings it back later either.
    world.advance_minutes(5);
    world.tick().await;
    assert!(world.jit_rules().is_empty());
    let trail = actions(&world, &id).await;
    assert_eq!(net(&trail, "request.revoked"), 1, "{trail:?}");
    assert_eq!(net(&trail, "request.activated"), 0, "never active: {trail:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_during_a_put_that_times_out_but_lands_still_removes_the_rule() {
    let world = World::with_variables(&[("arm_timeout", "PT1S")]).await;
    world.auto_policy().await;
    // The PUT lands but answers after the client gave up; the retry is slow too.
    slow(&world, "PUT", 2, 2);
    let body = ssh("PT1H");
    let create = world.request(ALICE, &body);
    let revoke = async {
        let id = wait_for_state(&world, ALICE, "approved").await;
        world.call("POST", &format!("/api/requests/{id}/revoke"), Some(ALICE), Some("{}")).await;
        id
    };
    let (_, id) = tokio::join!(create, revoke);
    // Give the late answers time to land, then let the leases run out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    world.advance_minutes(6);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
    assert_eq!(world.get_request(&id).await["state"], "revoked");
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_racing_an_extension_ends_consistent_either_way() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&grant);
    world.advance_minutes(61);
    slow(&world, "DELETE", 1, 1);
    let path = format!("/api/requests/{id}/extend");
    let extend = world.call("POST", &path, Some(ALICE), Some(r#"{"duration":"PT30M"}"#));
    let (extended, ()) = tokio::join!(extend, world.tick());
    let request = world.get_request(&id).await;
    match extended.0 {
        200 => {
            // The extension won: the grant runs on, with its rule.
            assert_eq!(request["state"], "active", "{request}");
            assert_eq!(world.jit_rules().len(), 1);
        }
        409 => {
            assert_eq!(request["state"], "expired", "{request}");
            assert!(world.jit_rules().is_empty());
        }
        other => panic!("extend answered {other}: {}", extended.1),
    }
    // And whichever won, the end comes.
    world.advance_minutes(40);
    world.tick().await;
    assert!(world.jit_rules().is_empty());
    assert_eq!(world.get_request(&id).await["state"], "expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sweeps_at_once_close_every_grant_exactly_once() {
    let world = World::start().await;
    world.auto_policy().await;
    let ids = three_grants_of_ten_minutes(&world).await;
    world.advance_minutes(11);
    slow(&world, "DELETE", 1, 2);
    tokio::join!(world.tick(), world.tick());
    world.advance_minutes(4);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
    for id in &ids {
        assert_eq!(world.get_request(id).await["state"], "expired");
        let trail = actions(&world, id).await;
        assert_eq!(net(&trail, "request.expired"), 1, "{id}: {trail:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_racing_a_batch_of_expiring_grants_ends_each_once_and_leaves_no_rule() {
    // Three grants fall due together: the sweep closes them as one batch, its DELETEs slowed,
    // while carol revokes hers. Whichever wins on carol's, every grant ends exactly once and
    // no rule is left.
    let world = World::start().await;
    world.auto_policy().await;
    let ids = three_grants_of_ten_minutes(&world).await;
    world.advance_minutes(11);
    slow(&world, "DELETE", 1, 3);
    let revoke = world.decide(&ids[1], "revoke", CAROL);
    let (revoked, ()) = tokio::join!(revoke, world.tick());
    assert!(revoked.0 == 200 || revoked.0 == 409, "revoke answered {}: {}", revoked.0, revoked.1);
    world.advance_minutes(2);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
    for (n, id) in ids.iter().enumerate() {
        let state = world.get_request(id).await["state"].as_str().unwrap().to_owned();
        let trail = actions(&world, id).await;
        let ends = net(&trail, "request.expired") + net(&trail, "request.revoked");
        assert_eq!(ends, 1, "{id} ended {ends} times: {trail:?}");
        let expected: &[&str] = if n == 1 { &["expired", "revoked"] } else { &["expired"] };
        assert!(expected.contains(&state.as_str()), "{id} is {state}: {trail:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_racing_the_narrowing_of_an_older_grant_still_removes_its_rule() {
    let world = World::start().await;
    world.auto_policy().await;
    let both = json!({"policy": "demo-vm", "ports": [22, 3389], "duration": "PT1H", "justification": "INC-1"});
    let (_, older) = world.request(ALICE, &both).await;
    let older = id(&older);
    // The newer request for 22 narrows the older grant to 3389 with a slow re-PUT, while the
    // older grant is revoked.
    slow(&world, "PUT", 2, 2);
    let body = ssh("PT1H");
    let newer = world.request(ALICE, &body);
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        world.call("POST", &format!("/api/requests/{older}/revoke"), Some(ALICE), Some("{}")).await
    };
    let ((status, newer), _) = tokio::join!(newer, revoke);
    assert_eq!(status, 201, "{newer}");
    world.advance_minutes(4);
    world.tick().await;
    let rules: Vec<String> = world.jit_rules().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect();
    assert_eq!(world.get_request(&older).await["state"], "revoked");
    assert!(!rules.contains(&format!("jit-{older}")), "{rules:?}");
    assert_eq!(rules, [format!("jit-{}", id(&newer))], "the newer grant keeps its own rule");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_with_more_work_than_one_invocation_may_swap_for_spreads_it_over_ticks() {
    // 80 grants of different people (one person holds one rule per port) end in one minute:
    // closed as one batch, a grant costs about three swaps, so they need two invocations.
    let keys: Vec<String> = (0..80).map(|n| format!("many-key-{n}")).collect();
    let world = World::with_keys(&keys, &[]).await;
    let mut many = policy(json!({"mode": "auto"}));
    many["quotas"] = json!({"per_requester": 100, "per_vm": 100});
    let (status, body) = world.put_policy("demo-vm", &many).await;
    assert_eq!(status, 201, "{body}");
    for key in &keys {
        let (status, body) = world.request(key, &ssh("PT5M")).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    }
    world.advance_minutes(6);
    let mut ticks = 0;
    while !world.jit_rules().is_empty() && ticks < 10 {
        world.tick().await;
        ticks += 1;
    }
    assert!(world.jit_rules().is_empty(), "{} left after {ticks} ticks", world.jit_rules().len());
    assert!(ticks >= 2, "80 closes cannot fit one invocation's swaps");
    assert!(!world.local.host.guest_logs().contains("too many compare_and_swaps"), "the cap was never hit");
    let health: Value = world.call("GET", "/api/health", None, None).await.1;
    assert_eq!(health["status"], "ok", "{health}");
}
