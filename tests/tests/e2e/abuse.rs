//! Abuse: a flood of bad credentials neither grows the audit trail without bound nor keeps
//! the sweep from closing grants on time.

use futures_util::StreamExt;

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_bad_credentials_while_grants_expire_closes_every_rule_on_time() {
    let world = World::start().await;
    world.auto_policy().await;
    let mut grants = Vec::new();
    for key in [ALICE, CAROL, ERIN] {
        let (status, grant) = world.request(key, &ssh("PT5M")).await;
        assert_eq!(status, 201, "{grant}");
        grants.push(id(&grant));
    }
    let before = world.audit("").await.len();
    world.advance_minutes(6);
    // 1,000 bad credentials at once, racing the tick that must close the grants.
    let flood = futures_util::stream::iter(0..1000).for_each_concurrent(32, |n| {
        let world = &world;
        async move {
            let key = format!("not-a-key-{n}");
            let (status, _) = world.call("POST", "/api/requests", Some(&key), Some("{}")).await;
            assert_eq!(status, 401);
        }
    });
    let started = std::time::Instant::now();
    let ((), ()) = tokio::join!(flood, world.tick());
    let flood_time = started.elapsed();
    assert!(world.jit_rules().is_empty(), "every rule closed in the flood's tick: {:?}", world.jit_rules());
    for id in &grants {
        assert_eq!(world.get_request(id).await["state"], "expired");
    }
    let failures: Vec<_> = world.audit("action=auth.failed").await;
    let counts: Vec<i64> = failures.iter().map(|e| e["details"]["failures_this_minute"].as_i64().unwrap()).collect();
    // 1, 10, 100, 1000 within one minute; the flood may straddle two (the count starts again).
    let powers_of_ten = counts.iter().all(|n| [1, 10, 100, 1000].contains(n));
    assert!(powers_of_ten && (4..=8).contains(&counts.len()), "a handful of events, with the count: {counts:?}");
    let grown = world.audit("").await.len() - before;
    println!(
        "flood: 1000 bad credentials in {flood_time:?}; the trail grew by {grown} events ({} for the flood)",
        counts.len()
    );
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
