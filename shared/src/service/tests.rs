//! The service loop over in-memory fakes: request, approve, open, sweep, close.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{Env, decisions, policies, requests, sweep};
use crate::api::{ApiError, Reply};
use crate::arm::{Access, ArmError, SecurityRule};
use crate::audit::{Outcome, log};
use crate::auth::{ApiKeys, Caller, Role};
use crate::config::{Config, PriorityBand};
use crate::domain::{GroupName, PolicyName, Principal, RequestId};
use crate::keys;
use crate::store::{KvStore, StoreError};
use crate::testing::{FakeArm, HookedStore, arm_settings, at, limits, policy_json, raw_request};

struct World {
    kv: HookedStore,
    arm: FakeArm,
    config: Config,
}

fn caller(name: &str, roles: &[Role], groups: &[&str]) -> Caller {
    Caller {
        principal: Principal::parse(name).unwrap(),
        display_name: None,
        groups: groups.iter().map(|g| GroupName::parse(g).unwrap()).collect(),
        roles: roles.to_vec(),
    }
}

fn admin() -> Caller {
    caller("root", &[Role::Admin], &[])
}
fn alice() -> Caller {
    caller("alice", &[Role::Requester, Role::Approver], &["devs", "ops"])
}
fn bob() -> Caller {
    caller("bob", &[Role::Approver], &["ops"])
}

impl World {
    fn new(policy: serde_json::Value) -> Self {
        let world = Self {
            kv: HookedStore::default(),
            arm: FakeArm::default(),
            config: Config {
                arm: arm_settings(),
                api_keys: ApiKeys::default(),
                oidc: None,
                sign_in: None,
                sweep_secret: None,
                priorities: PriorityBand { min: 100, max: 199 },
                deny_priorities: PriorityBand { min: 4000, max: 4096 },
                limits: limits(),
                trusted_proxies: vec![],
                audit: crate::config::AuditSettings { checkpoint_key: None, checkpoint_every: 1000 },
                drift: crate::config::DriftSettings::default(),
                max_body_bytes: 65536,
                rate_limits: Default::default(),
                webhooks: Default::default(),
                integrations: Vec::new(),
                store: crate::config::StoreChoice::KeyValue,
            },
        };
        world.at(at(0), |env| policies::put(env, &admin(), "demo-vm", policy.to_string().as_bytes(), false)).unwrap();
        assert_eq!(
            world.arm.rules.borrow().iter().filter(|r| r.access == Access::Deny).count(),
            1,
            "the baseline deny rule"
        );
        world.arm.calls.set(0);
        world
    }

    fn at<T>(&self, now: DateTime<Utc>, f: impl FnOnce(&Env) -> T) -> T {
        let clock = crate::testing::FixedClock(now);
        f(&Env::new(&self.kv, &self.arm, &self.config, now, &clock, super::Origin::system()))
    }

    fn create(&self, id: &str, body: serde_json::Value) -> Result<Reply, ApiError> {
        self.at(at(0), |env| {
            requests::create(env, &alice(), None, RequestId::parse(id).unwrap(), body.to_string().as_bytes())
        })
    }

    /// The grants' allow rules (the baseline deny rule aside).
    fn allow_rules(&self) -> Vec<SecurityRule> {
        self.arm.rules.borrow().iter().filter(|r| r.access == Access::Allow).cloned().collect()
    }

    /// Lets `successes` more audit appends through, then fails every one.
    fn fail_audit_after(&self, successes: usize) {
        let mut left = successes;
        self.kv.before_swap(move |_, key| match key {
            keys::AUDIT_HEAD if left == 0 => Err(StoreError::Backend("injected audit failure".into())),
            keys::AUDIT_HEAD => {
                left -= 1;
                Ok(())
            }
            _ => Ok(()),
        });
    }

    fn state(&self, id: &str) -> String {
        self.at(at(0), |env| env.request(id).unwrap().value.state.name().to_owned())
    }
}

fn manual(required: u8) -> serde_json::Value {
    let mut policy = policy_json();
    policy["approval"] = json!({"mode": "manual", "approvers": ["group:ops"], "required": required});
    policy
}

#[test]
fn auto_approval_opens_the_rule_and_the_sweep_closes_it_after_ends_at() {
    let world = World::new(policy_json());
    let reply = world.create("r1", raw_request()).unwrap();
    assert_eq!((reply.status, reply.body["state"].as_str()), (201, Some("active")));
    assert_eq!(world.allow_rules().len(), 1);

    let early = world.at(at(59), sweep::sweep).unwrap();
    assert_eq!(early.closed, 0);
    assert_eq!(world.allow_rules().len(), 1);

    let report = world.at(at(61), sweep::sweep).unwrap();
    assert_eq!(report.closed, 1);
    assert!(world.allow_rules().is_empty());
    assert_eq!(world.state("r1"), "expired");
    assert!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap().is_empty());
    // The due minute is cleared once it has settled (writers may add to recent minutes).
    world.at(at(64), sweep::sweep).unwrap();
    let settled = |k: &String| k.starts_with("due:") && k["due:".len()..] < *"202601011302";
    assert!(!world.kv.keys().iter().any(settled), "{:?}", world.kv.keys());
}

