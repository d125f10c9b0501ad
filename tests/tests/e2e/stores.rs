//! The stores a deployment can choose: the outbound-Redis store (`store = "redis"`) against a
//! real `redis-server`, and Spin's `type = "redis"` key-value backend, whose lying swaps the
//! components detect and refuse.

use serde_json::{Value, json};

use portcullis_host::host::kv::StoreFaults;

use crate::support::*;

/// Every key in the world's Redis.
fn redis_keys(world: &World) -> Vec<String> {
    let mut connection = world.redis.as_ref().expect("a world on Redis").connect().unwrap();
    redis::cmd("KEYS").arg("*").query(&mut connection).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_opens_and_closes_with_its_state_in_redis_and_none_in_spins_store() {
    let world = World::on_redis(&[]).await;
    world.manual_policy(2).await;
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!(status, 201, "{body}");
    let id = id(&body);
    assert_eq!(body["state"], "pending");
    // Two approvals sent at once by the same approver count once; a second approver opens it.
    let (first, second) = tokio::join!(world.decide(&id, "approve", BOB), world.decide(&id, "approve", BOB));
    let statuses = [first.0, second.0];
    assert!(statuses.contains(&200) && statuses.iter().all(|s| [200, 409].contains(s)), "{first:?} {second:?}");
    assert_eq!(world.get_request(&id).await["state"], "pending", "one approver of two is not enough");
    let (status, body) = world.decide(&id, "approve", DAVE).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "active", "{body}");
    assert_eq!(world.jit_rules().len(), 1);

    let keys = redis_keys(&world);
    assert!(keys.contains(&format!("req:{id}")), "the request lives in Redis: {keys:?}");
    assert!(keys.iter().any(|k| k.starts_with("audit:")), "{keys:?}");
    assert!(world.store_keys().is_empty(), "Spin's key-value store stays unused: {:?}", world.store_keys());

    world.advance_minutes(61);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "the sweep closed it: {:?}", world.jit_rules());
    assert_eq!(world.get_request(&id).await["state"], "expired");
    let (status, verified) = world.call("GET", "/api/audit/verify", Some(ADMIN), None).await;
    assert_eq!((status, &verified["valid"]), (200, &json!(true)), "{verified}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_address_outside_allowed_outbound_hosts_is_refused_by_the_host() {
    // redis_host (the allowed_outbound_hosts entry) names another server than redis_url.
    let world = World::on_redis(&[("redis_host", "redis://10.255.255.1:6379")]).await;
    let response =
        world.client.get(format!("{}/api/policies", world.local.host.url())).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 500);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal_error", "{body}");
    let logs = world.local.host.guest_logs();
    assert!(logs.contains("refused: not in allowed_outbound_hosts"), "{logs}");
    assert!(redis_keys(&world).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn spins_redis_key_value_backend_is_refused_with_a_clear_error() {
    // The host reproduces Spin 3.6's `type = "redis"` backend: a swap that lands says
    // `cas-failed`, one that lost says Ok.
    let world =
        World::with_runtime_config("[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n")
            .await;
    let response = world
        .client
        .put(format!("{}/api/policies/demo-vm", world.local.host.url()))
        .bearer_auth(ADMIN)
        .body(policy(json!({"mode": "auto"})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unsupported", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("store = \"redis\"") && message.contains("Cosmos"), "says what to use: {message}");
    // Nothing opens on such a store either.
    let (status, _) = world.request(ALICE, &ssh("PT1H")).await;
    assert_ne!(status, 201);
    assert!(world.jit_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn swaps_that_land_but_report_failure_as_cosmos_does_are_retried_never_refused() {
    // Spin's Cosmos DB backend reports a throttled write that went through as `cas-failed`;
    // the components must treat it as a lost race (re-read, decide), never as the broken
    // Redis backend.
    let world = World::start().await;
    world.auto_policy().await;
    let faults = StoreFaults { landed_swaps_reported_failed: 0.3, ..StoreFaults::default() };
    world.local.host.store().inject(faults);
    let mut created = 0;
    for _ in 0..10 {
        let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
        assert_ne!(body["error"]["code"], "store_unsupported", "{body}");
        assert!(status == 201 || status == 409 || status == 500, "{status} {body}");
        created += usize::from(status == 201);
    }
    assert!(world.local.host.store().injected()[3] > 0, "the fault was hit");
    assert!(created > 0, "some requests went through");
    world.local.host.store().inject(StoreFaults::default());
    for _ in 0..3 {
        world.advance_minutes(6);
        world.tick().await;
    }
    // Whatever the answers said, what is active owns exactly one rule and nothing else is open.
    let (_, listed) = world.call("GET", "/api/requests", Some(ADMIN), None).await;
    let active: Vec<String> = listed["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "active")
        .map(|r| format!("jit-{}", r["id"].as_str().unwrap()))
        .collect();
    let mut rules: Vec<String> = world.jit_rules().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect();
    rules.sort();
    let mut expected = active.clone();
    expected.sort();
    assert_eq!(rules, expected);
    assert!(active.len() <= 1, "one grant per requester and policy: {active:?}");
}
