//! Abuse: a flood of bad credentials neither grows the audit trail without bound nor keeps
//! the sweep from closing grants on time, and the rate limits refuse (429) what is over them
//! and change nothing.

use futures_util::StreamExt;
use serde_json::Value;

use crate::support::*;

/// One call from `address` (behind the trusted proxy the world is told of); answers the
/// status, the `Retry-After` header and the JSON body.
async fn call_from(world: &World, address: &str, key: &str, body: &str) -> (u16, Option<u32>, Value) {
    let response = world
        .client
        .post(format!("{}/api/requests", world.local.host.url()))
        .bearer_auth(key)
        .header("x-forwarded-for", address)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry_after, response.json().await.unwrap())
}

/// The store without what refusals legitimately add (audit events, counters).
fn state(world: &World) -> Vec<(String, String)> {
    let counters = ["audit:", "authfail:", "tally:", "cache:"];
    world.local.host.dump_store().into_iter().filter(|(key, _)| !counters.iter().any(|p| key.starts_with(p))).collect()
}

fn tallies(world: &World) -> Vec<String> {
    world.store_keys().into_iter().filter(|k| k.starts_with("tally:") && k != "tally:cursor").collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_over_a_principals_limit_are_refused_with_retry_after_and_change_nothing() {
    let limits =
        [("rate_limits", "on"), ("rate_limit_changes_per_principal", "3"), ("trusted_proxies", "127.0.0.1/32")];
    let world = World::with_variables(&limits).await;
    world.auto_policy().await;
    for _ in 0..3 {
        let (status, _, answer) = call_from(&world, "203.0.113.9", ALICE, "{}").await;
        assert_eq!(status, 400, "counted, then judged: {answer}");
    }
    let before = state(&world);
    let (status, retry_after, answer) = call_from(&world, "203.0.113.9", ALICE, &ssh("PT5M").to_string()).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (429, Some("rate_limited")), "{answer}");
    assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)), "{retry_after:?}");
    assert_eq!(state(&world), before, "a refused change changes nothing");
    assert!(world.jit_rules().is_empty());
    let recorded = world.audit("action=rate.limited").await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["details"]["limit"], "principal");
    // Another principal from the same address is within its own limit.
    let (status, _, answer) = call_from(&world, "203.0.113.9", CAROL, "{}").await;
    assert_eq!(status, 400, "{answer}");
    // Reads are not limited.
    assert_eq!(world.call("GET", "/api/requests", Some(ALICE), None).await.0, 200);
    world.advance_minutes(1);
    let (status, _, answer) = call_from(&world, "203.0.113.9", ALICE, &ssh("PT5M").to_string()).await;
    assert_eq!(status, 201, "the next minute fills the bucket again: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_over_its_failed_login_limit_is_refused_before_its_credential_is_checked() {
    let limits =
        [("rate_limits", "on"), ("rate_limit_failed_logins_per_address", "5"), ("trusted_proxies", "127.0.0.1/32")];
    let world = World::with_variables(&limits).await;
    world.auto_policy().await;
    for n in 0..5 {
        let (status, _, _) = call_from(&world, "203.0.113.9", &format!("guess-{n}"), "{}").await;
        assert_eq!(status, 401);
    }
    let before = state(&world);
    let (status, retry_after, answer) = call_from(&world, "203.0.113.9", ALICE, &ssh("PT5M").to_string()).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (429, Some("rate_limited")), "{answer}");
    assert!(retry_after.is_some(), "Retry-After is sent");
    assert_eq!(state(&world), before, "even a valid key changes nothing from a blocked address");
    let (status, _, answer) = call_from(&world, "203.0.113.77", ALICE, &ssh("PT5M").to_string()).await;
    assert_eq!(status, 201, "another address is not blocked: {answer}");
    let failures = world.audit("action=auth.failed").await;
    let counts: Vec<(i64, bool)> = failures
        .iter()
        .map(|e| {
            (e["details"]["failures_from_address_this_minute"].as_i64().unwrap(), e["details"]["throttled"] == true)
        })
        .collect();
    assert_eq!(counts, [(1, false)], "the 1st of the minute is recorded, with its count");
    assert_eq!(failures[0]["source_ip"], "203.0.113.9");
    world.advance_minutes(1);
    assert_eq!(call_from(&world, "203.0.113.9", CAROL, "{}").await.0, 400, "the block ends with the minute");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_credentials_while_grants_expire_closes_every_rule_on_time() {
    // With the default limits: the flood is throttled after 30 failures.
    let world = World::with_variables(&[("rate_limits", "on")]).await;
    world.auto_policy().await;
    let mut grants = Vec::new();
    for key in [ALICE, CAROL, ERIN] {
        let (status, grant) = world.request(key, &ssh("PT5M")).await;
        assert_eq!(status, 201, "{grant}");
        grants.push(id(&grant));
    }
    let before = world.audit("").await.len();
    let throttled = &std::sync::atomic::AtomicUsize::new(0);
    world.advance_minutes(6);
    // 1,000 bad credentials at once, racing the tick that must close the grants.
    let flood = futures_util::stream::iter(0..1000).for_each_concurrent(32, |n| {
        let world = &world;
        async move {
            let key = format!("not-a-key-{n}");
            let (status, _) = world.call("POST", "/api/requests", Some(&key), Some("{}")).await;
            assert!([401, 429].contains(&status), "{status}");
            if status == 429 {
                throttled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let started = std::time::Instant::now();
    let ((), ()) = tokio::join!(flood, world.tick());
    let flood_time = started.elapsed();
    assert!(world.jit_rules().is_empty(), "every rule closed in the flood's tick: {:?}", world.jit_rules());
    // Loopback is blocked until the minute ends: the checks below read from the next one.
    world.advance_minutes(1);
    for id in &grants {
        assert_eq!(world.get_request(id).await["state"], "expired");
    }
    let failures: Vec<_> = world.audit("action=auth.failed").await;
    // Each address's 1st, 10th and 100th of the minute (while the minute has seen at most 200
    // failures); past 100 in all, the 1,000th, 10,000th... of all of them.
    let counts: Vec<i64> = failures
        .iter()
        .map(|e| {
            let all = e["details"]["failures_this_minute"].as_i64().unwrap();
            let from_address = e["details"]["failures_from_address_this_minute"].as_i64().unwrap();
            if [1, 10, 100].contains(&from_address) && all <= 200 { from_address } else { all }
        })
        .collect();
    // 1, 10, 100, 1000 within one minute; the flood may straddle two (the count starts again).
    let powers_of_ten = counts.iter().all(|n| [1, 10, 100, 1000].contains(n));
    assert!(powers_of_ten && (4..=8).contains(&counts.len()), "a handful of events, with the count: {counts:?}");
    let throttled = throttled.load(std::sync::atomic::Ordering::Relaxed);
    // 30 failures a minute reach authentication, plus those already past the check when the
    // 30th lands (at most the 32 in flight); the flood may straddle two minutes.
    assert!(throttled >= 1000 - 2 * (30 + 32), "{throttled} throttled");
    let grown = world.audit("").await.len() - before;
    println!(
        "flood: 1000 bad credentials in {flood_time:?}, {throttled} answered 429; the trail grew by {grown} events ({} for the flood)",
        counts.len()
    );
    // The sweep deletes the flood's counters once their minute is over.
    assert!(!tallies(&world).is_empty());
    world.advance_minutes(3);
    world.tick().await;
    assert_eq!(tallies(&world), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_routes_are_answered_before_credentials_and_never_audited() {
    let world = World::start().await;
    let before = world.audit("").await.len();
    for path in ["/api/nothing", "/api/requests/x/y/z", "/api/admin/../policies%2Fx"] {
        let (status, answer) = world.call("POST", path, Some("not-a-key"), Some("{}")).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("no_such_route")), "{path}");
    }
    assert_eq!(world.audit("").await.len(), before, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_address_locked_out_of_the_api_can_still_run_the_sweep_with_its_secret() {
    let world = World::with_variables(&[("rate_limits", "on"), ("rate_limit_failed_logins_per_address", "3")]).await;
    for n in 0..3 {
        assert_eq!(world.call("GET", "/api/requests", Some(&format!("guess-{n}")), None).await.0, 401);
    }
    assert_eq!(world.call("GET", "/api/requests", Some(ADMIN), None).await.0, 429, "loopback is locked out");
    let secret = portcullis_host::local::DEMO_SWEEP_SECRET;
    let (status, report) = world.call("POST", "/internal/sweep", Some(secret), None).await;
    assert_eq!(status, 200, "the sweep's secret is checked whatever the address did: {report}");
    assert_eq!(world.call("POST", "/internal/sweep", Some("guess"), None).await.0, 401);
}
