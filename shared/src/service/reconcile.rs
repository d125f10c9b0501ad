//! The reconciler: the safety net under every close. A share of each sweep compares what a
//! few policies' NSGs hold with what portcullis believes, so that any close that was missed
//! (a lost due entry, a crash, a race nobody foresaw) heals by itself:
//!
//! - live grants past their end are closed, whatever the due index says;
//! - a `jit-<id>` allow rule with portcullis's description that no open request owns is
//!   removed (`drift.rule_removed`);
//! - a grant whose rule is missing is reported (`drift.rule_missing`) and, by
//!   `drift_missing_rule`, put back or ended;
//! - a missing or changed baseline deny rule is put back (`drift.baseline_restored`);
//! - a foreign allow from anywhere to a protected port, above the deny rule, is reported as a
//!   risk (`drift.exposure`).
//!
//! Rules portcullis did not create (Azure's own `SecurityCenter-JITRule*` among them) are
//! never touched. Each policy is looked at once per `reconcile_every`, spread over the ticks,
//! so many NSGs stay within ARM's read limits; `GET /api/drift` shows the last scans.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::sweep::{Budgeted, Overdue};
use super::{Env, grants, subject_of, subject_of_policy};
use crate::api::{ApiError, Reply};
use crate::arm::{ExistingRule, firewall};
use crate::audit::{Outcome, Subject};
use crate::auth::{Caller, Role};
use crate::config::MissingRule;
use crate::domain::policy::same_id;
use crate::domain::request::Ending;
use crate::domain::{AccessRequest, Event, FirewallId, NsgId, Policy, PolicyName, RequestId, State};
use crate::keys;
use crate::store::{self, Versioned};

/// The most policies one sweep reconciles (each costs an NSG listing).
const MAX_PER_TICK: usize = 10;
/// The most NSGs of one policy a scan lists; a fleet behind more is scanned in turns.
const MAX_NSGS_PER_SCAN: usize = 10;
/// Suspects a partial scan carries over for the NSGs it did not list.
const MAX_SUSPECTS: usize = 200;
/// How long after its request ended a rule may linger before it is called ownerless: a close
/// that is final has no PUT in flight, so this only absorbs clock differences.
const ENDED_GRACE: TimeDelta = TimeDelta::minutes(1);
/// The description every rule portcullis creates starts with.
const OURS: &str = "portcullis JIT";

/// One thing a scan found.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finding {
    /// `rule_removed`, `rule_missing`, `baseline_restored`, `baseline_removed`, `exposure`,
    /// `nsg_unreadable` or `refresh_failed`.
    pub kind: String,
    /// The NSG it was found on.
    #[serde(default)]
    pub nsg: String,
    /// The rule concerned.
    pub rule: String,
    /// What it means.
    pub detail: String,
}

/// The last scan of a policy's NSGs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DriftScan {
    /// The policy.
    pub policy: String,
    /// Its NSGs (those of its VMs), each listed once per scan.
    #[serde(default)]
    pub nsgs: Vec<String>,
    /// When.
    pub scanned_at: DateTime<Utc>,
    /// Rules on the NSGs.
    pub rules: usize,
    /// What was found.
    pub findings: Vec<Finding>,
    /// Rules that looked ownerless with no request record at all: removed if still there at
    /// the next scan (a request being created right now has no record yet).
    #[serde(default)]
    pub suspects: Vec<String>,
    /// Where the next scan of a policy behind more NSGs than one scan lists starts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub next_nsg: usize,
}

fn is_zero(value: &usize) -> bool {
    *value == 0
}

