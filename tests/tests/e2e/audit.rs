//! The audit trail end to end: what each action leaves, tampering found by sequence number,
//! concurrent appends, exports verified offline, and no secrets anywhere in it.

use portcullis_host::emulator::{self, DEMO_NSG};
use serde_json::{Value, json};

use crate::support::*;

const CHECKPOINT_KEY: &str = "audit-checkpoint-key-7f3a";

/// A world that signs audit checkpoints every 5 events.
async fn checkpointing_world() -> World {
    World::with_variables(&[("audit_checkpoint_key", CHECKPOINT_KEY), ("audit_checkpoint_every", "5")]).await
}

async fn verify(world: &World, query: &str) -> Value {
    let (status, report) = world.call("GET", &format!("/api/audit/verify{query}"), Some(ADMIN), None).await;
    assert_eq!(status, 200, "{report}");
    report
}

/// (actor, action, outcome) of each event.
fn summary(events: &[Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or_default().to_owned();
            (text("actor"), text("action"), text("outcome"))
        })
        .collect()
}

fn triple(actor: &str, action: &str, outcome: &str) -> (String, String, String) {
    (actor.into(), action.into(), outcome.into())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_step_of_a_grant_leaves_its_events_in_order() {
    let world = checkpointing_world().await;
    world.manual_policy(1).await;
    let policy_events = world.audit("policy=demo-vm&action=policy.").await;
    assert_eq!(summary(&policy_events), [triple("admin", "policy.created", "ok")]);
    assert_eq!(policy_events[0]["source_ip"], "127.0.0.1");
    assert_eq!(policy_events[0]["details"]["policy"]["vms"][0]["nsg"], DEMO_NSG);
    let baseline = world.audit("policy=demo-vm&action=rule.put").await;
    assert_eq!(baseline[0]["details"]["access"], "deny");

    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&request);
    world.decide(&id, "approve", BOB).await;
    world.advance_minutes(61);
    world.tick().await;
    assert_eq!(world.get_request(&id).await["state"], "expired");

    let events = world.audit(&format!("request={id}")).await;
    assert_eq!(
        summary(&events),
        [
            triple("alice", "request.created", "ok"),
            triple("bob", "request.approved", "ok"),
            triple("bob", "rule.put", "ok"),
            triple("bob", "request.activated", "ok"),
            triple("system", "request.expiring", "ok"),
            triple("system", "rule.deleted", "ok"),
            triple("system", "request.expired", "ok"),
        ]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(events[0]["details"]["justification"], "INC-1234");
    assert_eq!(events[0]["subject"], json!({"request": id, "policy": "demo-vm"}));
    assert_eq!(events[4]["source_ip"], Value::Null, "the sweep has no caller");

    // ARM's own request ids of the PUT and the DELETE are in the trail.
    let calls = world.local.emulator.calls();
    let arm_id = |method: &str| {
        calls
            .iter()
            .find(|c| c.method == method && c.path.ends_with(&format!("/securityRules/jit-{id}")))
            .map(|c| c.request_id.clone())
            .unwrap()
    };
    assert_eq!(events[2]["details"]["arm_request_id"], arm_id("PUT"));
    assert_eq!(events[2]["details"]["rule"], format!("jit-{id}"));
    assert_eq!(events[5]["details"]["arm_request_id"], arm_id("DELETE"));

    let report = verify(&world, "").await;
    assert_eq!(report["valid"], true, "{report}");
    assert_eq!(report["checked"], report["to"]);
    assert_eq!(report["head"]["seq"], report["to"], "{report}");
    assert_eq!(report["checkpoint"]["verified"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn decisions_refusals_and_break_glass_are_all_recorded() {
    let world = World::start().await;
    let mut body =
        policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1, "pending_timeout": "PT5M"}));
    body["break_glass"] = json!({"members": ["group:oncall"], "max_duration": "PT30M"});
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);

    let (_, denied) = world.request(ALICE, &ssh("PT1H")).await;
    let path = format!("/api/requests/{}/deny", id(&denied));
    world.call("POST", &path, Some(BOB), Some(r#"{"reason":"not today"}"#)).await;
    let (_, cancelled) = world.request(ALICE, &ssh("PT1H")).await;
    world.call("POST", &format!("/api/requests/{}/cancel", id(&cancelled)), Some(ALICE), None).await;
    let (_, extended) = world.request(ALICE, &ssh("PT1H")).await;
    world.decide(&id(&extended), "approve", BOB).await;
    let path = format!("/api/requests/{}/extend", id(&extended));
    world.call("POST", &path, Some(BOB), Some(r#"{"duration":"PT30M"}"#)).await;
    world.decide(&id(&extended), "revoke", ALICE).await;
    let glass =
        json!({"policy": "demo-vm", "ports": [22], "duration": "PT15M", "justification": "INC-9", "break_glass": true});
    let (_, broken) = world.request(ERIN, &glass).await;
    let (_, timed_out) = world.request(ALICE, &ssh("PT2H")).await;
    world.advance_minutes(6);
    world.tick().await;

    let actions = |events: Vec<Value>| summary(&events).into_iter().map(|(a, b, _)| (a, b)).collect::<Vec<_>>();
    let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    let of = |request: &Value| format!("request={}", id(request));
    assert_eq!(
        actions(world.audit(&of(&denied)).await),
        [pair("alice", "request.created"), pair("bob", "request.denied")]
    );
    assert_eq!(world.audit(&of(&denied)).await[1]["details"]["reason"], "not today");
    assert_eq!(
        actions(world.audit(&of(&cancelled)).await),
        [pair("alice", "request.created"), pair("alice", "request.cancelled")]
    );
    let extended_actions = actions(world.audit(&of(&extended)).await);
    assert_eq!(
        extended_actions[4..],
        [
            pair("bob", "request.extended"),
            pair("alice", "request.revoking"),
            pair("alice", "rule.deleted"),
            pair("alice", "request.revoked")
        ]
    );
    let glass_actions = actions(world.audit(&of(&broken)).await);
    assert_eq!(glass_actions[..2], [pair("erin", "break_glass.used"), pair("erin", "request.created")]);
    assert_eq!(
        actions(world.audit(&of(&timed_out)).await),
        [pair("alice", "request.created"), pair("system", "request.timed_out")]
    );

    // Refused changes are recorded; refused reads are not.
    world.call("POST", "/api/requests", Some("not-a-key"), Some("{}")).await;
    world.call("GET", "/api/requests", Some("not-a-key"), None).await;
    world.call("PUT", "/api/policies/demo-vm", Some(ALICE), Some(&body.to_string())).await;
    let refused = world.audit("action=auth.").await;
    assert_eq!(
        summary(&refused),
        [triple("anonymous", "auth.failed", "refused"), triple("alice", "auth.forbidden", "refused")]
    );
    assert_eq!(refused[0]["source_ip"], "127.0.0.1");
    assert_eq!(refused[0]["details"]["path"], "/api/requests");
    assert_eq!(verify(&world, "").await["valid"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_audit_trail_is_for_auditors_and_checks_its_queries() {
    let world = World::start().await;
    world.auto_policy().await;
    let (status, body) = world.call("GET", "/api/audit", Some(ALICE), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("auditor_role_required")));
    let (status, _, _) = world.get_text("/api/audit/export", ALICE).await;
    assert_eq!(status, 403);
    for (query, code) in [
        ("limit=0", "invalid_limit"),
        ("since=yesterday", "invalid_time"),
        ("cursor=x", "invalid_cursor"),
        ("format=xml", ""),
    ] {
        let path = if code.is_empty() { format!("/api/audit/export?{query}") } else { format!("/api/audit?{query}") };
        let (status, _, text) = world.get_text(&path, ADMIN).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        let expected = if code.is_empty() { "invalid_format" } else { code };
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some(expected)), "{query}");
    }
    let (status, body) = world.call("POST", "/api/audit/checkpoint", Some(ADMIN), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("checkpoints_disabled")));

    // Pages follow their cursor and time filters narrow them.
    for _ in 0..3 {
        world.request(ALICE, &ssh("PT1H")).await;
        world.advance_minutes(10);
    }
    let all = world.audit("limit=2").await;
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let since = all.iter().rev().find(|e| e["action"] == "request.created").unwrap()["at"].as_str().unwrap().to_owned();
    let recent = world.audit(&format!("since={}&action=request.created", since.replace('+', "%2B"))).await;
    assert_eq!(recent.len(), 1, "{recent:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tampering_with_stored_events_is_reported_at_its_sequence_number() {
    let world = World::start().await;
    world.auto_policy().await;
    for _ in 0..2 {
        let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
        world.decide(&id(&request), "revoke", ALICE).await;
    }
    let last = verify(&world, "").await["to"].as_u64().unwrap();
    assert!(last >= 8, "{last}");
    let store = world.local.host.store();
    let key = |seq: u64| format!("audit:e:{seq}");
    let original = |seq: u64| store.get("default", &key(seq)).unwrap().unwrap();

    let third = original(3);
    let mut changed: Value = serde_json::from_slice(&third).unwrap();
    changed["details"]["rule"] = json!("jit-something-else");
    store.set("default", &key(3), changed.to_string().as_bytes()).unwrap();
    let report = verify(&world, "").await;
    assert_eq!((report["valid"].as_bool(), report["broken"]["seq"].as_u64()), (Some(false), Some(3)), "{report}");
    store.set("default", &key(3), &third).unwrap();
    assert_eq!(verify(&world, "").await["valid"], true);

    let fourth = original(4);
    store.delete("default", &key(4)).unwrap();
    assert_eq!(verify(&world, "").await["broken"]["seq"], 4);
    store.set("default", &key(4), &fourth).unwrap();

    let (fifth, sixth) = (original(5), original(6));
    store.set("default", &key(5), &sixth).unwrap();
    store.set("default", &key(6), &fifth).unwrap();
    assert_eq!(verify(&world, "").await["broken"]["seq"], 5);
    assert_eq!(verify(&world, "?from=1&to=4").await["valid"], true, "a range before the damage verifies");
    store.set("default", &key(5), &fifth).unwrap();
    store.set("default", &key(6), &sixth).unwrap();
    assert_eq!(verify(&world, "").await["valid"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_appends_keep_one_contiguous_valid_chain() {
    let world = World::start().await;
    world.auto_policy().await;
    let world = &world;
    let mut calls = Vec::new();
    for n in 0..24 {
        calls.push(async move {
            match n % 3 {
                0 => world.request(ALICE, &json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "justification": format!("INC-{n}")})).await,
                1 => world.call("POST", "/api/requests", Some(&format!("stolen-key-{n}")), Some("{}")).await,
                _ => world.call("DELETE", "/api/policies/demo-vm", Some(BOB), None).await,
            }
        });
    }
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(answers.iter().filter(|(status, _)| *status == 401).count(), 8, "{answers:?}");

    let events = world.audit("limit=7").await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "contiguous, each number once");
    let count = |action: &str| events.iter().filter(|e| e["action"] == action).count();
    // Failed logins are counted per minute and recorded at the 1st, 10th, 100th...
    assert_eq!((count("auth.failed"), count("auth.forbidden")), (1, 8));
    // Every request answered 201 has its event, and every event names a request that exists.
    let recorded: Vec<&str> = events
        .iter()
        .filter(|e| e["action"] == "request.created" && e["outcome"] == "ok")
        .map(|e| e["subject"]["request"].as_str().unwrap())
        .collect();
    for (_, body) in answers.iter().filter(|(status, _)| *status == 201) {
        assert!(recorded.contains(&id(body).as_str()), "{body}");
    }
    for request in &recorded {
        assert_eq!(world.get_request(request).await["id"], *request);
    }
    let report = verify(world, "").await;
    assert_eq!((report["valid"].as_bool(), report["checked"].as_u64()), (Some(true), Some(seqs.len() as u64)));
}

/// Verifies an export as `portcullis audit verify` does (the CLI's own tests run the binary).
fn offline_verify(export: &str, checkpoint: Option<&Value>) -> (bool, Value) {
    let checkpoint: Option<shared::audit::Checkpoint> = checkpoint.map(|c| serde_json::from_value(c.clone()).unwrap());
    let report = shared::audit::export::verify_export(
        export.as_bytes(),
        checkpoint.as_ref().map(|c| (c, CHECKPOINT_KEY.as_bytes())),
    )
    .unwrap();
    (report["broken"].is_null(), report)
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_in_both_formats_verify_offline_and_a_checkpoint_catches_a_cut_tail() {
    let world = checkpointing_world().await;
    world.auto_policy().await;
    for _ in 0..3 {
        let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
        world.decide(&id(&request), "revoke", ALICE).await;
    }
    let (status, checkpoint) = world.call("POST", "/api/audit/checkpoint", Some(ADMIN), None).await;
    assert_eq!(status, 201, "{checkpoint}");

    let (status, headers, export) = world.get_text("/api/audit/export", ADMIN).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (200, "application/jsonl"));
    let lines = export.lines().count() as u64;
    assert_eq!(headers["x-audit-last"].to_str().unwrap(), lines.to_string());
    assert_eq!(checkpoint["seq"].as_u64(), Some(lines), "the checkpoint signs the head");
    let (ok, report) = offline_verify(&export, Some(&checkpoint));
    assert!(ok, "{report}");
    assert_eq!(report["checked"].as_u64(), Some(lines));

    let (status, headers, cloud) = world.get_text("/api/audit/export?format=cloudevents", ADMIN).await;
    assert_eq!((status, headers["content-type"].to_str().unwrap()), (200, "application/cloudevents-batch+jsonl"));
    for line in cloud.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert!(event["type"].as_str().unwrap().starts_with("io.portcullis.audit."), "{event}");
        assert_eq!(event["id"], event["data"]["hash"]);
    }
    assert!(offline_verify(&cloud, Some(&checkpoint)).0);

    let (status, _, range) = world.get_text("/api/audit/export?from=3&to=5", ADMIN).await;
    let seqs: Vec<u64> =
        range.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["seq"].as_u64().unwrap()).collect();
    assert_eq!((status, seqs), (200, vec![3, 4, 5]));

    // An export with its tail cut off still chains, but not up to the checkpoint.
    let cut: String = export.lines().take(lines as usize - 2).map(|l| format!("{l}\n")).collect();
    let (ok, report) = offline_verify(&cut, Some(&checkpoint));
    assert!(!ok, "{report}");
    assert_eq!(report["broken"]["seq"].as_u64(), Some(lines - 1), "{report}");
    // And one changed line is found at its sequence number.
    let forged = export.replacen("\"alice\"", "\"mallory\"", 1);
    let first_alice = export.lines().position(|l| l.contains("\"alice\"")).unwrap() as u64 + 1;
    let (ok, report) = offline_verify(&forged, None);
    assert_eq!((ok, report["broken"]["seq"].as_u64()), (false, Some(first_alice)), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_credential_ever_reaches_the_audit_trail() {
    let world = checkpointing_world().await;
    world.auto_policy().await;
    let token = world.token("olivia@example.com", &["devs"], &["requester"]);
    world.request(&token, &ssh("PT1H")).await;
    world.request(ALICE, &ssh("PT1H")).await;
    let wrong_key = "sk-live-0123456789abcdef";
    world.call("POST", "/api/requests", Some(wrong_key), Some("{}")).await;
    world.call("POST", "/api/requests", Some(&format!("{token}x")), Some("{}")).await;
    let url = format!("{}/internal/sweep", world.local.host.url());
    let sweep = reqwest::Client::new().post(url).bearer_auth("guessed-sweep-secret").send().await.unwrap();
    assert_eq!(sweep.status().as_u16(), 401);
    world.call("POST", "/api/audit/checkpoint", Some(ADMIN), None).await;

    let (_, _, export) = world.get_text("/api/audit/export", ADMIN).await;
    assert!(export.contains("auth.failed") && export.contains("olivia@example.com"), "{export}");
    let token_signature = token.rsplit('.').next().unwrap();
    for secret in [
        ADMIN,
        ALICE,
        BOB,
        wrong_key,
        token.as_str(),
        token_signature,
        "guessed-sweep-secret",
        local_sweep_secret(),
        emulator::CLIENT_SECRET,
        CHECKPOINT_KEY,
        "Bearer",
    ] {
        assert!(!export.contains(secret), "'{secret}' leaked into the audit trail");
    }
    // The ARM token cached in the store never appears either.
    let cached = world.local.host.store().get("default", "cache:arm-token").unwrap().unwrap();
    let cached: Value = serde_json::from_slice(&cached).unwrap();
    let access_token = cached["doc"]["access_token"].as_str().or(cached["access_token"].as_str()).unwrap();
    assert!(!export.contains(access_token));
}

fn local_sweep_secret() -> &'static str {
    portcullis_host::local::DEMO_SWEEP_SECRET
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_arm_writes_and_policy_changes_are_recorded_with_their_outcome() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&request);
    world.advance_minutes(61);
    world.inject(portcullis_host::emulator::Fault::new("DELETE", 400, "InvalidRequestFormat", u32::MAX));
    world.tick().await;
    world.local.emulator.clear_faults();
    world.advance_minutes(1);
    world.tick().await;
    let deletes: Vec<Value> = world
        .audit(&format!("request={id}&action=rule.deleted"))
        .await
        .into_iter()
        .filter(|e| e["actor"] == "system")
        .collect();
    assert_eq!(deletes.len(), 2, "{deletes:?}");
    assert_eq!(deletes[0]["outcome"], "failed");
    assert!(deletes[0]["details"]["error"].as_str().unwrap().contains("InvalidRequestFormat"), "{}", deletes[0]);
    let refused = world.local.emulator.calls().into_iter().find(|c| c.status == 400).unwrap();
    assert_eq!(deletes[0]["details"]["arm_request_id"], refused.request_id, "ARM's id of the refusal");
    assert_eq!(deletes[1]["outcome"], "ok");

    let mut changed = policy(json!({"mode": "auto"}));
    changed["ports"][0]["max_duration"] = json!("PT2H");
    assert_eq!(world.put_policy("demo-vm", &changed).await.0, 200);
    assert_eq!(world.call("DELETE", "/api/policies/demo-vm", Some(ADMIN), None).await.0, 200);
    let events = world.audit("policy=demo-vm&action=policy.").await;
    assert_eq!(
        summary(&events).into_iter().map(|(_, action, _)| action).collect::<Vec<_>>(),
        ["policy.created", "policy.updated", "policy.deleted"]
    );
    assert_eq!(events[1]["details"]["policy"]["ports"][0]["max_duration"], "PT2H");
    let baseline = world.audit("policy=demo-vm&action=rule.deleted").await;
    assert_eq!(baseline.last().unwrap()["details"]["rule"], "jit-deny-demo-vm");
    assert_eq!(verify(&world, "").await["valid"], true);
}
