//! The whole loop: request, approve, open, expire, close.

use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_auto_approved_rule_opens_with_the_right_fields_and_closes_after_ends_at() {
    let world = World::start().await;
    world.auto_policy().await;
    let (status, request) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, request["state"].as_str()), (201, Some("active")), "{request}");
    let id = id(&request);

    let rules = world.jit_rules();
    assert_eq!(rules.len(), 1, "{rules:?}");
    let rule = &rules[0];
    assert_eq!(rule["name"], format!("jit-{id}"));
    let p = &rule["properties"];
    assert_eq!(
        (p["access"].as_str(), p["direction"].as_str(), p["protocol"].as_str()),
        (Some("Allow"), Some("Inbound"), Some("Tcp"))
    );
    assert_eq!(p["sourceAddressPrefix"], "127.0.0.1/32");
    assert_eq!(p["destinationAddressPrefix"], "10.0.0.4");
    assert_eq!(p["destinationPortRanges"], json!(["22"]));
    assert_eq!(p["provisioningState"], "Succeeded");
    let priority = p["priority"].as_u64().unwrap();
    assert!((100..=3999).contains(&priority), "{priority}");
    assert_eq!(request["rules"][0]["priority"].as_u64(), Some(priority));
    assert!(p["description"].as_str().unwrap().contains("alice"));

    // Not yet due: a tick changes nothing.
    world.advance_minutes(59);
    world.tick().await;
    assert_eq!(world.jit_rules().len(), 1);
    assert_eq!(world.get_request(&id).await["state"], "active");

    world.advance_minutes(2);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
    let closed = world.get_request(&id).await;
    assert_eq!(closed["state"], "expired");
    assert!(closed["closed_at"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_request_waits_for_an_approver_and_then_opens() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let (status, request) = world.request(ALICE, &ssh("PT30M")).await;
    assert_eq!((status, request["state"].as_str()), (201, Some("pending")));
    assert!(world.jit_rules().is_empty());
    assert!(world.arm_calls().is_empty(), "a pending request must not touch ARM");

    let (status, approved) = world.decide(&id(&request), "approve", BOB).await;
    assert_eq!((status, approved["state"].as_str()), (200, Some("active")), "{approved}");
    assert_eq!(approved["approvals"][0]["by"], "bob");
    assert_eq!(world.jit_rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_of_two_approvals_are_needed_and_one_approver_counts_once() {
    let world = World::start().await;
    world.manual_policy(2).await;
    let (_, request) = world.request(ALICE, &ssh("PT30M")).await;
    let id = id(&request);
    assert_eq!(world.decide(&id, "approve", BOB).await.1["state"], "pending");
    let (status, again) = world.decide(&id, "approve", BOB).await;
    assert_eq!((status, again["error"]["code"].as_str()), (409, Some("already_approved")));
    assert!(world.jit_rules().is_empty());
    assert_eq!(world.decide(&id, "approve", DAVE).await.1["state"], "active");
    assert_eq!(world.jit_rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_request_opens_nothing_and_stays_denied() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let (_, request) = world.request(ALICE, &ssh("PT30M")).await;
    let id = id(&request);
    let (status, denied) =
        world.call("POST", &format!("/api/requests/{id}/deny"), Some(BOB), Some(r#"{"reason":"change freeze"}"#)).await;
    assert_eq!((status, denied["state"].as_str()), (200, Some("denied")));
    assert_eq!(denied["ended"]["reason"], "change freeze");
    let (status, late) = world.decide(&id, "approve", DAVE).await;
    assert_eq!((status, late["error"]["code"].as_str()), (409, Some("invalid_state")));
    assert!(world.jit_rules().is_empty());
    assert!(world.arm_calls().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn durations_from_one_minute_to_the_policy_maximum_are_granted() {
    let world = World::start().await;
    world.auto_policy().await;
    for (duration, normalised) in [("PT1M", "PT1M"), ("PT90M", "PT1H30M"), ("PT3H", "PT3H")] {
        let (status, body) = world.request(ALICE, &ssh(duration)).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{duration}: {body}");
        assert_eq!(body["duration"], normalised);
        let ends = chrono::DateTime::parse_from_rfc3339(body["ends_at"].as_str().unwrap()).unwrap();
        let started = chrono::DateTime::parse_from_rfc3339(body["activated_at"].as_str().unwrap()).unwrap();
        assert_eq!((ends - started).num_seconds(), shared_secs(normalised));
    }
    let (status, body) = world.request(ALICE, &ssh("PT3H1M")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("duration_too_long")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_request_replaces_the_same_persons_older_grant_on_the_same_port() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, first) = world.request(ALICE, &ssh("PT1H")).await;
    let (_, second) = world.request(ALICE, &ssh("PT2H")).await;
    let rules = world.jit_rules();
    assert_eq!(rules.len(), 1, "one person, one port, one rule: {rules:?}");
    assert_eq!(rules[0]["name"], format!("jit-{}", id(&second)));
    let replaced = world.get_request(&id(&first)).await;
    assert_eq!(replaced["state"], "revoked", "{replaced}");
    assert!(replaced["ended"]["reason"].as_str().unwrap().starts_with("newer request initiated"));
    // Another person keeps a rule of their own.
    let (_, carols) = world.request(CAROL, &ssh("PT1H")).await;
    assert_eq!(carols["state"], "active");
    assert_eq!(world.jit_rules().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_newer_request_for_some_ports_narrows_the_older_rule_to_the_rest() {
    let world = World::start().await;
    world.auto_policy().await;
    let both = json!({"policy": "demo-vm", "ports": [22, 3389], "duration": "PT1H", "justification": "x"});
    let (_, first) = world.request(ALICE, &both).await;
    let (_, second) = world.request(ALICE, &ssh("PT2H")).await;
    let narrowed = world.get_request(&id(&first)).await;
    assert_eq!((narrowed["state"].as_str(), narrowed["ports"].clone()), (Some("active"), json!([3389])));
    let rules = world.jit_rules();
    let ports_of = |request: &serde_json::Value| {
        let rule = rules.iter().find(|r| r["name"] == format!("jit-{}", id(request))).unwrap();
        rule["properties"]["destinationPortRanges"].clone()
    };
    assert_eq!((ports_of(&first), ports_of(&second)), (json!(["3389"]), json!(["22"])));
}

fn shared_secs(duration: &str) -> i64 {
    match duration {
        "PT1M" => 60,
        "PT1H30M" => 5400,
        "PT3H" => 10_800,
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_above_the_global_maximum_need_it_raised_in_configuration() {
    let world = World::start().await;
    let mut long = policy(json!({"mode": "auto"}));
    long["ports"][0]["max_duration"] = json!("PT36H");
    let (status, body) = world.put_policy("demo-vm", &long).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_policy")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("PT24H"));

    let world = World::with_variables(&[("max_duration", "PT48H")]).await;
    assert_eq!(world.put_policy("demo-vm", &long).await.0, 201);
    assert_eq!(world.request(ALICE, &ssh("PT36H")).await.1["state"], "active");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_priority_taken_by_another_rule_moves_to_the_next_free_one() {
    let world = World::with_variables(&[("jit_priority_min", "100"), ("jit_priority_max", "102")]).await;
    world.local.emulator.seed_rule(
        portcullis_host::emulator::DEMO_NSG,
        "corp-bastion",
        json!({"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "22", "sourceAddressPrefix": "10.9.0.0/16",
               "destinationAddressPrefix": "*", "access": "Allow", "priority": 100, "direction": "Inbound"}),
    );
    world.auto_policy().await;
    let mut priorities = Vec::new();
    for _ in 0..2 {
        let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
        priorities.push(body["rules"][0]["priority"].as_u64().unwrap());
    }
    priorities.sort();
    assert_eq!(priorities, [101, 102]);
    let foreign = world.rules().into_iter().find(|r| r["name"] == "corp-bastion").unwrap();
    assert_eq!(foreign["properties"]["priority"], 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_can_be_listed_filtered_and_cancelled_while_pending() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let (_, first) = world.request(ALICE, &ssh("PT30M")).await;
    let (_, second) = world.request(CAROL, &ssh("PT30M")).await;
    let (status, cancelled) =
        world.call("POST", &format!("/api/requests/{}/cancel", id(&first)), Some(ALICE), None).await;
    assert_eq!((status, cancelled["state"].as_str()), (200, Some("cancelled")));

    let (_, mine) = world.call("GET", "/api/requests?mine=true", Some(ALICE), None).await;
    let ids: Vec<&str> = mine["requests"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id(&first)]);
    let (_, pending) = world.call("GET", "/api/requests?state=pending", Some(BOB), None).await;
    let ids: Vec<&str> = pending["requests"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id(&second)]);
    // Alice cannot see Carol's request.
    let (status, _) = world.call("GET", &format!("/api/requests/{}", id(&second)), Some(ALICE), None).await;
    assert_eq!(status, 404);
    let (status, body) = world.call("GET", "/api/requests?state=bogus", Some(BOB), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_state_filter")));
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_can_be_read_listed_replaced_and_deleted() {
    let world = World::start().await;
    world.auto_policy().await;
    let (status, listed) = world.call("GET", "/api/policies", Some(ALICE), None).await;
    assert_eq!((status, listed["policies"][0]["name"].as_str()), (200, Some("demo-vm")));
    let mut changed = policy(json!({"mode": "auto"}));
    changed["enabled"] = json!(false);
    assert_eq!(world.put_policy("demo-vm", &changed).await.0, 200);
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("policy_disabled")));
    assert_eq!(world.call("DELETE", "/api/policies/demo-vm", Some(ADMIN), None).await.0, 200);
    assert_eq!(world.call("GET", "/api/policies/demo-vm", Some(ADMIN), None).await.0, 404);
}
