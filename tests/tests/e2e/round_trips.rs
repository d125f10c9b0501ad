//! The store round trips and ARM calls of the hot paths, counted at the host's store
//! interface through the real components, held to ceilings: a change that adds a store
//! operation or an ARM call to one of these fails here. Lower a ceiling when a change removes
//! some (issue 13 lowers them toward its targets; `BENCHMARKS.md` has the benchmark's table).

use std::collections::BTreeMap;

use serde_json::json;

use crate::support::*;

/// Store operations, and ARM calls (`.../providers/...`: a write and its status polls).
/// With `ROUND_TRIP_TRACE` set, prints every store operation's kind and key.
async fn cost<F: std::future::Future>(world: &World, op: impl FnOnce() -> F) -> (u64, usize) {
    let store = world.local.host.store();
    let before: u64 = store.operations().iter().sum();
    world.local.emulator.clear_calls();
    store.start_trace();
    op().await;
    let trace = store.take_trace();
    if std::env::var_os("ROUND_TRIP_TRACE").is_some() {
        let lines: Vec<String> = trace.iter().map(|(kind, key)| format!("  {kind:<9} {key}")).collect();
        eprintln!("{} operations:\n{}", trace.len(), lines.join("\n"));
    }
    let after: u64 = store.operations().iter().sum();
    let arm = world.local.emulator.calls().iter().filter(|c| c.path.contains("/providers/")).count();
    (after - before, arm)
}

/// The ceilings, as measured when issue 13's work ended (store operations, a batch counting
/// as one; ARM calls with one `InProgress` poll per write). Before that work: 67, 110, 44, 40,
/// 53 and 260 for the changes below. The sweep's figure includes its fixed work: the
/// reconciler's look at the NSG, the webhook deliverer, the rate-limit counters' cleanup and
/// the look ahead for warnings; it has a margin of 14 for the minutes of the due index it
/// walks, which depend on where the wall clock is in its minute. What each further grant
/// costs a sweep is held by the test after this one.
const CEILINGS: [(&str, u64, usize); 8] = [
    ("read a request", 1, 0),
    ("list policies", 3, 0),
    ("auto-approved request", 23, 3),
    ("auto-approved request replacing the requester's own grant", 42, 6),
    ("revoke", 21, 3),
    ("manual request, pending", 17, 0),
    ("approval that opens the rule", 24, 3),
    ("sweep closing one grant", 236, 4),
];

#[tokio::test(flavor = "multi_thread")]
async fn the_hot_paths_stay_within_their_store_round_trips_and_arm_calls() {
    let world = World::start().await;
    world.auto_policy().await;
    let manual = json!({"vm": DEMO_VM, "nsg": DEMO_NSG, "private_ip": "10.0.0.4",
        "ports": [{"port": 3389, "max_duration": "PT1H", "allowed_sources": ["127.0.0.0/8"]}],
        "approval": {"mode": "manual", "approvers": ["group:ops"], "required": 1}});
    assert_eq!(world.put_policy("held", &manual).await.0, 201);
    // Warm: the ARM token and the JWKS cached, every component compiled.
    let (_, warm) = world.request(ALICE, &ssh("PT1H")).await;
    world.decide(&id(&warm), "revoke", ALICE).await;

    let mut measured: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    let mut grant = String::new();
    measured.insert(
        "auto-approved request",
        cost(&world, || async { grant = id(&world.request(ALICE, &ssh("PT1H")).await.1) }).await,
    );
    measured.insert("read a request", cost(&world, || world.get_request(&grant)).await);
    measured.insert("list policies", cost(&world, || world.call("GET", "/api/policies", Some(ALICE), None)).await);
    let mut newer = String::new();
    measured.insert(
        "auto-approved request replacing the requester's own grant",
        cost(&world, || async { newer = id(&world.request(ALICE, &ssh("PT2H")).await.1) }).await,
    );
    measured.insert("revoke", cost(&world, || world.decide(&newer, "revoke", ALICE)).await);
    let held = json!({"policy": "held", "ports": [3389], "duration": "PT1H", "justification": "INC-1"});
    let mut pending = String::new();
    measured.insert(
        "manual request, pending",
        cost(&world, || async { pending = id(&world.request(ALICE, &held).await.1) }).await,
    );
    measured.insert("approval that opens the rule", cost(&world, || world.decide(&pending, "approve", BOB)).await);
    world.decide(&pending, "revoke", ALICE).await;
    // One grant due, and a sweep to close it.
    let (_, due) = world.request(ALICE, &ssh("PT1M")).await;
    world.advance_minutes(2);
    measured.insert("sweep closing one grant", cost(&world, || world.tick()).await);
    assert_eq!(world.get_request(&id(&due)).await["state"], "expired");

    let over: Vec<String> = CEILINGS
        .iter()
        .filter_map(|(name, store, arm)| {
            let (got_store, got_arm) = measured[name];
            (got_store > *store || got_arm > *arm).then(|| {
                format!("{name}: {got_store} store operations (ceiling {store}), {got_arm} ARM calls (ceiling {arm})")
            })
        })
        .collect();
    assert!(over.is_empty(), "over the ceilings:\n{}\nall measured: {measured:#?}", over.join("\n"));
}

/// The sweep's cost per closed grant (issue 13: at most 6 store operations a grant, plus a
/// constant): a sweep that closes six grants of three requesters against one that closes one,
/// with the same minutes behind each, so the difference is the five grants alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_closes_each_further_grant_in_at_most_six_store_operations() {
    let world = World::start().await;
    world.auto_policy().await;
    let both = |duration: &str, port: u16| json!({"policy": "demo-vm", "ports": [port], "duration": duration, "justification": "INC-1"});
    // Warm, and the rate-limit tallies and due minutes of the start swept away.
    let (_, warm) = world.request(ALICE, &ssh("PT1M")).await;
    world.advance_minutes(3);
    world.tick().await;
    assert_eq!(world.get_request(&id(&warm)).await["state"], "expired");

    let sweep_after = |grants: Vec<(&'static str, u16)>| {
        let world = &world;
        async move {
            let mut ids = Vec::new();
            for (who, port) in grants {
                let (status, body) = world.request(who, &both("PT1M", port)).await;
                assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
                ids.push(id(&body));
            }
            world.advance_minutes(3);
            let (store, arm) = cost(world, || world.tick()).await;
            for id in &ids {
                assert_eq!(world.get_request(id).await["state"], "expired");
            }
            (store, arm)
        }
    };
    let (one, one_arm) = sweep_after(vec![(ALICE, 22)]).await;
    let six = vec![(ALICE, 22), (ALICE, 3389), (CAROL, 22), (CAROL, 3389), (ERIN, 22), (ERIN, 3389)];
    let (many, many_arm) = sweep_after(six).await;
    let per_grant = (many as f64 - one as f64) / 5.0;
    eprintln!("sweep closing 1 grant: {one} store operations; 6 grants: {many} ({per_grant:.1} per further grant)");
    assert!(per_grant <= 6.0, "{per_grant} store operations per further grant (one: {one}, six: {many})");
    // A DELETE and its status polls a grant, nothing more (the reconciler may look at the NSG).
    assert!(many_arm <= 6 * one_arm + 1, "ARM calls: closing one {one_arm}, six {many_arm}");
}
