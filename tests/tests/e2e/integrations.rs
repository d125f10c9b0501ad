//! Decisions from other systems: `POST /webhooks/decision`, signed as Standard Webhooks
//! specify with the integration's secret; replays, stale or forged messages and integrations
//! a policy does not list decide nothing.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::*;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Posts a decision signed with `secret` at guest time + `skew_secs`; answers status and body.
async fn send(world: &World, secret: &str, id: &str, skew_secs: i64, body: &Value) -> (u16, Value) {
    let timestamp = world.local.host.clock().now().timestamp() + skew_secs;
    let body = body.to_string();
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap()).unwrap();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    let signature = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    let response = world
        .client
        .post(format!("{}/webhooks/decision", world.local.host.url()))
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn world() -> World {
    let integrations = json!([{"name": "servicenow", "secret": SECRET}]).to_string();
    let world = World::with_variables(&[("decision_integrations", &integrations)]).await;
    let body = policy(json!({"mode": "manual", "approvers": ["group:ops", "integration:servicenow"], "required": 1}));
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);
    world
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signed_decision_from_a_listed_integration_counts_once() {
    let world = world().await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let approve = json!({"request": id(&request), "decision": "approve", "comment": "CHG0042 approved", "on_behalf_of": "jane@corp.example"});
    let (status, answer) = send(&world, SECRET, "msg_1", 0, &approve).await;
    assert_eq!((status, answer["state"].as_str()), (200, Some("active")), "{answer}");
    assert_eq!(answer["approvals"][0]["by"], "integration:servicenow");
    assert_eq!(world.jit_rules().len(), 1);
    let approved = world.audit(&format!("request={}&action=request.approved", id(&request))).await;
    assert_eq!(
        (approved[0]["actor"].as_str(), approved[0]["actor_name"].as_str()),
        (Some("integration:servicenow"), Some("jane@corp.example"))
    );
    // The same message again decides nothing.
    let (status, answer) = send(&world, SECRET, "msg_1", 0, &approve).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (409, Some("replayed")), "{answer}");

    let (_, second) = world.request(CAROL, &ssh("PT1H")).await;
    let deny = json!({"request": id(&second), "decision": "deny", "comment": "no change ticket"});
    let (status, answer) = send(&world, SECRET, "msg_2", 0, &deny).await;
    assert_eq!((status, answer["state"].as_str()), (200, Some("denied")), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_stale_and_unlisted_decisions_change_nothing() {
    let world = world().await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let approve = json!({"request": id(&request), "decision": "approve"});
    let counted = ["audit:", "authfail:", "tally:", "cache:", "seen:"];
    let state = || {
        world
            .local
            .host
            .dump_store()
            .into_iter()
            .filter(|(k, _)| !counted.iter().any(|p| k.starts_with(p)))
            .collect::<Vec<_>>()
    };
    let before = state();
    let forged = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    assert_eq!(send(&world, forged, "msg_a", 0, &approve).await.0, 401, "another secret");
    assert_eq!(send(&world, SECRET, "msg_b", -600, &approve).await.0, 401, "ten minutes old");
    assert_eq!(send(&world, SECRET, "msg_c", 600, &approve).await.0, 401, "ten minutes ahead");
    assert_eq!(send(&world, SECRET, "bad/id", 0, &approve).await.0, 401, "an id that is no id");
    let unsigned = world.call("POST", "/webhooks/decision", None, Some(&approve.to_string())).await;
    assert_eq!(unsigned.0, 401);
    assert_eq!(state(), before, "nothing changed");
    assert!(world.jit_rules().is_empty());
    // A policy that does not list the integration: the API's own rules refuse it.
    let other = policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1}));
    assert_eq!(world.put_policy("demo-vm", &other).await.0, 200);
    let (_, request) = world.request(CAROL, &ssh("PT1H")).await;
    let approve = json!({"request": id(&request), "decision": "approve"});
    let (status, answer) = send(&world, SECRET, "msg_d", 0, &approve).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("not_an_approver")), "{answer}");
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");
}
