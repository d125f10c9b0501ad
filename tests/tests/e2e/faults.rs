//! ARM failures: retried within the call where a short wait helps, else left for the sweep,
//! and never a lost grant or a rule left open.

use std::time::Duration;

use portcullis_host::emulator::{Fault, FaultKind};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_that_meets_arm_failures_retries_on_the_next_tick_and_closes_the_rule() {
    let world = World::start().await;
    world.auto_policy().await;
    let (_, request) = world.request(ALICE, &ssh("PT1H")).await;
    let id = id(&request);
    world.advance_minutes(61);
    // ARM is down for this tick.
    world.inject(Fault::new("DELETE", 503, "ServiceUnavailable", u32::MAX));
    world.tick().await;
    let stuck = world.get_request(&id).await;
    assert_eq!(stuck["state"], "revoking", "{stuck}");
    assert_eq!(stuck["closing"], "expired");
    assert!(stuck["last_error"].as_str().unwrap().contains("503"));
    assert_eq!(world.jit_rules().len(), 1, "the rule is still there while ARM fails");

    // ARM recovers; the next tick finishes the close.
    world.local.emulator.clear_faults();
    world.advance_minutes(1);
    world.tick().await;
    let closed = world.get_request(&id).await;
    assert_eq!(closed["state"], "expired", "{closed}");
    assert!(world.jit_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_with_retry_after_still_opens_the_rule_in_the_same_call() {
    let world = World::start().await;
    world.auto_policy().await;
    let mut fault = Fault::new("PUT", 429, "RetryableError", 1);
    fault.retry_after = Some(1);
    world.inject(fault);
    let started = std::time::Instant::now();
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "Retry-After was not honoured");
    assert_eq!(world.jit_rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_503_leaves_the_request_retrying_until_the_sweep_completes_it() {
    let world = World::start().await;
    world.auto_policy().await;
    world.inject(Fault::new("PUT", 503, "ServiceUnavailable", u32::MAX));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("approved")), "{body}");
    assert!(body["last_error"].as_str().unwrap().contains("503"), "{body}");
    assert!(world.jit_rules().is_empty());
    // The sweep retries an open a minute after its last PUT began.
    world.advance_minutes(1);
    world.tick().await;
    assert_eq!(world.get_request(&id(&body)).await["state"], "approved", "still down: still retrying");
    world.local.emulator.clear_faults();
    world.advance_minutes(1);
    world.tick().await;
    let opened = world.get_request(&id(&body)).await;
    assert_eq!(opened["state"], "active", "{opened}");
    assert_eq!(world.jit_rules().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missed_hour_of_ticks_still_closes_every_due_grant() {
    let world = World::start().await;
    world.auto_policy().await;
    for duration in ["PT5M", "PT20M", "PT40M"] {
        world.request(ALICE, &ssh(duration)).await;
    }
    world.advance_minutes(90);
    world.tick().await;
    assert!(world.jit_rules().is_empty(), "{:?}", world.jit_rules());
}

#[tokio::test(flavor = "multi_thread")]
async fn another_operation_in_progress_is_waited_out() {
    let world = World::start().await;
    world.auto_policy().await;
    world.inject(Fault::new("PUT", 409, "AnotherOperationInProgress", 2));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_connection_is_retried() {
    let world = World::start().await;
    world.auto_policy().await;
    world.inject(Fault::of(Some("PUT"), FaultKind::Drop, 1));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    let puts = world.arm_calls().iter().filter(|c| c.starts_with("PUT")).count();
    assert_eq!(puts, 2, "{:?}", world.arm_calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_slower_than_the_timeout_is_abandoned_and_retried() {
    let world = World::with_variables(&[("arm_timeout", "PT1S")]).await;
    world.auto_policy().await;
    world.inject(Fault::of(Some("PUT"), FaultKind::Slow(Duration::from_secs(3)), 1));
    let started = std::time::Instant::now();
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    assert!(started.elapsed() < Duration::from_secs(3), "the slow answer was waited for: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_write_in_two_failing_still_opens_every_grant() {
    let world = World::start().await;
    world.auto_policy().await;
    let mut fault = Fault::new("PUT", 500, "InternalServerError", u32::MAX);
    fault.rate = 0.5;
    world.inject(fault);
    for key in [ALICE, CAROL] {
        let (status, body) = world.request(key, &ssh("PT1H")).await;
        assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    }
    let calls = world.local.emulator.calls();
    let puts = calls.iter().filter(|c| c.method == "PUT").count();
    let failed = calls.iter().filter(|c| c.method == "PUT" && c.status == 500).count();
    assert!(failed >= 1 && failed == puts / 2, "{failed} of {puts} failed: {:?}", world.arm_calls());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_that_timed_out_but_succeeded_is_removed_when_the_retry_is_refused() {
    let world = World::with_variables(&[("arm_timeout", "PT1S")]).await;
    world.auto_policy().await;
    // The first PUT lands on the NSG but answers too late; the retry is refused outright.
    world.inject(Fault::of(Some("PUT"), FaultKind::Slow(Duration::from_secs(3)), 1));
    world.inject(Fault::new("PUT", 403, "AuthorizationFailed", 1));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    // Closing at once, and final once the timed-out PUT can no longer land.
    assert_eq!((status, body["state"].as_str()), (201, Some("revoking")), "{body}");
    assert!(world.jit_rules().is_empty(), "the rule the slow PUT created is gone: {:?}", world.jit_rules());
    world.advance_minutes(6);
    world.tick().await;
    let body = world.get_request(&id(&body)).await;
    assert_eq!(body["state"], "failed", "{body}");
    assert!(body["last_error"].as_str().unwrap().contains("AuthorizationFailed"), "{body}");
    let actions: Vec<String> = world
        .audit(&format!("request={}", id(&body)))
        .await
        .iter()
        .map(|e| format!("{} {}", e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions[2..],
        ["rule.put failed", "request.abandoned ok", "rule.deleted ok", "rule.deleted ok", "request.failed ok"],
        "{actions:?}"
    );
}