/// Reconciles the next few policies of the round; answers how many it looked at.
pub(crate) fn round(env: &Env, budget: &Budgeted, overdue: &mut Overdue) -> Result<usize, ApiError> {
    let names = store::read_list(env.kv, keys::POLICIES)?;
    if names.is_empty() {
        return Ok(0);
    }
    // Every policy once per `every`, at one tick a minute.
    let minutes = usize::try_from(env.config.drift.every.num_minutes().max(1)).unwrap_or(1);
    let per_tick = names.len().div_ceil(minutes).clamp(1, MAX_PER_TICK).min(names.len());
    let start = store::load::<usize>(env.kv, keys::RECONCILE_NEXT)?.map_or(0, |v| v.value) % names.len();
    let work = store::read_list(env.kv, keys::ARM_WORK)?;
    let mut looked = 0;
    // Listing a fleet's resource group or tag again costs the most reads: one per sweep.
    let mut refreshes = 1;
    for offset in 0..per_tick {
        if budget.spent() {
            break;
        }
        let name = &names[(start + offset) % names.len()];
        looked += 1;
        if let Err(error) = reconcile_policy(env, name, &work, overdue, &mut refreshes) {
            eprintln!("reconcile: policy {name}: {}", error.internal.as_deref().unwrap_or(&error.message));
        }
    }
    // One writer's position is as good as another's: a plain write.
    let next = serde_json::to_vec(&json!({"version": 0, "doc": (start + looked) % names.len()}))
        .map_err(ApiError::internal)?;
    env.kv.set(keys::RECONCILE_NEXT, &next)?;
    Ok(looked)
}

fn reconcile_policy(
    env: &Env,
    name: &str,
    work: &[String],
    overdue: &mut Overdue,
    refreshes: &mut usize,
) -> Result<(), ApiError> {
    let Ok(name) = PolicyName::parse(name) else { return Ok(()) };
    let Some(policy) = store::load::<Policy>(env.kv, &keys::policy(&name))? else {
        return reconcile_deleted(env, &name, work, overdue);
    };
    let previous = store::load::<DriftScan>(env.kv, &keys::drift(&name))?.map(|v| v.value);
    if previous.as_ref().is_some_and(|p| p.scanned_at + env.config.drift.every > env.now + TimeDelta::seconds(5)) {
        return Ok(());
    }
    let mut grants = close_overdue_grants(env, &name, work, overdue)?;
    let mut scan = DriftScan {
        policy: name.to_string(),
        nsgs: Vec::new(),
        scanned_at: env.now,
        rules: 0,
        findings: Vec::new(),
        suspects: Vec::new(),
        next_nsg: 0,
    };
    let mut policy = policy;
    super::fleet::refresh(env, &mut policy, &mut grants, refreshes, &mut scan)?;
    let policy = policy.value;
    // The NSGs of its VMs, and any its grants' or baselines' rules are on (a VM may have
    // moved or left since they were put).
    let mut nsgs: Vec<NsgId> = policy.nsgs().into_iter().cloned().collect();
    let elsewhere = grants.iter().flat_map(|g| g.value.rules.iter()).chain(&policy.baselines).map(|r| &r.nsg);
    for nsg in elsewhere.collect::<Vec<_>>() {
        if !nsgs.iter().any(|known| same_id(known.as_str(), nsg.as_str())) {
            nsgs.push(nsg.clone());
        }
    }
    // A fleet behind many NSGs is scanned a few NSGs at a time, in turn; what the other NSGs'
    // last scans found is kept.
    if nsgs.len() > MAX_NSGS_PER_SCAN {
        let start = previous.as_ref().map_or(0, |p| p.next_nsg) % nsgs.len();
        nsgs.rotate_left(start);
        let skipped = nsgs.split_off(MAX_NSGS_PER_SCAN);
        scan.next_nsg = (start + MAX_NSGS_PER_SCAN) % (MAX_NSGS_PER_SCAN + skipped.len());
        if let Some(previous) = &previous {
            let elsewhere = |f: &Finding| skipped.iter().any(|n| same_id(n.as_str(), &f.nsg));
            scan.findings.extend(previous.findings.iter().filter(|f| elsewhere(f)).cloned());
            scan.suspects.extend(previous.suspects.iter().take(MAX_SUSPECTS).cloned());
        }
    }
    for nsg in &nsgs {
        scan.nsgs.push(nsg.as_str().to_owned());
        let on = OnNsg { policy: &policy, nsg };
        match env.arm.list_rules(nsg) {
            Ok(rules) => {
                scan.rules += rules.len();
                remove_ownerless_rules(env, &on, &rules, work, previous.as_ref(), &mut scan)?;
                check_grants(env, &on, &rules, &mut grants, previous.as_ref(), &mut scan)?;
                check_baseline(env, &on, &rules, &mut scan)?;
                report_exposure(env, &on, &rules, previous.as_ref(), &mut scan)?;
            }
            Err(error) => scan.findings.push(Finding {
                kind: "nsg_unreadable".into(),
                nsg: nsg.as_str().to_owned(),
                rule: String::new(),
                detail: format!("the NSG could not be listed: {error}"),
            }),
        }
    }
    remove_ownerless_firewall_rules(env, &policy, &grants, work, previous.as_ref(), &mut scan)?;
    let bytes = serde_json::to_vec(&json!({"version": 0, "doc": scan})).map_err(ApiError::internal)?;
    env.kv.set(&keys::drift(&name), &bytes)?;
    Ok(())
}

