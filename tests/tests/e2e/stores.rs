//! The stores a deployment can choose: the outbound-Redis store (`store = "redis"`) against a
//! real `redis-server`, and Spin's `type = "redis"` key-value backend, whose lying swaps the
//! components detect and refuse.

use serde_json::{Value, json};

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
