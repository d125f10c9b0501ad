//! The service loop over in-memory fakes: request, approve, open, sweep, close.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{Env, decisions, policies, requests, sweep};
use crate::api::{ApiError, Reply};
use crate::arm::{Access, ArmError, SecurityRule};
use crate::audit::{Outcome, log};
use crate::auth::{ApiKeys, Caller, Role};
use crate::config::{Config, PriorityBand};
use crate::domain::{GroupName, Principal, RequestId};
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
                sweep_secret: None,
                priorities: PriorityBand { min: 100, max: 199 },
                deny_priorities: PriorityBand { min: 4000, max: 4096 },
                limits: limits(),
                trusted_proxies: vec![],
                audit: crate::config::AuditSettings { checkpoint_key: None, checkpoint_every: 1000 },
                drift: crate::config::DriftSettings::default(),
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
        f(&Env {
            kv: &self.kv,
            arm: &self.arm,
            config: &self.config,
            now,
            clock: &clock,
            origin: super::Origin::system(),
        })
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
    assert!(!world.kv.keys().iter().any(|k| k.starts_with("due:")), "{:?}", world.kv.keys());
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
    let report = world.at(at(90), sweep::sweep).unwrap();
    assert_eq!(report.failed, 1);
    assert_eq!(world.state("r1"), "failed");
    // Abandoning deletes whatever a timed-out PUT may have left: 3 failed PUTs, then a DELETE.
    assert_eq!(world.arm.calls.get(), 4);
}

#[test]
fn a_priority_conflict_moves_to_the_next_priority() {
    let world = World::new(policy_json());
    world.arm.outcomes.borrow_mut().push_back(Err(ArmError::PriorityConflict));
    world.create("r1", raw_request()).unwrap();
    let stored = world.at(at(0), |env| env.request("r1").unwrap().value);
    let opened = &world.allow_rules()[0];
    assert_eq!(opened.priority, stored.rule.unwrap().priority);
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
    let newer: Vec<String> = (0..1000).map(|n| format!("n{n}")).collect();
    crate::store::save(
        &world.kv,
        keys::RECENT_REQUESTS,
        &newer,
        crate::store::load::<Vec<String>>(&world.kv, keys::RECENT_REQUESTS).unwrap().map(|v| v.version),
    )
    .unwrap();
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
    // request.created and request.approved are recorded; the record of the PUT fails.
    world.fail_audit_after(2);
    assert_eq!(world.create("r1", raw_request()).unwrap_err().status, 500);
    assert_eq!(world.state("r1"), "approved", "not activated without its record");
    assert!(world.kv.keys().contains(&keys::ARM_WORK.to_owned()), "queued for the sweep");

    world.kv.clear_hook();
    // The failed opener still holds its PUT lease: the sweep leaves the request alone until
    // the lease has run out, then redoes the PUT.
    assert_eq!(world.at(at(1), sweep::sweep).unwrap().opened, 0);
    let report = world.at(at(4), sweep::sweep).unwrap();
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
