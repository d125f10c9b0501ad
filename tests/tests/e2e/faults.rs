//! ARM failures: retried within the call where a short wait helps, else left for the sweep,
//! and never a lost grant or a rule left open.

use portcullis_host::emulator::Fault;

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
async fn an_open_that_arm_keeps_failing_is_finished_by_the_sweep() {
    let world = World::start().await;
    world.auto_policy().await;
    world.inject(Fault::new("PUT", 500, "InternalServerError", 4));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("approved")), "{body}");
    assert!(world.jit_rules().is_empty());
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