/// The pass over a policy's live grants: one past its end is closed now, one stuck closing
/// is put back on the sweep's list. Answers the grants that are rightly active.
fn close_overdue_grants(
    env: &Env,
    policy: &PolicyName,
    work: &[String],
    overdue: &mut Overdue,
) -> Result<Vec<Versioned<AccessRequest>>, ApiError> {
    let mut active = Vec::new();
    for id in store::read_list(env.kv, &keys::live(policy))? {
        let Ok(request_id) = RequestId::parse(&id) else { continue };
        let mut request = match store::load_fresh::<AccessRequest>(env.kv, &keys::request(&request_id)) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(error) => {
                eprintln!("reconcile: cannot read live grant '{id}': {error}");
                continue;
            }
        };
        match request.value.state {
            State::Active if request.value.ends_at.is_some_and(|end| end <= env.now) => {
                if let Err(error) = grants::close(env, &mut request, Event::Due, None) {
                    eprintln!(
                        "reconcile: closing overdue {id}: {}",
                        error.internal.as_deref().unwrap_or(&error.message)
                    );
                }
                overdue.note(&request.value, env.now);
            }
            State::Active => active.push(request),
            State::Revoking { .. } if !work.contains(&id) => {
                store::add_to_list(env.kv, keys::ARM_WORK, &id, usize::MAX)?;
            }
            _ => {}
        }
    }
    Ok(active)
}

/// A deleted policy stays in the round while it has grants: they still close on time whatever
/// the due index says. Once none is left, it leaves the round.
fn reconcile_deleted(env: &Env, name: &PolicyName, work: &[String], overdue: &mut Overdue) -> Result<(), ApiError> {
    close_overdue_grants(env, name, work, overdue)?;
    if store::read_list(env.kv, &keys::live(name))?.is_empty() {
        store::remove_from_list(env.kv, keys::POLICIES, name.as_str())?;
        // Created again meanwhile: it belongs in the round after all.
        if store::load::<Policy>(env.kv, &keys::policy(name))?.is_some() {
            store::add_to_list(env.kv, keys::POLICIES, name.as_str(), usize::MAX)?;
        }
    }
    Ok(())
}

/// One NSG of a policy being scanned.
struct OnNsg<'a> {
    policy: &'a Policy,
    nsg: &'a NsgId,
}

impl OnNsg<'_> {
    fn finding(&self, kind: &str, rule: &str, detail: String) -> Finding {
        Finding { kind: kind.into(), nsg: self.nsg.as_str().to_owned(), rule: rule.to_owned(), detail }
    }

    fn reported(previous: Option<&DriftScan>, kind: &str, nsg: &NsgId, rule: &str) -> bool {
        previous.is_some_and(|p| {
            p.findings
                .iter()
                .any(|f| f.kind == kind && f.rule == rule && (f.nsg.is_empty() || same_id(&f.nsg, nsg.as_str())))
        })
    }
}

