//! The reconciler and the watchdog: what the NSG holds is compared with what portcullis
//! believes, whatever closed or did not close; `GET /api/health` says when expiry is not
//! keeping up.

use portcullis_host::emulator::{DEMO_NSG, Fault};
use serde_json::{Value, json};

use crate::support::*;

/// A grant rule with portcullis's description, as a crashed or raced opener would leave it.
fn stray_rule(id: &str, priority: u16) -> Value {
    json!({
        "description": format!("portcullis JIT {id} until 2026-12-01T12:00:00Z for mallory"),
        "protocol": "Tcp", "sourcePortRange": "*", "destinationPortRanges": ["22"],
        "sourceAddressPrefix": "198.51.100.7/32", "destinationAddressPrefix": "10.0.0.4",
        "access": "Allow", "priority": priority, "direction": "Inbound",
    })
}

fn names(world: &World) -> Vec<String> {
    world.rules().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect()
}

async fn drift_actions(world: &World) -> Vec<String> {
    world.audit("action=drift.").await.iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ownerless_grant_rule_is_removed_and_nothing_foreign_is_touched() {
    let world = World::start().await;
    world.auto_policy().await;
    world.local.emulator.seed_rule(
        DEMO_NSG,
        "jit-0123456789abcdef01234567",
        stray_rule("0123456789abcdef01234567", 150),
    );
    // Azure's own JIT rule and a rule that only looks like ours: never touched.
    world.local.emulator.seed_rule(DEMO_NSG, "SecurityCenter-JITRule-1", stray_rule("x", 160));
    let mut lookalike = stray_rule("x", 170);
    lookalike["description"] = json!("someone else's rule");
    world.local.emulator.seed_rule(DEMO_NSG, "jit-lookalike", lookalike);
    world.tick().await;
    assert!(
        names(&world).contains(&"jit-0123456789abcdef01234567".to_owned()),
        "a suspect first, not removed on one sight"
    );
    world.advance_minutes(5);
    world.tick().await;
    let left = names(&world);
    assert!(!left.contains(&"jit-0123456789abcdef01234567".to_owned()), "{left:?}");
    assert!(
        left.contains(&"SecurityCenter-JITRule-1".to_owned()) && left.contains(&"jit-lookalike".to_owned()),
        "{left:?}"
    );
    assert_eq!(drift_actions(&world).await, ["drift.rule_removed"]);
    let (status, drift) = world.call("GET", "/api/drift", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{drift}");
    assert_eq!(drift["scans"][0]["findings"][0]["kind"], "rule_removed", "{drift}");
    assert_eq!(world.call("GET", "/api/drift", Some(ALICE), None).await.0, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rule_of_an_ended_request_is_removed_at_once() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&grant);
    world.call("POST", &format!("/api/requests/{id}/revoke"), Some(ALICE), Some("{}")).await;
    // A rule of that request reappears (a PUT that landed after every lease ran out).
    world.local.emulator.seed_rule(DEMO_NSG, &format!("jit-{id}"), stray_rule(&id, 150));
    world.advance_minutes(2);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
    assert_eq!(drift_actions(&world).await, ["drift.rule_removed"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_whose_rule_went_missing_is_reported_or_put_back_or_ended() {
    for (setting, state, rules) in [("report", "active", 0), ("reput", "active", 1), ("revoke", "revoked", 0)] {
        let world = World::with_variables(&[("drift_missing_rule", setting)]).await;
        world.auto_policy().await;
        let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
        let id = id(&grant);
        assert!(world.local.emulator.remove_rule(DEMO_NSG, &format!("jit-{id}")));
        world.tick().await;
        assert_eq!(world.get_request(&id).await["state"], state, "{setting}");
        assert_eq!(world.jit_rules().len(), rules, "{setting}");
        assert_eq!(drift_actions(&world).await, ["drift.rule_missing"], "{setting}");
        // Reported once, not on every scan.
        world.advance_minutes(5);
        world.tick().await;
        assert_eq!(drift_actions(&world).await.len(), 1, "{setting}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_baseline_is_put_back_and_a_foreign_exposure_is_reported() {
    let world = World::start().await;
    world.auto_policy().await;
    assert!(world.local.emulator.remove_rule(DEMO_NSG, "jit-deny-demo-vm"));
    let mut open_door = stray_rule("x", 300);
    open_door["description"] = json!("temporary debugging");
    open_door["sourceAddressPrefix"] = json!("*");
    world.local.emulator.seed_rule(DEMO_NSG, "allow-ssh-anywhere", open_door);
    world.tick().await;
    assert_eq!(world.deny_rules().len(), 1, "restored");
    let actions = drift_actions(&world).await;
    assert_eq!(actions, ["drift.baseline_restored", "drift.exposure"], "{actions:?}");
    assert!(names(&world).contains(&"allow-ssh-anywhere".to_owned()), "reported, never removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_whose_due_entry_was_lost_is_closed_by_the_pass_over_live_grants() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, grant) = world.request(ALICE, &ssh("PT5M")).await;
    let id = id(&grant);
    // The due index loses the entry (a write behind the cursor, a backend that dropped it).
    for (key, _) in world.local.host.dump_store() {
        if key.starts_with("due:") {
            world.local.host.store().delete("default", &key).unwrap();
        }
    }
    world.advance_minutes(6);
    world.tick().await;
    assert_eq!(world.get_request(&id).await["state"], "expired");
    assert!(world.jit_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn health_fails_when_the_sweep_stops_or_a_grant_outlives_its_end() {
    let world = World::start().await;
    world.auto_policy().await;
    let health = || async { world.call("GET", "/api/health", Some(ADMIN), None).await };
    let public = || async { world.call("GET", "/api/health", None, None).await };
    let (status, body) = health().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("failing")), "no sweep yet: {body}");
    assert_eq!(
        public().await,
        (503, json!({"status": "failing", "last_sweep_at": null})),
        "no backlog without a credential"
    );
    world.tick().await;
    let (status, body) = health().await;
    assert_eq!(status, 200, "{body}");
    assert!(body["last_sweep_at"].is_string() && body["backlog"]["arm_work"] == 0, "{body}");
    let (status, open) = public().await;
    assert_eq!((status, open["status"].as_str()), (200, Some("ok")), "{open}");
    assert!(open["last_sweep_at"].is_string() && open.get("backlog").is_none(), "{open}");
    assert_eq!(world.call("GET", "/api/health", Some(ALICE), None).await.0, 403, "details are for admins and auditors");
    // The cron stops.
    world.advance_minutes(4);
    let (status, body) = health().await;
    assert_eq!(status, 503, "{body}");
    assert!(body["problems"][0].as_str().unwrap().contains("last sweep"), "{body}");
    assert_eq!(public().await.0, 503);
    world.tick().await;
    assert_eq!(health().await.0, 200);

    // A grant ends but ARM refuses to delete its rule for a while.
    world.request(ALICE, &ssh("PT5M")).await;
    world.advance_minutes(6);
    world.inject(Fault::new("DELETE", 503, "ServiceUnavailable", u32::MAX));
    for _ in 0..4 {
        world.tick().await;
        world.advance_minutes(1);
    }
    world.tick().await;
    let (status, body) = health().await;
    assert_eq!(status, 503, "{body}");
    assert!(body["problems"].to_string().contains("past its end"), "{body}");
    assert_eq!(body["backlog"]["overdue_grants"], 1, "{body}");
    world.local.emulator.clear_faults();
    world.tick().await;
    assert_eq!(health().await.0, 200);
    assert!(!body.to_string().contains("alice"), "no grant is named: {body}");
}