#[test]
fn a_missed_hour_of_sweeps_is_caught_up() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    let report = world.at(at(180), sweep::sweep).unwrap();
    assert_eq!(report.closed, 1);
    assert!(report.minutes_scanned >= 180);
    // Only the minutes that have not settled yet are read again.
    assert_eq!(world.at(at(181), sweep::sweep).unwrap().minutes_scanned, 4);
}

#[test]
fn a_failed_delete_stays_revoking_and_the_next_sweep_closes_it() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("503".into())));
    let report = world.at(at(61), sweep::sweep).unwrap();
    assert_eq!((report.closed, report.retrying), (0, 1));
    assert_eq!(world.state("r1"), "revoking");
    assert_eq!(world.allow_rules().len(), 1);

    let report = world.at(at(62), sweep::sweep).unwrap();
    assert_eq!(report.closed, 1);
    assert_eq!(world.state("r1"), "expired");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn a_transient_open_failure_is_finished_by_the_sweep() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("429".into())));
    let reply = world.create("r1", raw_request()).unwrap();
    assert_eq!(reply.body["state"], "approved");
    assert!(reply.body["last_error"].as_str().unwrap().contains("429"));
    assert_eq!(world.at(at(1), sweep::sweep).unwrap().opened, 1);
    assert_eq!(world.state("r1"), "active");
}

#[test]
fn an_open_that_keeps_failing_is_abandoned_and_its_rule_removed() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().extend((0..3).map(|_| Err(ArmError::Transient("503".into()))));
    world.create("r1", raw_request()).unwrap();
    world.at(at(1), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "approved");
    world.at(at(90), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "revoking", "the last PUT may still land until its lease runs out");
    let report = world.at(at(96), sweep::sweep).unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(world.state("r1"), "failed");
    // Abandoning deletes whatever a timed-out PUT may have left: 3 failed PUTs, then a DELETE,
    // and another once the last PUT's lease has run out.
    assert_eq!(world.arm.calls.get(), 5);
}

#[test]
fn a_priority_conflict_moves_to_the_next_priority() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::PriorityConflict));
    world.create("r1", raw_request()).unwrap();
    let stored = world.at(at(0), |env| env.request("r1").unwrap().value);
    let opened = &world.allow_rules()[0];
    assert_eq!(opened.priority, stored.rules[0].priority);
    assert_eq!(world.arm.calls.get(), 2);
}

#[test]
fn a_refused_rule_fails_the_request_and_leaves_nothing_queued() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Refused {
        status: 400,
        code: "SecurityRuleInvalidPortRange".into(),
        message: "no".into(),
        request_id: Some("arm-req-1".into()),
    }));
    let reply = world.create("r1", raw_request()).unwrap();
    assert_eq!(reply.body["state"], "failed");
    assert!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap().is_empty());
}

#[test]
fn manual_requests_need_distinct_approvers_other_than_the_requester() {
    let world = World::new(manual(2));
    assert_eq!(world.create("r1", raw_request()).unwrap().body["state"], "pending");
    let approve = |who: &Caller| world.at(at(1), |env| decisions::approve(env, who, "r1", b""));
    assert_eq!(approve(&alice()).unwrap_err().code, "self_approval");
    assert_eq!(approve(&bob()).unwrap().body["state"], "pending");
    assert_eq!(approve(&bob()).unwrap_err().code, "already_approved");
    let carol = caller("carol", &[Role::Approver], &["ops"]);
    assert_eq!(approve(&carol).unwrap().body["state"], "active");
    assert_eq!(world.allow_rules().len(), 1);
}