/// Whether a rule is one of portcullis's grant rules, and the request id it names.
fn grant_rule_id(rule: &ExistingRule) -> Option<&str> {
    let id = rule.name.strip_prefix("jit-")?;
    (rule.allow && !rule.name.starts_with("jit-deny-") && rule.description.starts_with(OURS)).then_some(id)
}

fn record(env: &Env, action: &'static str, subject: Subject, details: serde_json::Value) -> Result<(), ApiError> {
    env.record(action, subject, Outcome::Ok, details).map(drop)
}

/// Whether the rule `name` of request `id` has no owner any more: its request is over (a
/// minute ago), or has no record at two scans in a row (a request being created right now
/// has none yet). `None` when the record cannot be read now: decided at a later scan, never
/// on a guess. An owner still opening or closing is put back on the sweep's list, whatever
/// became of its entry there, and the sweep finishes (or abandons) it.
fn judge_owner(
    env: &Env,
    id: &str,
    name: &str,
    work: &[String],
    previous: Option<&DriftScan>,
    scan: &mut DriftScan,
) -> Result<Option<(Option<AccessRequest>, bool)>, ApiError> {
    let owner = match RequestId::parse(id) {
        Ok(id) => match store::load_fresh::<AccessRequest>(env.kv, &keys::request(&id)) {
            Ok(owner) => owner.map(|o| o.value),
            Err(_) => return Ok(None),
        },
        Err(_) => None,
    };
    if let Some(request) = &owner
        && matches!(request.state, State::Approved | State::Revoking { .. })
        && !request.put_in_flight(env.fresh_now())
        && !work.iter().any(|w| w == id)
    {
        store::add_to_list(env.kv, keys::ARM_WORK, id, usize::MAX)?;
    }
    let ownerless = match &owner {
        Some(request) => {
            request.state.is_final()
                && request
                    .closed_at
                    .or(request.ended.as_ref().map(|e| e.at))
                    .is_none_or(|at| at + ENDED_GRACE <= env.now)
        }
        None if previous.is_some_and(|p| p.suspects.iter().any(|s| s == name)) => true,
        None => {
            scan.suspects.push(name.to_owned());
            false
        }
    };
    Ok(Some((owner, ownerless)))
}

/// Removes the rules of portcullis's collections on the policy's firewall (and on those its
/// grants went through) that no open request owns, in one write per firewall.
fn remove_ownerless_firewall_rules(
    env: &Env,
    policy: &Policy,
    grants: &[Versioned<AccessRequest>],
    work: &[String],
    previous: Option<&DriftScan>,
    scan: &mut DriftScan,
) -> Result<(), ApiError> {
    let mut firewalls: Vec<&FirewallId> = policy.firewall.iter().collect();
    for firewall in grants.iter().filter_map(|g| g.value.firewall.as_ref().map(|f| &f.firewall)) {
        if !firewalls.iter().any(|known| same_id(known.as_str(), firewall.as_str())) {
            firewalls.push(firewall);
        }
    }
    for firewall in firewalls {
        let finding = |kind: &str, rule: &str, detail: String| Finding {
            kind: kind.into(),
            nsg: firewall.as_str().to_owned(),
            rule: rule.to_owned(),
            detail,
        };
        let names = match env.arm.list_firewall_rules(firewall) {
            Ok(names) => names,
            Err(error) => {
                scan.findings.push(finding("nsg_unreadable", "", format!("the firewall could not be read: {error}")));
                continue;
            }
        };
        let mut ownerless: Vec<(String, Option<String>)> = Vec::new();
        for name in names {
            let Some(id) = firewall::request_of(&name) else { continue };
            if let Some((owner, true)) = judge_owner(env, id, &name, work, previous, scan)? {
                ownerless.push((name.clone(), owner.map(|o| o.state.name().to_owned())));
            }
        }
        if ownerless.is_empty() {
            continue;
        }
        let names: Vec<String> = ownerless.iter().map(|(name, _)| name.clone()).collect();
        let outcome = env.arm.delete_firewall_rules(firewall, &names);
        let details = json!({
            "firewall": firewall.as_str(), "rules": names, "reason": "no open request owns them",
            "owner_states": ownerless.iter().map(|(_, state)| state.clone()).collect::<Vec<_>>(),
        });
        grants::record_arm_write(env, "drift.rule_removed", subject_of_policy(&policy.name), details, &outcome)?;
        let detail = match outcome {
            Ok(_) => "firewall rules no open request owns were removed".to_owned(),
            Err(error) => format!("firewall rules no open request owns could not be removed yet: {error}"),
        };
        scan.findings.push(finding("rule_removed", &names.join(","), detail));
    }
    Ok(())
}

