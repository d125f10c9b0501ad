//! The Slack app: messages posted to a channel and updated in place as the request changes;
//! button clicks verified (signature, timestamp, replay, workspace), mapped to a principal,
//! acknowledged at once, and decided under the API's rules where the policy allows it.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use portcullis_host::receiver::{Behaviour, Received};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::*;

const SIGNING_SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";

async fn slack_world(chat_decisions: &str) -> World {
    let users = json!({
        "U0BOB": {"principal": "bob", "groups": ["ops"], "roles": ["approver"]},
        "U0CAROL": {"principal": "carol", "groups": ["devs", "ops"], "roles": ["requester", "approver"]},
    })
    .to_string();
    let world = World::with_variables(&[
        ("slack_bot_token", "xoxb-test-token"),
        ("slack_signing_secret", SIGNING_SECRET),
        ("slack_team_id", "T0ACME"),
        ("slack_users", &users),
        ("slack_api_url", "{receiver}"),
    ])
    .await;
    for path in ["/api/chat.postMessage", "/api/chat.update"] {
        world.receiver.behave(path, Behaviour::SlackApi);
    }
    let body = policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1}));
    let mut body = body;
    body["chat_decisions"] = json!(chat_decisions);
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);
    let subscription = json!({"url": world.receiver.origin(), "format": "slack", "channel": "C0APPROVE", "events": ["request.*", "grant.*"]});
    let (status, answer) =
        world.call("PUT", "/api/webhooks/slack-app", Some(ADMIN), Some(&subscription.to_string())).await;
    assert_eq!(status, 201, "{answer}");
    world
}

/// Posts a button click as Slack would, signed at guest time + `skew`; answers the status.
async fn click(
    world: &World,
    team: &str,
    user: &str,
    action: &str,
    request: &str,
    skew: i64,
    secret: &str,
) -> (u16, String) {
    let payload = json!({
        "type": "block_actions", "user": {"id": user, "team_id": team}, "team": {"id": team},
        "response_url": format!("{}/response", world.receiver.origin()),
        "actions": [{"type": "button", "action_id": action, "value": request, "action_ts": "1767323100.123456"}],
    });
    let body = format!("payload={}", url_encode(&payload.to_string()));
    send_signed(world, &body, skew, secret).await
}

/// Signs `body` now (give or take `skew` seconds) and posts it.
async fn send_signed(world: &World, body: &str, skew: i64, secret: &str) -> (u16, String) {
    send_signed_at(world, body, world.local.host.clock().now().timestamp() + skew, secret).await
}