#[test]
fn a_denied_request_opens_nothing_and_cannot_be_approved_later() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    let reply = world.at(at(1), |env| decisions::deny(env, &bob(), "r1", br#"{"reason":"not now"}"#)).unwrap();
    assert_eq!(reply.body["state"], "denied");
    assert_eq!(reply.body["ended"]["reason"], "not now");
    assert_eq!(world.at(at(2), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap_err().code, "invalid_state");
    assert_eq!(world.arm.calls.get(), 0);
}

#[test]
fn invalid_requests_store_nothing_and_call_no_arm() {
    let world = World::new(policy_json());
    let before = world.kv.keys();
    for (body, status) in [
        (json!({"policy": "demo-vm"}), 400),
        (json!({"policy": "nope", "ports": [22], "duration": "PT1H", "justification": "x"}), 404),
    ] {
        assert_eq!(world.create("r1", body).unwrap_err().status, status);
    }
    let mut wide = raw_request();
    wide["source"] = "198.51.100.0/24".into();
    assert_eq!(world.create("r1", wide).unwrap_err().status, 422);
    assert_eq!(world.kv.keys(), before);
    assert_eq!(world.arm.calls.get(), 0);
}

#[test]
fn regression_a_pending_timeout_alone_starts_the_sweep_cursor() {
    let mut manual_policy = manual(1);
    manual_policy["approval"]["pending_timeout"] = json!("PT5M");
    let world = World::new(manual_policy);
    world.create("r1", raw_request()).unwrap();
    assert!(world.kv.keys().contains(&keys::SWEEP_CURSOR.to_owned()), "no cursor: the sweep would never look");
    let report = world.at(at(6), sweep::sweep).unwrap();
    assert_eq!(report.timed_out, 1);
    assert_eq!(world.state("r1"), "timed_out");
}

#[test]
fn regression_revoking_a_policy_finds_grants_older_than_the_recent_list() {
    let world = World::new(policy_json());
    world.create("old", raw_request()).unwrap();
    // A busy system pushes the grant out of the capped list of recent requests.
    let recent = keys::recent_requests();
    for n in 0..keys::RECENT_CAP {
        let (key, value) = recent.reserve(&world.kv, &format!("n{n}")).unwrap();
        world.kv.set(&key, &value).unwrap();
    }
    assert!(!recent.newest(&world.kv, 0, keys::RECENT_CAP).unwrap().contains(&"old".to_owned()));
    let reply = world.at(at(1), |env| policies::delete(env, &admin(), "demo-vm", true)).unwrap();
    assert_eq!(reply.body["revoked"], 1);
    assert_eq!(world.state("old"), "revoked");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn a_change_whose_event_cannot_be_recorded_does_not_happen() {
    let world = World::new(policy_json());
    world.fail_audit_after(0);
    let error = world.create("r1", raw_request()).unwrap_err();
    assert_eq!(error.status, 500);
    assert!(!world.kv.keys().contains(&keys::request(&RequestId::parse("r1").unwrap())));
    assert_eq!((world.arm.calls.get(), world.allow_rules().len()), (0, 0), "nothing reached ARM");
}

#[test]
fn an_arm_write_that_cannot_be_recorded_is_redone_and_recorded_by_the_sweep() {
    let world = World::new(policy_json());
    // request.created and request.approved are recorded (one append); the append of the PUT's
    // record with the activation fails.
    world.fail_audit_after(1);
    assert_eq!(world.create("r1", raw_request()).unwrap_err().status, 500);
    assert_eq!(world.state("r1"), "approved", "not activated without its record");
    assert!(world.kv.keys().contains(&keys::ARM_WORK.to_owned()), "queued for the sweep");

    world.kv.clear_hook();
    // The failed opener's PUT began a minute ago: the sweep renews the lease and redoes it.
    let report = world.at(at(1), sweep::sweep).unwrap();
    assert_eq!((report.opened, world.state("r1").as_str()), (1, "active"));
    let events: Vec<_> = log::range(&world.kv, 1, 100).map(Result::unwrap).collect();
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions[actions.len() - 4..],
        ["request.created", "request.approved", "rule.put", "request.activated"],
        "{actions:?}"
    );
    assert_eq!(events.iter().rev().nth(1).unwrap().details["arm_request_id"], "fake-arm-2", "the redone PUT");
    assert_eq!(log::verify_stored(&world.kv, 1, None, None).unwrap().chain.broken, None);
}

#[test]
fn a_change_that_loses_a_race_after_its_event_is_followed_by_a_failed_event() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    // A rival instance rewrites the request between this call's read and its swap.
    let request_key = keys::request(&RequestId::parse("r1").unwrap());
    let mut rival = true;
    world.kv.before_swap(move |mem, key| {
        if key == request_key && std::mem::take(&mut rival) {
            let bytes = mem.get(key)?.expect("the request exists");
            mem.set(key, &[bytes.as_slice(), b" "].concat())?;
        }
        Ok(())
    });
    let error = world.at(at(1), |env| decisions::deny(env, &bob(), "r1", b"")).unwrap_err();
    assert_eq!(error.code, "concurrent_update");
    let events: Vec<_> = log::range(&world.kv, 1, 100).map(Result::unwrap).collect();
    let last: Vec<_> = events.iter().rev().take(2).rev().map(|e| (e.action.as_str(), e.outcome)).collect();
    assert_eq!(last, [("request.denied", Outcome::Ok), ("request.denied", Outcome::Failed)]);
    assert_eq!(world.state("r1"), "pending", "the rival's version stands");
}

#[test]
fn regression_a_grant_whose_record_cannot_be_read_at_its_end_is_kept_and_closed_later() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    // The store times out on the request when its minute comes: the old sweep took that for
    // "absent", completed the minute and forgot the grant for good.
    world.kv.fail_reads_of(&keys::request(&RequestId::parse("r1").unwrap()));
    for minute in 61..=66 {
        let report = world.at(at(minute), sweep::sweep).unwrap();
        assert!(report.skipped >= 1, "{report:?}");
    }
    assert_eq!(world.allow_rules().len(), 1, "nothing could be done while the record was unreadable");
    assert!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap().contains(&"r1".to_owned()), "kept");
    world.kv.heal();
    let report = world.at(at(67), sweep::sweep).unwrap();
    assert_eq!(report.closed, 1, "{report:?}");
    assert!(world.allow_rules().is_empty());
    assert_eq!(world.state("r1"), "expired");
}