/// Removes grant rules whose request is over (or never existed).
fn remove_ownerless_rules(
    env: &Env,
    on: &OnNsg,
    rules: &[ExistingRule],
    work: &[String],
    previous: Option<&DriftScan>,
    scan: &mut DriftScan,
) -> Result<(), ApiError> {
    for rule in rules {
        let Some(id) = grant_rule_id(rule) else { continue };
        let Some((owner, true)) = judge_owner(env, id, &rule.name, work, previous, scan)? else { continue };
        let outcome = env.arm.delete_rule(on.nsg, &rule.name);
        let subject = Subject { request: Some(id.to_owned()), policy: Some(on.policy.name.to_string()) };
        let details = json!({
            "nsg": on.nsg.as_str(), "rule": rule.name, "reason": "no open request owns it",
            "owner_state": owner.as_ref().map(|o| o.state.name()),
        });
        grants::record_arm_write(env, "drift.rule_removed", subject, details, &outcome)?;
        let detail = match outcome {
            Ok(_) => "an allow rule no open request owns was removed".to_owned(),
            Err(error) => format!("an allow rule no open request owns could not be removed yet: {error}"),
        };
        scan.findings.push(on.finding("rule_removed", &rule.name, detail));
    }
    Ok(())
}

/// Reports active grants whose rule on this NSG is missing, and acts on them as configured
/// (a grant ended here is not looked at again on the policy's other NSGs).
fn check_grants(
    env: &Env,
    on: &OnNsg,
    rules: &[ExistingRule],
    grants: &mut Vec<Versioned<AccessRequest>>,
    previous: Option<&DriftScan>,
    scan: &mut DriftScan,
) -> Result<(), ApiError> {
    let mut index = 0;
    while index < grants.len() {
        let grant = &mut grants[index];
        index += 1;
        let Some(rule) = grant.value.rules.iter().find(|r| same_id(r.nsg.as_str(), on.nsg.as_str())).cloned() else {
            continue;
        };
        if rules.iter().any(|r| r.name.eq_ignore_ascii_case(&rule.name)) {
            continue;
        }
        let reported = OnNsg::reported(previous, "rule_missing", on.nsg, &rule.name);
        let action = env.config.drift.missing_rule;
        if !reported || action != MissingRule::Report {
            let details =
                json!({"nsg": rule.nsg.as_str(), "rule": rule.name, "action": format!("{action:?}").to_lowercase()});
            record(env, "drift.rule_missing", subject_of(&grant.value), details)?;
        }
        let detail = match action {
            MissingRule::Report => "the grant's rule is missing from the NSG (reported only)".to_owned(),
            MissingRule::Reput => match grants::reput(env, grant, on.policy) {
                Ok(()) => "the grant's rule was missing and was put back".to_owned(),
                Err(error) => format!("the grant's rule is missing and could not be put back: {}", error.message),
            },
            MissingRule::Revoke => {
                let ending = Ending {
                    by: "system".into(),
                    at: env.now,
                    reason: Some("its rule was missing from the NSG".into()),
                };
                let detail = match grants::close(env, grant, Event::Revoke, Some(ending)) {
                    Ok(()) => "the grant's rule was missing: the grant was ended".to_owned(),
                    Err(error) => format!("the grant's rule is missing; ending it failed: {}", error.message),
                };
                index -= 1;
                grants.remove(index);
                detail
            }
        };
        scan.findings.push(on.finding("rule_missing", &rule.name, detail));
    }
    Ok(())
}