/// Signs `body` at `timestamp` and posts it: the same arguments send the very same bytes.
async fn send_signed_at(world: &World, body: &str, timestamp: i64, secret: &str) -> (u16, String) {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    let signature = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
    let response = world
        .client
        .post(format!("{}/webhooks/slack", world.local.host.url()))
        .header("x-slack-request-timestamp", timestamp.to_string())
        .header("x-slack-signature", signature)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Waits (up to 10 s) for `n` deliveries to `path`.
async fn received(world: &World, path: &str, n: usize) -> Vec<Received> {
    let started = Instant::now();
    loop {
        let got = world.receiver.received(path);
        if got.len() >= n || started.elapsed() > Duration::from_secs(10) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What refusals leave: everything but counters, the trail and delivery bookkeeping.
fn state(world: &World) -> Vec<(String, String)> {
    let skip = ["audit:", "authfail:", "tally:", "cache:", "seen:", "hook:"];
    world.local.host.dump_store().into_iter().filter(|(k, _)| !skip.iter().any(|p| k.starts_with(p))).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_click_decides_only_when_signed_fresh_first_from_the_workspace_mapped_and_not_the_requester() {
    let world = slack_world("direct").await;
    let (_, request) = world.request(CAROL, &ssh("PT1H")).await;
    let id = id(&request);
    let posted = received(&world, "/api/chat.postMessage", 1).await.remove(0);
    assert_eq!(posted.authorization, "Bearer xoxb-test-token");
    assert_eq!(posted.body["channel"], "C0APPROVE");
    let buttons =
        posted.body["blocks"].as_array().unwrap().iter().find(|b| b["type"] == "actions").expect("buttons").clone();
    assert_eq!(buttons["elements"][0]["action_id"], "approve");
    assert_eq!(buttons["elements"][0]["value"], id.as_str());
    let before = state(&world);

    let (status, _) = click(&world, "T0ACME", "U0BOB", "approve", &id, 0, "not the secret").await;
    assert_eq!(status, 401, "a forged signature");
    assert_eq!(click(&world, "T0ACME", "U0BOB", "approve", &id, -600, SIGNING_SECRET).await.0, 401, "ten minutes old");
    let refusals =
        [("T0EVIL", "U0BOB", "workspace"), ("T0ACME", "U0NOBODY", "not mapped"), ("T0ACME", "U0CAROL", "own")];
    for (n, (team, user, why)) in refusals.iter().enumerate() {
        let started = Instant::now();
        assert_eq!(click(&world, team, user, "approve", &id, 0, SIGNING_SECRET).await.0, 200, "acknowledged: {why}");
        assert!(started.elapsed() < Duration::from_secs(3), "within Slack's 3 seconds");
        let told = received(&world, "/response", n + 1).await;
        let text = told[n].body["text"].as_str().unwrap_or_default().to_owned();
        assert_eq!(told[n].body["response_type"], "ephemeral", "only the clicker is told");
        assert!(!text.starts_with("Done"), "{why}: {text}");
    }
    assert_eq!(state(&world), before, "nothing changed");
    assert_eq!(world.get_request(&id).await["state"], "pending");
    assert!(world.jit_rules().is_empty());

    // Bob, mapped and in ops: the click decides as bob, after the answer.
    let payload = json!({
        "type": "block_actions", "user": {"id": "U0BOB", "team_id": "T0ACME"},
        "response_url": format!("{}/response", world.receiver.origin()),
        "actions": [{"action_id": "approve", "value": id}],
    });
    let body = format!("payload={}", url_encode(&payload.to_string()));
    // Signed once: the replay below sends the very same bytes, whatever second it is then.
    let signed_at = world.local.host.clock().now().timestamp();
    assert_eq!(send_signed_at(&world, &body, signed_at, SIGNING_SECRET).await.0, 200);
    let told = received(&world, "/response", 4).await;
    assert_eq!(told[3].body["text"], "Done: the request is now active.");
    assert_eq!(world.get_request(&id).await["state"], "active");
    assert_eq!(world.jit_rules().len(), 1);
    let approved = world.audit(&format!("request={id}&action=request.approved")).await;
    assert_eq!(approved[0]["actor"], "bob");
    // The channel's message is updated in place to show who decided.
    let updates = received(&world, "/api/chat.update", 1).await;
    // The receiver numbered the first message it was sent `1767323045.000000`.
    assert_eq!(
        (updates[0].body["channel"].as_str(), updates[0].body["ts"].as_str()),
        (Some("C0APPROVE"), Some("1767323045.000000"))
    );
    assert!(
        updates.iter().any(|u| u.body["text"].as_str().unwrap_or_default().contains("approved by bob")),
        "{updates:#?}"
    );
    // The very same callback again is a replay.
    assert_eq!(send_signed_at(&world, &body, signed_at, SIGNING_SECRET).await.0, 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_that_wants_a_sign_in_ignores_clicks_and_slack_refusals_are_retried() {
    let world = slack_world("confirm").await;
    world.receiver.behave("/api/chat.postMessage", Behaviour::SlackRefuses);
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&request);
    assert_eq!(click(&world, "T0ACME", "U0BOB", "approve", &id, 0, SIGNING_SECRET).await.0, 200);
    let told = received(&world, "/response", 1).await;
    assert!(told[0].body["text"].as_str().unwrap().contains("does not let a chat click decide"), "{:?}", told[0].body);
    assert_eq!(world.get_request(&id).await["state"], "pending");
    // Slack answered HTTP 200 with "ok": false: not delivered, tried again once it accepts.
    // (The attempt runs after the request's answer: wait until it has been recorded.)
    let started = std::time::Instant::now();
    let deliveries = loop {
        let (_, deliveries) = world.call("GET", "/api/webhooks/slack-app/deliveries", Some(ADMIN), None).await;
        if deliveries["consecutive_failures"] != 0 || started.elapsed() > std::time::Duration::from_secs(10) {
            break deliveries;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        (deliveries["waiting"].as_u64(), deliveries["consecutive_failures"].as_u64()),
        (Some(1), Some(1)),
        "{deliveries}"
    );
    world.receiver.behave("/api/chat.postMessage", Behaviour::SlackApi);
    world.advance_minutes(2);
    world.tick().await;
    let posted = received(&world, "/api/chat.postMessage", 2).await;
    assert_eq!(posted.len(), 2);
    let actions: Vec<&Value> =
        posted[1].body["blocks"].as_array().unwrap().iter().filter(|b| b["type"] == "actions").collect();
    assert!(actions.is_empty(), "no buttons that decide on a policy that wants a sign-in");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_email_lookup_an_unmapped_user_is_known_by_their_slack_email_and_nobody_else_is() {
    let world = World::with_variables(&[
        ("slack_bot_token", "xoxb-test-token"),
        ("slack_signing_secret", SIGNING_SECRET),
        ("slack_team_id", "T0ACME"),
        ("slack_api_url", "{receiver}"),
        ("slack_email_lookup", "on"),
    ])
    .await;
    for path in ["/api/chat.postMessage", "/api/chat.update"] {
        world.receiver.behave(path, Behaviour::SlackApi);
    }
    let mut body = policy(json!({"mode": "manual", "approvers": ["dave@example.com"], "required": 1}));
    body["chat_decisions"] = json!("direct");
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&request);
    // A deleted account is nobody.
    world.receiver.behave(
        "/api/users.info",
        Behaviour::Json(r#"{"ok":true,"user":{"id":"U0DAVE","team_id":"T0ACME","deleted":true,"profile":{"email":"dave@example.com"}}}"#),
    );
    assert_eq!(click(&world, "T0ACME", "U0DAVE", "approve", &id, 0, SIGNING_SECRET).await.0, 200);
    let told = received(&world, "/response", 1).await;
    assert!(told[0].body["text"].as_str().unwrap().contains("not mapped"), "{:?}", told[0].body);
    assert_eq!(world.get_request(&id).await["state"], "pending");
    world.receiver.behave(
        "/api/users.info",
        Behaviour::Json(r#"{"ok":true,"user":{"id":"U0DAVE","team_id":"T0ACME","deleted":false,"is_bot":false,"profile":{"email":"dave@example.com"}}}"#),
    );
    // A second later (the same callback again would be a replay).
    assert_eq!(click(&world, "T0ACME", "U0DAVE", "approve", &id, 1, SIGNING_SECRET).await.0, 200);
    let told = received(&world, "/response", 2).await;
    assert_eq!(told[1].body["text"], "Done: the request is now active.");
    let approved = world.audit(&format!("request={id}&action=request.approved")).await;
    assert_eq!(approved[0]["actor"], "dave@example.com");
    let lookups = world.receiver.received("/api/users.info");
    assert!(lookups.iter().all(|l| l.authorization == "Bearer xoxb-test-token") && lookups.len() == 2);
}