#[test]
fn a_close_while_a_put_may_be_in_flight_deletes_but_stays_revoking_until_the_lease_runs_out() {
    let world = World::new(policy_json());
    // The opener's PUT times out: the request stays approved, its lease released.
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("timed out".into())));
    world.create("r1", raw_request()).unwrap();
    // A rival opener (a sweep on another instance) takes the lease, and dies before its PUT answers.
    world
        .at(at(1), |env| {
            let mut request = env.request("r1").unwrap();
            request.value.take_put_lease(at(1), at(1) + super::grants::PUT_LEASE);
            env.save_request(&mut request)
        })
        .unwrap();
    let revoked = world.at(at(2), |env| decisions::revoke(env, &alice(), "r1", b"")).unwrap();
    assert_eq!(revoked.body["state"], "revoking", "not final while a PUT may land: {}", revoked.body);
    // The dead opener's PUT lands after the revoke's delete.
    world.arm.rules.borrow_mut().push(crate::testing::rule());
    world.arm.rules.borrow_mut().last_mut().unwrap().name = "jit-r1".into();
    world.at(at(3), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "revoking", "the lease runs to at(6)");
    world.at(at(7), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "revoked");
    assert!(world.allow_rules().is_empty(), "the late rule was deleted: {:?}", world.allow_rules());
}

#[test]
fn a_slot_handed_out_twice_is_not_overwritten() {
    // Cosmos DB's increment can answer the same number to two writers; the second write must
    // not replace the first.
    let world = World::new(manual(1));
    let minute = sweep::minute_floor(at(30));
    world.kv.mem.set(&keys::due_slot(minute, 1), b"rival").unwrap();
    world.at(at(0), |env| sweep::schedule(env, at(30), &RequestId::parse("mine").unwrap())).unwrap();
    assert_eq!(world.kv.get(&keys::due_slot(minute, 1)).unwrap().unwrap(), b"rival");
    assert_eq!(world.kv.get(&keys::due_slot(minute, 2)).unwrap().unwrap(), b"mine");
}

#[test]
fn schedules_never_land_behind_the_sweeps_cursor() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    world.at(at(30), sweep::sweep).unwrap();
    let cursor = crate::store::load::<DateTime<Utc>>(&world.kv, keys::SWEEP_CURSOR).unwrap().unwrap().value;
    // A slow instance schedules something for a minute the sweep has already finished.
    world.at(at(5), |env| sweep::schedule(env, at(6), &RequestId::parse("late").unwrap())).unwrap();
    let expected = sweep::minute_floor(cursor + chrono::TimeDelta::minutes(1));
    assert_eq!(world.kv.get(&keys::due_slot(expected, 1)).unwrap().unwrap(), b"late");
}

#[test]
fn approving_checks_the_policy_as_it_is_now() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    // The admin narrows port 22 to 30 minutes after the one-hour request was made.
    let mut narrower = manual(1);
    narrower["ports"][0]["max_duration"] = json!("PT30M");
    world.at(at(1), |env| policies::put(env, &admin(), "demo-vm", narrower.to_string().as_bytes(), false)).unwrap();
    let error = world.at(at(2), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap_err();
    assert_eq!((error.status, error.code), (409, "policy_changed"));
    assert_eq!(world.state("r1"), "pending");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn approving_after_the_pending_timeout_is_refused() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    let error = world.at(at(61), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap_err();
    assert_eq!(error.code, "request_timed_out");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn disabling_a_policy_cancels_its_pending_requests() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    let mut disabled = manual(1);
    disabled["enabled"] = json!(false);
    let reply =
        world.at(at(1), |env| policies::put(env, &admin(), "demo-vm", disabled.to_string().as_bytes(), false)).unwrap();
    assert_eq!(reply.body["cancelled"], 1);
    assert_eq!(world.state("r1"), "cancelled");
    assert_eq!(world.at(at(2), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap_err().code, "invalid_state");
}

#[test]
fn deleting_a_policy_with_revoke_revokes_first_and_a_failure_keeps_the_policy_for_a_retry() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    world.kv.fail_reads_of(&keys::request(&RequestId::parse("r1").unwrap()));
    assert!(world.at(at(1), |env| policies::delete(env, &admin(), "demo-vm", true)).is_err());
    assert!(world.at(at(1), |env| env.policy(&crate::domain::PolicyName::parse("demo-vm").unwrap())).is_ok());
    world.kv.heal();
    let reply = world.at(at(2), |env| policies::delete(env, &admin(), "demo-vm", true)).unwrap();
    assert_eq!(reply.body["revoked"], 1);
    assert!(world.allow_rules().is_empty());
}

#[test]
fn an_approved_request_whose_policy_was_deleted_is_abandoned_and_its_rule_deleted() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("timed out".into())));
    world.create("r1", raw_request()).unwrap();
    // The timed-out PUT landed after all.
    let mut landed = crate::testing::rule();
    landed.name = "jit-r1".into();
    world.arm.rules.borrow_mut().push(landed);
    world.at(at(1), |env| policies::delete(env, &admin(), "demo-vm", false)).unwrap();
    world.at(at(2), sweep::sweep).unwrap();
    assert!(world.allow_rules().is_empty(), "deleted at once");
    // The timed-out PUT's lease (to at(5)) keeps the close open: it could still land.
    assert_eq!(world.state("r1"), "revoking");
    world.at(at(6), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "failed");
    assert!(world.allow_rules().is_empty(), "{:?}", world.allow_rules());
}