/// Puts back a missing or changed baseline deny rule of an enabled policy on this NSG (one
/// that covers the policy's VMs behind it), and removes one left on an NSG none of them is
/// behind any more.
fn check_baseline(env: &Env, on: &OnNsg, rules: &[ExistingRule], scan: &mut DriftScan) -> Result<(), ApiError> {
    let policy = on.policy;
    let name = grants::baseline_name(policy);
    let expected_destinations = policy.destinations_on(on.nsg);
    let recorded = policy.baseline_on(on.nsg);
    if !policy.enabled || expected_destinations.is_empty() {
        if let Some(stale) = recorded.filter(|_| policy.enabled)
            && still_as_scanned(env, policy, on.nsg)?
        {
            // Its VMs left this NSG: the deny rule has nothing left to protect here.
            let detail = match grants::remove_baseline(env, &policy.name, stale) {
                Ok(()) => {
                    forget_baseline(env, policy, on.nsg)?;
                    "no VM of the policy is behind this NSG any more: its deny rule was removed".to_owned()
                }
                Err(error) => {
                    format!("the deny rule of VMs that left this NSG could not be removed: {}", error.message)
                }
            };
            scan.findings.push(on.finding("baseline_removed", &name, detail));
        }
        return Ok(());
    }
    let mut expected_ports: Vec<String> = policy.ports.iter().map(|p| p.port.to_string()).collect();
    expected_ports.sort();
    let mut expected_destinations: Vec<String> = expected_destinations.iter().map(|d| d.to_string()).collect();
    expected_destinations.sort();
    let intact = rules.iter().find(|r| r.name.eq_ignore_ascii_case(&name)).is_some_and(|rule| {
        let mut ports = rule.ports.clone();
        ports.sort();
        let mut destinations = rule.destinations.clone();
        destinations.sort();
        !rule.allow
            && rule.inbound
            && rule.protocol.eq_ignore_ascii_case(policy.baseline_protocol().arm_name())
            && rule.sources == ["*"]
            && ports == expected_ports
            && recorded.is_none_or(|b| b.priority == rule.priority)
            && destinations == expected_destinations
    });
    if intact || !still_as_scanned(env, policy, on.nsg)? {
        return Ok(());
    }
    let detail = match grants::ensure_baseline_on(env, policy, on.nsg, recorded) {
        Ok(restored) => {
            record(
                env,
                "drift.baseline_restored",
                subject_of_policy(&policy.name),
                json!({"nsg": on.nsg.as_str(), "rule": name}),
            )?;
            if recorded != Some(&restored) {
                // The deny rule moved to another priority or covers other VMs: the policy
                // remembers it.
                let nsg = on.nsg.clone();
                store::update::<Policy, _>(env.kv, &keys::policy(&policy.name), |stored| {
                    let mut stored = stored?;
                    let current = stored.enabled && stored.destinations_on(&nsg) == restored.destinations;
                    current.then(|| {
                        stored.baselines.retain(|b| !same_id(b.nsg.as_str(), nsg.as_str()));
                        stored.baselines.push(restored.clone());
                        stored
                    })
                })?;
            }
            "the baseline deny rule was missing or changed and was put back".to_owned()
        }
        Err(error) => {
            format!("the baseline deny rule is missing or changed; putting it back failed: {}", error.message)
        }
    };
    scan.findings.push(on.finding("baseline_restored", &name, detail));
    Ok(())
}

/// Whether the stored policy still asks on `nsg` what the scan saw (enabled or not, the same
/// addresses and ports): an admin's change meanwhile is left to the next scan rather than
/// undone with a deny rule written from the older view.
fn still_as_scanned(env: &Env, policy: &Policy, nsg: &NsgId) -> Result<bool, ApiError> {
    let fresh = store::load_fresh::<Policy>(env.kv, &keys::policy(&policy.name))?;
    Ok(fresh.is_some_and(|fresh| {
        fresh.value.enabled == policy.enabled
            && fresh.value.ports == policy.ports
            && fresh.value.destinations_on(nsg) == policy.destinations_on(nsg)
    }))
}

