//! Webhooks through the real components: every event type to each matching subscription,
//! signed, once; nothing sent before the caller's answer; a receiver that is down, hangs or
//! dies gets everything in order later, without holding up the sweep; URLs portcullis must
//! never reach are refused; secrets are shown once.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use portcullis_host::receiver::{Behaviour, Received};
use serde_json::{Value, json};

use crate::support::*;

/// Creates a subscription posting to the receiver at `path`; answers its secret, which the
/// receiver is told to trust.
pub(crate) async fn subscribe(world: &World, name: &str, path: &str, body: Value) -> String {
    let mut body = body;
    body["url"] = json!(format!("{}{path}", world.receiver.origin()));
    let (status, answer) =
        world.call("PUT", &format!("/api/webhooks/{name}"), Some(ADMIN), Some(&body.to_string())).await;
    assert_eq!(status, 201, "{answer}");
    let secret = answer["secret"].as_str().expect("the secret, shown once").to_owned();
    world.receiver.trust(path, &secret);
    secret
}

/// Waits (up to 15 s) until `path` has received `n` deliveries answered 2xx.
pub(crate) async fn wait_for(world: &World, path: &str, n: usize) -> Vec<Received> {
    let started = Instant::now();
    loop {
        let delivered: Vec<Received> =
            world.receiver.received(path).into_iter().filter(|r| (200..300).contains(&r.answered)).collect();
        if delivered.len() >= n || started.elapsed() > Duration::from_secs(15) {
            return delivered;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kinds(received: &[Received]) -> Vec<String> {
    received.iter().map(|r| r.body["type"].as_str().unwrap_or("?").to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_type_reaches_each_matching_subscription_once_signed_and_no_other() {
    let world = World::start().await;
    let mut body =
        policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1, "pending_timeout": "PT5M"}));
    body["break_glass"] = json!({"members": ["group:oncall"], "max_duration": "PT30M"});
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);
    subscribe(&world, "everything", "/all", json!({"events": ["*"]})).await;
    subscribe(&world, "requests", "/requests", json!({"events": ["request.*"], "format": "cloudevents"})).await;
    subscribe(&world, "elsewhere", "/other", json!({"events": ["*"], "policies": ["another-vm"]})).await;

    let (_, denied) = world.request(ALICE, &ssh("PT1H")).await;
    world
        .call("POST", &format!("/api/requests/{}/deny", id(&denied)), Some(BOB), Some(r#"{"reason":"not today"}"#))
        .await;
    let (_, cancelled) = world.request(ALICE, &ssh("PT1H")).await;
    world.call("POST", &format!("/api/requests/{}/cancel", id(&cancelled)), Some(ALICE), None).await;
    let (_, granted) = world.request(ALICE, &ssh("PT1H")).await;
    world.decide(&id(&granted), "approve", BOB).await;
    let extend = format!("/api/requests/{}/extend", id(&granted));
    assert_eq!(world.call("POST", &extend, Some(BOB), Some(r#"{"duration":"PT30M"}"#)).await.0, 200);
    world.decide(&id(&granted), "revoke", ALICE).await;
    let glass =
        json!({"policy": "demo-vm", "ports": [22], "duration": "PT15M", "justification": "INC-9", "break_glass": true});
    let (status, broken) = world.request(ERIN, &glass).await;
    assert_eq!(status, 201, "{broken}");
    let (_, timed_out) = world.request(CAROL, &ssh("PT2H")).await;
    world.advance_minutes(6);
    world.tick().await;
    world.advance_minutes(30);
    world.tick().await;

    let expected = [
        "request.created",
        "request.denied",
        "request.created",
        "request.cancelled",
        "request.created",
        "request.approved",
        "grant.activated",
        "grant.extended",
        "grant.revoked",
        "break_glass.used",
        "request.created",
        "request.approved",
        "grant.activated",
        "request.created",
        "request.timed_out",
        // The break-glass grant (15 minutes) is warned 10 minutes before its end, then ends.
        "grant.expiring",
        "grant.expired",
    ];
    let all = wait_for(&world, "/all", expected.len()).await;
    let mut got = kinds(&all);
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "each event once: {:?}", kinds(&all));
    assert!(all.iter().all(|r| r.verified == Some(true)), "every delivery verifies with the subscription's secret");
    let ids: BTreeSet<&str> = all.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "no event delivered twice");
    let seqs: Vec<u64> = all.iter().map(|r| r.body["data"]["audit_seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in the trail's order: {seqs:?}");
    let revoked = all.iter().find(|r| r.body["type"] == "grant.revoked").unwrap();
    assert_eq!(revoked.body["data"]["request_id"], id(&granted).as_str());
    assert_eq!(
        (revoked.body["data"]["actor"].as_str(), revoked.body["data"]["ended_by"].as_str()),
        (Some("alice"), Some("alice"))
    );
    assert_eq!(revoked.body["data"]["ports"], json!(["22/tcp"]));
    assert_eq!(revoked.body["data"]["url"], format!("https://jit.example.com/api/requests/{}", id(&granted)));
    let denial = all.iter().find(|r| r.body["type"] == "request.denied").unwrap();
    assert_eq!(
        (denial.body["data"]["reason"].as_str(), denial.body["data"]["justification"].as_str()),
        (Some("not today"), Some("INC-1234"))
    );

    // Only the request.* family: five created, two approved, one each denied, cancelled, timed out.
    let requests = wait_for(&world, "/requests", 10).await;
    assert!(requests.iter().all(|r| r.body["type"].as_str().unwrap().starts_with("io.portcullis.request.")));
    assert_eq!(requests.len(), 10, "{:?}", requests.iter().map(|r| r.body["type"].clone()).collect::<Vec<_>>());
    assert!(
        requests.iter().all(|r| r.content_type == "application/cloudevents+json" && r.body["specversion"] == "1.0")
    );
    assert!(requests.iter().all(|r| r.verified == Some(true)));
    assert!(world.receiver.received("/other").is_empty(), "a policy filter that matches nothing gets nothing");
    let _ = (broken, timed_out);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_with_three_subscriptions_is_answered_before_any_delivery() {
    let world = World::start().await;
    world.auto_policy().await;
    // Warm up (the ARM token, the first due minute), then a request with no subscription.
    let (_, warm) = world.request(CAROL, &ssh("PT1H")).await;
    world.decide(&id(&warm), "revoke", CAROL).await;
    let measure = |world: &World| world.local.host.store().operations().iter().sum::<u64>();
    let before = measure(&world);
    let started = Instant::now();
    let (_, bare) = world.request(ALICE, &ssh("PT1H")).await;
    let bare_latency = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bare_operations = measure(&world) - before;
    world.decide(&id(&bare), "revoke", ALICE).await;

    // Three subscriptions whose receivers answer at once: what their deliveries cost.
    for n in 0..3 {
        subscribe(&world, &format!("quick{n}"), &format!("/quick{n}"), json!({"events": ["*"]})).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = measure(&world);
    let (_, quick) = world.request(ALICE, &ssh("PT1H")).await;
    for n in 0..3 {
        let got = wait_for(&world, &format!("/quick{n}"), 3).await;
        assert_eq!(kinds(&got), ["request.created", "request.approved", "grant.activated"], "/quick{n}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_deliveries = measure(&world) - before;
    world.decide(&id(&quick), "revoke", ALICE).await;

    // Receivers that take 2 s: the answer does not wait for them.
    for n in 0..3 {
        world.receiver.behave(&format!("/quick{n}"), Behaviour::Hang(Duration::from_secs(2)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let (status, answer) = world.request(ALICE, &ssh("PT1H")).await;
    let latency = started.elapsed();
    assert_eq!(status, 201, "{answer}");
    assert!(latency < Duration::from_millis(1500), "answered in {latency:?}, before any 2 s delivery");
    assert!(
        world.receiver.all().iter().all(|r| r.body["data"]["request_id"] != id(&answer).as_str()),
        "nothing about this request delivered before its answer"
    );
    println!(
        "webhooks: a request answered in {latency:?} with three slow subscriptions ({bare_latency:?} with none); store operations: {bare_operations} with no subscription, {with_deliveries} with three, all nine deliveries included (all of them after the answer)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_down_for_an_hour_gets_every_event_in_order_with_unchanged_ids() {
    let world = World::start().await;
    world.manual_policy(1).await;
    subscribe(&world, "flaky", "/flaky", json!({"events": ["request.*"]})).await;
    world.receiver.behave("/flaky", Behaviour::Status(503));
    for key in [ALICE, CAROL, ERIN] {
        let (_, request) = world.request(key, &ssh("PT1H")).await;
        world.call("POST", &format!("/api/requests/{}/cancel", id(&request)), Some(key), None).await;
    }
    // An hour of sweeps against a receiver that answers 503.
    for _ in 0..12 {
        world.tick().await;
        world.advance_minutes(5);
    }
    let failed = world.receiver.received("/flaky");
    assert!(!failed.is_empty() && failed.iter().all(|r| r.answered == 503));
    let first_id = failed[0].id.clone();
    let (_, listed) = world.call("GET", "/api/webhooks/flaky/deliveries", Some(ADMIN), None).await;
    assert_eq!(listed["waiting"], 6, "{listed}");
    assert!(listed["consecutive_failures"].as_u64().unwrap() >= 3, "backing off: {listed}");
    world.receiver.behave("/flaky", Behaviour::Status(200));
    for _ in 0..6 {
        world.advance_minutes(30);
        world.tick().await;
    }
    let delivered = wait_for(&world, "/flaky", 6).await;
    assert_eq!(kinds(&delivered), ["request.created", "request.cancelled"].repeat(3), "in order");
    assert_eq!(delivered[0].id, first_id, "the same webhook-id on every attempt");
    let attempts = world.receiver.received("/flaky").len();
    println!(
        "webhooks: receiver down 60 min: {} failed attempts, then {} events delivered in order",
        attempts - delivered.len(),
        delivered.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hanging_receiver_does_not_hold_up_the_sweeps_closes() {
    let world = World::start().await;
    world.auto_policy().await;
    subscribe(&world, "stuck", "/stuck", json!({"events": ["*"]})).await;
    let (_, grant) = world.request(ALICE, &ssh("PT5M")).await;
    world.receiver.behave("/stuck", Behaviour::Hang(Duration::from_secs(30)));
    world.advance_minutes(6);
    let started = Instant::now();
    let tick = world.tick();
    let watch = async {
        while !world.jit_rules().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        started.elapsed()
    };
    let ((), closed_after) = tokio::join!(tick, watch);
    assert!(closed_after < Duration::from_secs(4), "the rule closed {closed_after:?} into the sweep");
    assert_eq!(world.get_request(&id(&grant)).await["state"], "expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_delivery_is_listed_and_can_be_retried() {
    let world = World::start().await;
    world.auto_policy().await;
    subscribe(&world, "broken", "/broken", json!({"events": ["request.created"]})).await;
    world.receiver.behave("/broken", Behaviour::Status(500));
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    // Three days of retries, at the schedule's pace.
    for _ in 0..40 {
        world.advance_minutes(120);
        world.tick().await;
    }
    let (_, listed) = world.call("GET", "/api/webhooks/broken/deliveries", Some(ADMIN), None).await;
    let delivery = &listed["deliveries"][0];
    assert_eq!((delivery["outcome"].as_str(), listed["waiting"].as_u64()), (Some("dead"), Some(0)), "{listed}");
    let attempts = delivery["attempts"].as_array().unwrap().len();
    assert!((8..=20).contains(&attempts), "{attempts} attempts over three days");
    assert!(world.audit("action=webhook.dead").await.len() == 1);
    world.receiver.behave("/broken", Behaviour::Status(200));
    let retry = format!("/api/webhooks/broken/deliveries/{}/retry", delivery["id"].as_str().unwrap());
    assert_eq!(world.call("POST", &retry, Some(ADMIN), None).await.0, 202);
    world.tick().await;
    let delivered = wait_for(&world, "/broken", 1).await;
    assert_eq!(delivered[0].id, delivery["id"].as_str().unwrap());
    assert_eq!(delivered[0].body["data"]["request_id"], id(&request).as_str());
    assert_eq!(world.call("POST", "/api/webhooks/broken/deliveries/evt_nothing/retry", Some(ADMIN), None).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn urls_portcullis_must_never_reach_are_refused_and_secrets_are_shown_once() {
    let world = World::start().await;
    let before = world.store_keys();
    for (url, code) in [
        ("https://169.254.169.254/metadata/identity/oauth2/token", "forbidden_url"),
        ("https://10.0.0.4/hook", "forbidden_url"),
        ("https://[::1]/hook", "forbidden_url"),
        ("https://[fe80::1]/hook", "forbidden_url"),
        ("https://[fd12::1]/hook", "forbidden_url"),
        ("https://localhost/hook", "forbidden_url"),
        ("http://hooks.slack.com/services/x", "insecure_url"),
        ("https://attacker.example.net/x", "host_not_allowed"),
        ("https://user:pw@hooks.slack.com/x", "invalid_url"),
    ] {
        let body = json!({"url": url, "events": ["*"]}).to_string();
        let (status, answer) = world.call("PUT", "/api/webhooks/bad", Some(ADMIN), Some(&body)).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (422, Some(code)), "{url}: {answer}");
    }
    let (status, answer) = world
        .call("PUT", "/api/webhooks/bad", Some(ALICE), Some(r#"{"url":"https://hooks.slack.com/x","events":["*"]}"#))
        .await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("admin_required")));
    assert_eq!(
        world.store_keys().into_iter().filter(|k| !k.starts_with("audit:")).collect::<Vec<_>>(),
        before.into_iter().filter(|k| !k.starts_with("audit:")).collect::<Vec<_>>()
    );

    world.auto_policy().await;
    let first = subscribe(&world, "siem", "/siem", json!({"events": ["request.created"]})).await;
    assert!(first.starts_with("whsec_"));
    let (_, read) = world.call("GET", "/api/webhooks/siem", Some(ADMIN), None).await;
    let (_, listed) = world.call("GET", "/api/webhooks", Some(ADMIN), None).await;
    let (_, rotated) = world.call("POST", "/api/webhooks/siem/rotate-secret", Some(ADMIN), None).await;
    let second = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    // During the overlap both secrets sign: a receiver that knows either one verifies.
    world.receiver.trust("/only-new", &second);
    world.request(ALICE, &ssh("PT1H")).await;
    let delivered = wait_for(&world, "/siem", 1).await;
    let signatures = delivered[0].signature.split(' ').count();
    assert_eq!((delivered[0].verified, signatures), (Some(true), 2), "{}", delivered[0].signature);
    // Nothing shown after creation or rotation holds a secret, nor does the trail or the log.
    let trail = world.audit("").await;
    for text in [read.to_string(), listed.to_string(), json!(trail).to_string(), world.local.host.guest_logs()] {
        for secret in [&first, &second] {
            assert!(!text.contains(&secret["whsec_".len()..]), "a secret leaked: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reminders_and_warnings_before_the_end_are_sent_once_each() {
    let world = World::start().await;
    let body = policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": 1, "pending_timeout": "PT30M"}));
    assert_eq!(world.put_policy("demo-vm", &body).await.0, 201);
    subscribe(&world, "nudges", "/nudges", json!({"events": ["request.reminder", "grant.expiring"]})).await;
    let (_, waiting) = world.request(ALICE, &ssh("PT1H")).await;
    let (_, granted) = world.request(CAROL, &ssh("PT30M")).await;
    world.decide(&id(&granted), "approve", BOB).await;
    // Every few minutes for 70 minutes: the waiting request is reminded at 15 minutes and
    // warned at 20 (10 before it times out); the grant is warned 10 minutes before its end,
    // and again before its new end once extended.
    for minute in 1..=70 {
        world.advance_minutes(1);
        if minute == 25 {
            let extend = format!("/api/requests/{}/extend", id(&granted));
            assert_eq!(world.call("POST", &extend, Some(CAROL), Some(r#"{"duration":"PT20M"}"#)).await.0, 200);
        }
        if minute % 3 == 0 {
            world.tick().await;
        }
    }
    world.tick().await;
    let nudges = wait_for(&world, "/nudges", 4).await;
    let summary: Vec<(String, String, String)> = nudges
        .iter()
        .map(|r| {
            let data = &r.body["data"];
            (
                r.body["type"].as_str().unwrap().to_owned(),
                data["request_id"].as_str().unwrap().to_owned(),
                data["notice"].as_str().unwrap_or("").split(':').next().unwrap().to_owned(),
            )
        })
        .collect();
    let (w, g) = (id(&waiting), id(&granted));
    let want = |kind: &str, id: &str, notice: &str| (kind.to_owned(), id.to_owned(), notice.to_owned());
    assert_eq!(
        summary,
        [
            want("request.reminder", &w, "reminder"),
            want("request.reminder", &w, "timing_out"),
            want("grant.expiring", &g, "expiring"),
            want("grant.expiring", &g, "expiring"),
        ],
        "{nudges:#?}"
    );
    assert_eq!(nudges[0].body["data"]["approvers_left"], json!(["group:ops"]));
    assert_ne!(
        nudges[2].body["data"]["ends_at"], nudges[3].body["data"]["ends_at"],
        "the second warning is for the new end"
    );
    assert_eq!(world.get_request(&w).await["state"], "timed_out");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_grant_and_a_missing_rule_are_announced_too() {
    let world = World::start().await;
    world.auto_policy().await;
    subscribe(&world, "ops", "/ops", json!({"events": ["grant.failed", "drift.*"]})).await;
    // ARM refuses the rule outright: the grant fails and nothing is open.
    world.inject(Fault::new("PUT", 403, "AuthorizationFailed", 1));
    let (_, refused) = world.request(ALICE, &ssh("PT1H")).await;
    // Someone deletes a running grant's rule by hand: the reconciler reports it.
    let (_, grant) = world.request(CAROL, &ssh("PT1H")).await;
    assert!(world.local.emulator.remove_rule(DEMO_NSG, &format!("jit-{}", id(&grant))));
    world.tick().await;
    let received = wait_for(&world, "/ops", 2).await;
    assert_eq!(kinds(&received), ["grant.failed", "drift.rule_missing"], "{received:#?}");
    assert_eq!(received[0].body["data"]["request_id"], id(&refused).as_str());
    assert_eq!(received[1].body["data"]["request_id"], id(&grant).as_str());
    assert!(received.iter().all(|r| r.verified == Some(true)));
}

/// Posts the decision form of a link (its path on the local host) with `credential`.
async fn decide_by_link(world: &World, url: &str, credential: Option<&str>) -> (u16, String) {
    let path = url.strip_prefix("https://jit.example.com").expect("a link to portcullis");
    let form = match credential {
        Some(c) => format!("credential={c}&comment=looks+fine"),
        None => "comment=x".to_owned(),
    };
    let response = world
        .client
        .post(format!("{}{path}", world.local.host.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_buttons_are_links_that_decide_only_after_sign_in_once_and_never_for_the_requester() {
    let world = World::with_variables(&[("decision_link_secret", "a-long-random-decision-link-secret-value")]).await;
    world.manual_policy(1).await;
    subscribe(&world, "teams", "/teams", json!({"events": ["request.created"], "format": "teams"})).await;
    subscribe(&world, "slack", "/slack", json!({"events": ["request.created"], "format": "slack"})).await;
    subscribe(&world, "siem", "/siem", json!({"events": ["request.created"]})).await;
    let (_, request) = world.request(CAROL, &ssh("PT1H")).await;
    let card = wait_for(&world, "/teams", 1).await.remove(0).body;
    let actions = card["attachments"][0]["content"]["actions"].as_array().unwrap().clone();
    let link = |title: &str| actions.iter().find(|a| a["title"] == title).unwrap()["url"].as_str().unwrap().to_owned();
    let (approve, deny) = (link("Approve (sign in)"), link("Deny (sign in)"));
    let slack = wait_for(&world, "/slack", 1).await.remove(0).body;
    assert!(slack.to_string().contains("/decide/"), "Slack messages carry the links too: {slack}");
    let siem = wait_for(&world, "/siem", 1).await.remove(0).body;
    assert!(!siem.to_string().contains("/decide/"), "machines never get a link: {siem}");

    // Opening the link shows the request and asks for a sign-in; it decides nothing.
    let page =
        world.client.get(approve.replace("https://jit.example.com", &world.local.host.url())).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains(&id(&request)) && html.contains("type=\"password\""), "{html}");
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");
    // Without a credential, with a wrong one, or as the requester herself: nothing.
    assert_eq!(decide_by_link(&world, &approve, None).await.0, 401);
    assert_eq!(decide_by_link(&world, &approve, Some("not-a-key")).await.0, 401);
    let (status, html) = decide_by_link(&world, &approve, Some(CAROL)).await;
    assert_eq!(status, 403, "no self-approval through a link: {html}");
    let tampered = format!("{}x", &approve[..approve.len() - 1]);
    assert_eq!(decide_by_link(&world, &tampered, Some(BOB)).await.0, 410);
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");
    // Signed in as an approver, it decides as them, once.
    let (status, html) = decide_by_link(&world, &approve, Some(BOB)).await;
    assert_eq!(status, 200, "{html}");
    assert_eq!(world.get_request(&id(&request)).await["state"], "active");
    let approved = world.audit(&format!("request={}&action=request.approved", id(&request))).await;
    assert_eq!(approved[0]["actor"], "bob");
    assert_eq!(decide_by_link(&world, &approve, Some(BOB)).await.0, 409, "decided: the link cannot act again");
    assert_eq!(decide_by_link(&world, &deny, Some(DAVE)).await.0, 409, "already decided");

    // A link runs out (15 minutes by default).
    let (_, later) = world.request(ALICE, &ssh("PT1H")).await;
    let cards = wait_for(&world, "/teams", 2).await;
    let actions = cards[1].body["attachments"][0]["content"]["actions"].as_array().unwrap().clone();
    let approve_later = actions[0]["url"].as_str().unwrap().to_owned();
    world.advance_minutes(16);
    assert_eq!(decide_by_link(&world, &approve_later, Some(BOB)).await.0, 410, "expired");
    assert_eq!(world.get_request(&id(&later)).await["state"], "pending");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_waits_in_a_queue_goes_out_in_the_format_the_subscription_has_when_it_is_sent() {
    let world = World::with_variables(&[("decision_link_secret", "a-long-random-decision-link-secret-value")]).await;
    world.manual_policy(1).await;
    subscribe(&world, "later", "/later", json!({"events": ["request.created"], "format": "slack"})).await;
    world.receiver.behave("/later", Behaviour::Status(503));
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let failed = received_any(&world, "/later").await;
    assert!(failed.body.to_string().contains("/decide/"), "a chat message carries links: {}", failed.body);
    // Now a machine's subscription: what waits is sent as a signed standard payload, and the
    // links (capabilities) are not.
    let body = json!({"url": format!("{}/later", world.receiver.origin()), "events": ["request.created"]});
    assert_eq!(world.call("PUT", "/api/webhooks/later", Some(ADMIN), Some(&body.to_string())).await.0, 200);
    world.receiver.behave("/later", Behaviour::Status(200));
    world.advance_minutes(2);
    world.tick().await;
    let delivered = wait_for(&world, "/later", 1).await;
    assert_eq!(delivered[0].body["type"], "request.created");
    assert_eq!(delivered[0].body["data"]["request_id"], id(&request).as_str());
    assert!(!delivered[0].body.to_string().contains("/decide/"), "{}", delivered[0].body);
    assert_eq!((delivered[0].verified, delivered[0].id.as_str()), (Some(true), failed.id.as_str()));
}

/// The first delivery to `path`, whatever its answer (waits up to 10 s).
async fn received_any(world: &World, path: &str) -> Received {
    let started = Instant::now();
    loop {
        if let Some(first) = world.receiver.received(path).into_iter().next() {
            return first;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "nothing reached {path}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