#[test]
fn extensions_are_capped_by_every_limit_and_the_requester_is_checked_first() {
    let mut policy = policy_json();
    policy["extensions"] = json!("approval");
    let world = World::new(policy);
    world.create("r1", raw_request()).unwrap();
    // alice is an approver of nothing here, but an admin who is the requester is still the requester.
    let alice_admin = caller("alice", &[Role::Requester, Role::Admin], &["devs"]);
    let error =
        world.at(at(1), |env| decisions::extend(env, &alice_admin, "r1", br#"{"duration":"PT30M"}"#)).unwrap_err();
    assert_eq!(error.code, "extension_needs_approval");
    // The service's maximum caps even an admin's extension.
    let mut small = world.config.clone();
    small.limits.max_duration = crate::domain::AccessDuration::parse("PT70M").unwrap();
    let clock = crate::testing::FixedClock(at(1));
    let env = Env::new(&world.kv, &world.arm, &small, at(1), &clock, super::Origin::system());
    let error = decisions::extend(&env, &admin(), "r1", br#"{"duration":"PT30M"}"#).unwrap_err();
    assert_eq!(error.code, "extension_too_long");
    assert!(decisions::extend(&env, &admin(), "r1", br#"{"duration":"PT10M"}"#).is_ok());
}

#[test]
fn a_requester_who_lost_eligibility_cannot_extend() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    let mut policy = policy_json();
    policy["requesters"] = json!(["group:admins-only"]);
    world.at(at(1), |env| policies::put(env, &admin(), "demo-vm", policy.to_string().as_bytes(), false)).unwrap();
    let error = world.at(at(2), |env| decisions::extend(env, &alice(), "r1", br#"{"duration":"PT10M"}"#)).unwrap_err();
    assert_eq!((error.status, error.code), (403, "not_a_requester"));
}

#[test]
fn evaluate_refuses_a_request_that_is_not_an_object() {
    let world = World::new(policy_json());
    let body = br#"{"principal": "alice", "request": [22]}"#;
    let error = world.at(at(0), |env| policies::evaluate(env, &admin(), "demo-vm", body)).unwrap_err();
    assert_eq!((error.status, error.code), (400, "invalid_body"));
}

#[test]
fn a_long_outage_is_caught_up_over_several_ticks_and_every_grant_is_closed() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    // Ten hours without a sweep: more minutes than one sweep reads.
    let first = world.at(at(600), sweep::sweep).unwrap();
    assert!(first.deferred && first.minutes_scanned <= 240 + 3, "{first:?}");
    // Its minute is among the first ones read.
    assert!(world.allow_rules().is_empty());
    let mut ticks = 1;
    while world.at(at(600 + ticks), sweep::sweep).unwrap().deferred {
        ticks += 1;
        assert!(ticks < 10);
    }
    assert_eq!(world.state("r1"), "expired");
}

#[test]
fn deleting_a_policy_with_more_grants_than_one_call_may_swap_for_takes_repeated_calls() {
    let mut many = policy_json();
    many["quotas"] = json!({"per_requester": 3, "per_vm": 100});
    let world = World::new(many);
    for n in 0..40 {
        let who = caller(&format!("u{n}"), &[Role::Requester], &["devs"]);
        let id = RequestId::parse(&format!("r{n}")).unwrap();
        world.at(at(0), |env| requests::create(env, &who, None, id, raw_request().to_string().as_bytes())).unwrap();
    }
    assert_eq!(world.allow_rules().len(), 40);
    let mut calls = 0;
    let reply = loop {
        calls += 1;
        assert!(calls < 10, "never finished");
        match world.at(at(1), |env| policies::delete(env, &admin(), "demo-vm", true)) {
            Ok(reply) => break reply,
            Err(error) => {
                assert_eq!(error.code, "revoke_incomplete", "{error:?}");
                assert!(
                    world.at(at(1), |env| env.policy(&crate::domain::PolicyName::parse("demo-vm").unwrap())).is_ok()
                );
            }
        }
    };
    assert!(calls > 1, "40 closes do not fit one call's swaps");
    assert_eq!(reply.body["deleted"], "demo-vm");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn a_due_minute_that_cannot_be_read_does_not_keep_the_sweep_from_what_is_due_now() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    // The slot of r1's end minute fails to read, for good.
    let minute = sweep::minute_floor(at(60));
    world.kv.fail_reads_of(&keys::due_slot(minute, 1));
    let mut second = raw_request();
    second["ports"] = json!([3389]);
    second["duration"] = json!("PT1H");
    // Hours later, another grant is due now; the stuck minute is far behind the cursor's window.
    for hour in [2, 4, 6] {
        world.at(at(hour * 60), sweep::sweep).unwrap();
    }
    let who = caller("u2", &[Role::Requester], &["devs"]);
    let id = RequestId::parse("r2").unwrap();
    world.at(at(400), |env| requests::create(env, &who, None, id, second.to_string().as_bytes())).unwrap();
    let report = world.at(at(461), sweep::sweep).unwrap();
    assert!(report.deferred, "{report:?}");
    assert_eq!(world.state("r2"), "expired", "{report:?}");
    // And r1, whose slot is unreadable, was closed by the pass over live grants.
    assert_eq!(world.state("r1"), "expired");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn approving_a_request_of_someone_no_longer_allowed_to_ask_is_refused() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    let mut policy = manual(1);
    policy["requesters"] = json!(["group:admins-only"]);
    world.at(at(1), |env| policies::put(env, &admin(), "demo-vm", policy.to_string().as_bytes(), false)).unwrap();
    let error = world.at(at(2), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap_err();
    assert_eq!(error.code, "policy_changed", "{error:?}");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn an_opener_releases_only_its_own_lease_and_a_close_waits_for_the_others() {
    let world = World::new(policy_json());
    // The API opener's PUT times out: its lease (to at(5)) stays, for the PUT may still land.
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("timed out".into())));
    world.create("r1", raw_request()).unwrap();
    // A minute later the sweep opens it under a lease of its own, and releases only that one.
    world.at(at(1), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "active");
    let leases = world.at(at(1), |env| env.request("r1").unwrap().value.put_leases);
    assert_eq!(leases, [at(5)], "the timed-out opener's lease is still held");
    let revoked = world.at(at(2), |env| decisions::revoke(env, &alice(), "r1", b"")).unwrap();
    assert_eq!(revoked.body["state"], "revoking", "not final while the first PUT may land");
    assert!(world.allow_rules().is_empty(), "deleted at once");
    world.at(at(6), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "revoked");
}

#[test]
fn a_confirmed_put_after_an_uncertain_attempt_keeps_its_lease() {
    let world = World::new(policy_json());
    // An earlier attempt of this invocation timed out before the retry was confirmed.
    world.arm.uncertain.set(true);
    world.create("r1", raw_request()).unwrap();
    assert_eq!(world.state("r1"), "active");
    let leases = world.at(at(0), |env| env.request("r1").unwrap().value.put_leases);
    assert_eq!(leases.len(), 1, "kept until the timed-out attempt can no longer land");
}

#[test]
fn a_deleted_policys_grant_whose_due_entry_was_lost_is_still_closed() {
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    world.at(at(1), |env| policies::delete(env, &admin(), "demo-vm", false)).unwrap();
    assert_eq!(crate::store::read_list(&world.kv, keys::POLICIES).unwrap(), ["demo-vm"], "kept while it has grants");
    for key in world.kv.keys().into_iter().filter(|k| k.starts_with("due:")) {
        world.kv.delete(&key).unwrap();
    }
    world.at(at(61), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "expired");
    assert!(world.allow_rules().is_empty());
    world.at(at(62), sweep::sweep).unwrap();
    assert!(crate::store::read_list(&world.kv, keys::POLICIES).unwrap().is_empty(), "then it leaves the round");
}

#[test]
fn deferred_events_go_in_with_the_next_record_or_when_the_invocation_ends() {
    let world = World::new(policy_json());
    let last = || log::head(&world.kv).unwrap().map_or(0, |event| event.seq);
    let before = last();
    let subject = || crate::audit::Subject { request: Some("r1".into()), policy: Some("demo-vm".into()) };
    world.at(at(0), |env| {
        env.defer("rule.put", subject(), Outcome::Ok, json!({}));
        assert_eq!(last(), before, "held back");
        env.record("request.activated", subject(), Outcome::Ok, json!({})).unwrap();
        assert_eq!(last(), before + 2, "written first, in the same append");
        env.defer("rule.deleted", subject(), Outcome::Ok, json!({}));
    });
    assert_eq!(last(), before + 3, "written when the invocation ended");
    let actions: Vec<String> = log::range(&world.kv, before + 1, before + 3).map(|e| e.unwrap().action).collect();
    assert_eq!(actions, ["rule.put", "request.activated", "rule.deleted"]);
    assert_eq!(log::verify_stored(&world.kv, 1, None, None).unwrap().chain.broken, None);
}

/// Three grants that end in the same minute, for the batched close.
fn three_due_grants(world: &World) {
    world.create("r1", raw_request()).unwrap();
    let mut rdp = raw_request();
    rdp["ports"] = json!([3389]);
    world.create("r2", rdp).unwrap();
    world
        .at(at(0), |env| {
            let mut other = alice();
            other.principal = Principal::parse("carol").unwrap();
            requests::create(env, &other, None, RequestId::parse("r3").unwrap(), raw_request().to_string().as_bytes())
        })
        .unwrap();
    assert_eq!(world.allow_rules().len(), 3);
}

#[test]
fn grants_due_together_close_as_one_batch_each_recorded_and_unlisted() {
    let world = World::new(policy_json());
    three_due_grants(&world);
    let head = log::head(&world.kv).unwrap().unwrap().seq;
    let report = world.at(at(61), sweep::sweep).unwrap();
    assert_eq!(report.closed, 3);
    assert!(world.allow_rules().is_empty());
    for id in ["r1", "r2", "r3"] {
        assert_eq!(world.state(id), "expired");
        let events: Vec<_> = log::range(&world.kv, head + 1, head + 100)
            .map(Result::unwrap)
            .filter(|e| e.subject.request.as_deref() == Some(id))
            .map(|e| (e.action, e.outcome))
            .collect();
        let want = [("request.expiring", Outcome::Ok), ("rule.deleted", Outcome::Ok), ("request.expired", Outcome::Ok)];
        assert_eq!(events, want.map(|(a, o)| (a.to_owned(), o)), "{id}");
    }
    for list in [keys::ARM_WORK.to_owned(), keys::live(&PolicyName::parse("demo-vm").unwrap())] {
        assert!(crate::store::read_list(&world.kv, &list).unwrap().is_empty(), "{list}");
    }
    for who in ["alice", "carol"] {
        let open = keys::open_of(&PolicyName::parse("demo-vm").unwrap(), &Principal::parse(who).unwrap());
        assert!(crate::store::read_list(&world.kv, &open).unwrap().is_empty(), "{open}");
    }
}

#[test]
fn a_batched_close_that_loses_a_race_or_meets_a_failed_delete_leaves_that_grant_to_finish_alone() {
    let world = World::new(policy_json());
    three_due_grants(&world);
    // r2's first save in the batch meets a rival's write (an extension that lands first
    // would look the same); r3's DELETE fails once.
    let r2 = keys::request(&RequestId::parse("r2").unwrap());
    let mut rival = true;
    world.kv.before_swap(move |mem, key| {
        if key == r2 && std::mem::take(&mut rival) {
            let bytes = mem.get(key)?.expect("the request exists");
            mem.set(key, &[bytes.as_slice(), b" "].concat())?;
        }
        Ok(())
    });
    // DELETEs: r2's first (closed on its own right after its lost save), then the batch's
    // (r1, r3).
    world.arm.outcomes.borrow_mut().extend([Ok(()), Ok(()), Err(ArmError::Transient("503".into()))]);
    let report = world.at(at(61), sweep::sweep).unwrap();
    world.kv.clear_hook();
    assert_eq!(world.state("r1"), "expired");
    assert_eq!(world.state("r2"), "expired", "closed on its own after the lost race");
    assert_eq!(world.state("r3"), "revoking", "its rule may still be there: kept for the next sweep");
    assert_eq!((report.closed, report.retrying), (2, 1), "{report:?}");
    let events: Vec<_> = log::range(&world.kv, 1, 1000).map(Result::unwrap).collect();
    let of = |id: &str| -> Vec<(String, Outcome)> {
        events
            .iter()
            .filter(|e| e.subject.request.as_deref() == Some(id))
            .map(|e| (e.action.clone(), e.outcome))
            .collect()
    };
    assert!(
        of("r2").windows(2).any(|w| w[0] == ("request.expiring".into(), Outcome::Ok)
            && w[1] == ("request.expiring".into(), Outcome::Failed)),
        "the lost save is recorded as failed: {:?}",
        of("r2")
    );
    assert!(of("r3").contains(&("rule.deleted".into(), Outcome::Failed)), "{:?}", of("r3"));
    assert!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap().contains(&"r3".to_owned()));

    let report = world.at(at(62), sweep::sweep).unwrap();
    assert_eq!(report.closed, 1);
    assert_eq!(world.state("r3"), "expired");
    assert!(world.allow_rules().is_empty());
    assert!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap().is_empty());
}

#[test]
fn a_batch_whose_audit_append_fails_changes_nothing_and_is_closed_by_the_next_sweep() {
    let world = World::new(policy_json());
    three_due_grants(&world);
    world.fail_audit_after(0);
    let report = world.at(at(61), sweep::sweep).unwrap();
    assert_eq!(report.closed, 0);
    for id in ["r1", "r2", "r3"] {
        assert_eq!(world.state(id), "active", "not moved without its event");
    }
    assert_eq!(world.allow_rules().len(), 3);
    world.kv.clear_hook();
    let report = world.at(at(62), sweep::sweep).unwrap();
    assert_eq!(report.closed, 3);
    assert!(world.allow_rules().is_empty());
}

#[test]
fn a_batched_grant_whose_delete_fails_is_listed_again_though_another_sweep_dropped_it_meanwhile() {
    // Another sweep (its clock a little behind) read r1 as active and not due, and drops it
    // from `work:arm` right after this batch listed it and before its save moved it to
    // `revoking`; then the DELETE fails. Unlisted, the grant would never be deleted again.
    let world = World::new(policy_json());
    world.create("r1", raw_request()).unwrap();
    let r1 = keys::request(&RequestId::parse("r1").unwrap());
    let mut rival = true;
    world.kv.before_swap(move |mem, key| {
        if key == r1 && std::mem::take(&mut rival) {
            crate::store::remove_from_list(mem, keys::ARM_WORK, "r1")?;
        }
        Ok(())
    });
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::Transient("503".into())));
    world.at(at(61), sweep::sweep).unwrap();
    world.kv.clear_hook();
    assert_eq!(world.state("r1"), "revoking");
    assert_eq!(crate::store::read_list(&world.kv, keys::ARM_WORK).unwrap(), ["r1"]);
    // The next sweep deletes it.
    world.at(at(62), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "expired");
    assert!(world.allow_rules().is_empty());
}

#[test]
fn a_break_glass_use_whose_request_was_never_saved_is_not_recorded_later() {
    // The append that records a new request fails: the request is not created, and none of
    // its events may surface afterwards (they used to wait in the queue for the next append).
    let mut glass = policy_json();
    glass["break_glass"] = json!({"members": ["group:devs"], "max_duration": "PT1H"});
    let world = World::new(glass);
    world.fail_audit_after(0);
    let mut body = raw_request();
    body["break_glass"] = json!(true);
    assert!(world.create("r1", body).is_err());
    world.kv.clear_hook();
    world.create("r2", raw_request()).unwrap();
    let actions: Vec<_> = log::range(&world.kv, 1, 100)
        .map(Result::unwrap)
        .filter(|e| e.subject.request.as_deref() == Some("r1"))
        .map(|e| e.action)
        .collect();
    assert!(actions.is_empty(), "{actions:?}");
}

/// Makes a stored request look as it did before fleets: no VMs named.
fn strip_vms(world: &World, id: &str) {
    let key = keys::request(&RequestId::parse(id).unwrap());
    let mut stored = crate::store::load::<crate::domain::AccessRequest>(&world.kv, &key).unwrap().unwrap();
    stored.value.vms.clear();
    crate::store::save(&world.kv, &key, &stored.value, Some(stored.version)).unwrap();
}

#[test]
fn a_request_from_before_fleets_opens_only_on_a_one_vm_policy_never_on_a_fleets_other_vms() {
    let world = World::new(manual(1));
    world.create("r1", raw_request()).unwrap();
    world.create("r2", json!({"policy": "demo-vm", "ports": [3389], "duration": "PT1H", "source": "203.0.113.7", "justification": "x"})).unwrap();
    strip_vms(&world, "r1");
    strip_vms(&world, "r2");
    // On the same one-VM policy, it opens to that VM, as it always did.
    world.at(at(1), |env| decisions::approve(env, &bob(), "r1", b"")).unwrap();
    assert_eq!(world.state("r1"), "active");
    assert_eq!(world.allow_rules()[0].destinations, ["10.0.0.4".parse::<std::net::IpAddr>().unwrap()]);

    // Once the policy protects two VMs, it names neither: refused, nothing opened.
    let mut fleet = manual(1);
    let vm2 = crate::testing::VM.replace("demo-vm", "other-vm");
    for field in ["vm", "nsg", "private_ip"] {
        fleet.as_object_mut().unwrap().remove(field);
    }
    fleet["vms"] = json!([
        {"vm": crate::testing::VM, "nsg": crate::testing::NSG, "private_ip": "10.0.0.4"},
        {"vm": vm2, "nsg": crate::testing::NSG, "private_ip": "10.0.0.9"},
    ]);
    world.at(at(2), |env| policies::put(env, &admin(), "demo-vm", fleet.to_string().as_bytes(), false)).unwrap();
    let error = world.at(at(3), |env| decisions::approve(env, &bob(), "r2", b"")).unwrap_err();
    assert_eq!((error.status, error.code), (409, "policy_changed"), "{}", error.message);
    assert_eq!(world.allow_rules().len(), 1, "only r1's rule");
    // The deny rule covers both VMs now.
    let deny = world.arm.rules.borrow().iter().find(|r| r.access == Access::Deny).cloned().unwrap();
    assert_eq!(deny.destinations.len(), 2);
}

#[test]
fn an_open_that_fails_part_way_takes_the_confirmed_rules_off_until_every_nsg_takes_its_own() {
    let mut fleet = policy_json();
    let other_nsg = crate::testing::NSG.replace("demo-nsg", "other-nsg");
    for field in ["vm", "nsg", "private_ip"] {
        fleet.as_object_mut().unwrap().remove(field);
    }
    let vm2 = crate::testing::VM.replace("demo-vm", "other-vm");
    fleet["vms"] = json!([
        {"vm": crate::testing::VM, "nsg": crate::testing::NSG, "private_ip": "10.0.0.4"},
        {"vm": vm2, "nsg": other_nsg, "private_ip": "10.0.1.4"},
    ]);
    let world = World::new(fleet);
    // The first NSG's PUT succeeds, the second's fails for now.
    world.arm.outcomes.borrow_mut().extend([Ok(()), Err(ArmError::Transient("503".into()))]);
    let mut body = raw_request();
    body["vms"] = json!([crate::testing::VM, vm2]);
    let reply = world.create("r1", body).unwrap();
    assert_eq!(reply.body["state"], "approved", "{}", reply.body);
    assert!(world.allow_rules().is_empty(), "no rule is open without an end: {:?}", world.allow_rules());
    world.at(at(2), sweep::sweep).unwrap();
    assert_eq!(world.state("r1"), "active");
    // The fake keeps rules by name alone: both NSGs' `jit-r1` are one entry here (the
    // end-to-end tests count them per NSG).
    assert_eq!(world.allow_rules().len(), 1);
}