/// Drops the record of a policy's deny rule on an NSG once it is removed (unless a VM of the
/// policy is behind that NSG again: the deny rule it needs is put back at the next scan).
fn forget_baseline(env: &Env, policy: &Policy, nsg: &NsgId) -> Result<(), ApiError> {
    store::update::<Policy, _>(env.kv, &keys::policy(&policy.name), |stored| {
        let mut stored = stored?;
        if stored.policy_covers(nsg) {
            return None;
        }
        let before = stored.baselines.len();
        stored.baselines.retain(|b| !same_id(b.nsg.as_str(), nsg.as_str()));
        (stored.baselines.len() != before).then_some(stored)
    })?;
    Ok(())
}

/// Reports rules portcullis does not own that let anyone in to a protected port ahead of the
/// baseline deny rule.
fn report_exposure(
    env: &Env,
    on: &OnNsg,
    rules: &[ExistingRule],
    previous: Option<&DriftScan>,
    scan: &mut DriftScan,
) -> Result<(), ApiError> {
    let policy = on.policy;
    if policy.destinations_on(on.nsg).is_empty() {
        return Ok(());
    }
    let deny_priority = policy.baseline_on(on.nsg).map_or(u16::MAX, |b| b.priority);
    let protected = policy.destinations_on(on.nsg);
    for rule in rules {
        let ours = rule.description.starts_with(OURS) && rule.name.starts_with("jit-");
        let exposed: Vec<u16> = policy.ports.iter().map(|p| p.port.get()).filter(|p| rule.covers_port(*p)).collect();
        // On an NSG shared with other VMs, a rule for those VMs alone exposes none of ours.
        if !rule.destinations.iter().any(|d| reaches_any(d, &protected)) {
            continue;
        }
        if ours
            || !rule.inbound
            || !rule.allow
            || !rule.from_anywhere()
            || rule.priority >= deny_priority
            || exposed.is_empty()
        {
            continue;
        }
        let detail = format!(
            "rule '{}' (priority {}) allows {} from anywhere to port(s) {:?}, ahead of the baseline deny rule",
            rule.name, rule.priority, rule.protocol, exposed
        );
        if !OnNsg::reported(previous, "exposure", on.nsg, &rule.name) {
            let details =
                json!({"nsg": on.nsg.as_str(), "rule": rule.name, "priority": rule.priority, "ports": exposed});
            record(env, "drift.exposure", subject_of_policy(&policy.name), details)?;
        }
        scan.findings.push(on.finding("exposure", &rule.name, detail));
    }
    Ok(())
}

/// Whether an NSG rule's destination (an address, a prefix, or a tag such as `*` or
/// `VirtualNetwork`) takes in one of `addresses`. A tag is taken to: it may.
fn reaches_any(destination: &str, addresses: &[std::net::IpAddr]) -> bool {
    if let Ok(address) = destination.parse::<std::net::IpAddr>() {
        return addresses.contains(&address);
    }
    match destination.parse::<ipnet::IpNet>() {
        Ok(prefix) => addresses.iter().any(|a| prefix.contains(a)),
        Err(_) => true,
    }
}

/// `GET /api/drift`: the last scan of every policy's NSG (admins and auditors).
pub fn list(env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
    if !caller.has(Role::Admin) && !caller.has(Role::Auditor) {
        return Err(ApiError::forbidden("role_required", "drift reports need the admin or auditor role"));
    }
    let mut scans = Vec::new();
    for name in store::read_list(env.kv, keys::POLICIES)? {
        let Ok(name) = PolicyName::parse(&name) else { continue };
        if let Some(scan) = store::load::<DriftScan>(env.kv, &keys::drift(&name))? {
            scans.push(scan.value);
        }
    }
    Ok(Reply::ok(json!({ "scans": scans })))
}
