//! Opening and closing NSG rules: the only code that writes to ARM.
//!
//! Both steps are written so a crash at any point leaves the request where the sweep finds
//! it: the request is listed under `work:arm` before ARM is called and leaves it only once
//! ARM confirmed the outcome. A rule that may exist is never forgotten.
//!
//! Opens and closes can race (a revoke while the PUT is in flight, expiry during a re-PUT).
//! The rule's name is fixed at approval, so every close deletes it whether or not a PUT was
//! confirmed; an opener holds a PUT lease in the request while its PUT may land, and a close
//! becomes final only when no lease is held; an opener that loses its save reloads and, if
//! the request is closing or closed, deletes the rule it just put.
//!
//! Every ARM write is audited with its outcome and ARM's request id before the state that
//! depends on it is saved: if that record fails, the request stays where the sweep retries
//! the (idempotent) write and records it then.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

use super::{Env, subject_of, subject_of_policy};
use crate::api::ApiError;
use crate::arm::firewall::FirewallWant;
use crate::arm::{Access, ArmError, ArmReceipt, SecurityRule};
use crate::audit::{Outcome, Subject};
use crate::config::PriorityBand;
use crate::domain::policy::same_id;
use crate::domain::request::{Ending, FirewallRules, MappedPort, RuleRef};
use crate::domain::{AccessRequest, Event, NsgId, Policy, PolicyName, PortSet, State};
use crate::keys;
use crate::store::{self, Versioned};

/// Conflicts tolerated in one placement: each one re-reads the NSG, so more than a few means
/// another writer is racing us and the sweep should try later.
const CONFLICT_RETRIES: usize = 3;
/// How long an approved request may keep failing to open before it is abandoned (and any
/// rule that may have been created is removed).
const OPEN_GRACE: TimeDelta = TimeDelta::minutes(15);
/// How long a PUT of an allow rule may be in flight: no ARM call is sent later than
/// `ARM_TIME_LIMIT` (60 s) into an invocation and none waits more than `arm_timeout` (at most
/// 30 s) to connect and again for its answer, so whatever an opener sent has landed or never
/// will by then, dead opener or not, with room to spare.
pub const PUT_LEASE: TimeDelta = TimeDelta::minutes(5);
/// How long after a PUT began the sweep leaves its open alone (its opener may still be at
/// work) before retrying it.
pub const RETRY_PAUSE: TimeDelta = TimeDelta::minutes(1);
/// Reloads after a lost race before a step gives up with 409 (each means another writer won).
const SETTLE_ATTEMPTS: usize = 5;
/// Why a replaced grant ended (Azure's `NewerRequestInitiated`).
pub const SUPERSEDED: &str = "newer request initiated";

/// Puts `rule` on the NSG at its priority, or, when that priority is taken, at the first free
/// one in `band` after it (read from the NSG). Leaves `rule.priority` at the one used.
pub fn put_in_band(
    env: &Env,
    nsg: &NsgId,
    rule: &mut SecurityRule,
    band: PriorityBand,
) -> Result<ArmReceipt, ArmError> {
    for _ in 0..CONFLICT_RETRIES {
        match env.arm.put_rule(nsg, rule) {
            Err(ArmError::PriorityConflict) => {}
            other => return other,
        }
        let taken: Vec<u16> = env
            .arm
            .list_rules(nsg)?
            .into_iter()
            .filter(|r| r.inbound && r.name != rule.name)
            .map(|r| r.priority)
            .collect();
        let span = band.max - band.min + 1;
        rule.priority = (1..=span)
            .map(|step| band.min + (rule.priority.saturating_sub(band.min) + step) % span)
            .find(|p| !taken.contains(p))
            .ok_or_else(|| ArmError::Transient(format!("no free priority in {}..{} on the NSG", band.min, band.max)))?;
    }
    Err(ArmError::Transient("priorities keep colliding with concurrent writers".into()))
}

/// A slot in the band, spread by a stable hash so concurrent grants rarely collide.
fn preferred_priority(key: &str, band: PriorityBand) -> u16 {
    // FNV-1a.
    let hash = key.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    band.min + (hash % u32::from(band.max - band.min + 1)) as u16
}

/// The rules a request's grant will have: one per NSG its VMs sit behind, each named from
/// the request's id and letting in to those VMs' addresses. Fixed when the request is
/// approved, before ARM is called.
pub fn rule_refs(env: &Env, request: &AccessRequest, policy: &Policy) -> Vec<RuleRef> {
    let mut rules: Vec<RuleRef> = Vec::new();
    let vms = request.vms.iter().filter_map(|id| policy.vm(id.as_str()));
    let vms: Vec<_> = if request.vms.is_empty() { policy.vms.iter().take(1).collect() } else { vms.collect() };
    for vm in vms {
        match rules.iter_mut().find(|r| same_id(r.nsg.as_str(), vm.nsg.as_str())) {
            Some(rule) => rule.destinations.push(vm.private_ip),
            None => rules.push(RuleRef {
                nsg: vm.nsg.clone(),
                name: request.rule_name(),
                priority: preferred_priority(request.id.as_str(), env.config.priorities),
                destinations: vec![vm.private_ip],
            }),
        }
    }
    for rule in &mut rules {
        rule.destinations.sort();
        rule.destinations.dedup();
    }
    rules
}

/// Marks an approved request as about to be opened: its rule is named and a PUT lease taken,
/// and it is listed under `work:arm`, all before ARM is called. The caller saves it, then
/// calls [`open`] with the lease (its token).
pub fn prepare_open(env: &Env, request: &mut AccessRequest, policy: &Policy) -> Result<Lease, ApiError> {
    store::add_to_list(env.kv, keys::ARM_WORK, request.id.as_str(), usize::MAX)?;
    if request.rules.is_empty() {
        request.rules = rule_refs(env, request, policy);
    }
    if request.firewall.is_none()
        && let Some(firewall) = &policy.firewall
    {
        let names = request.firewall_targets().into_iter().map(|(name, _, _)| name).collect();
        request.firewall = Some(FirewallRules { firewall: firewall.clone(), names, mapped: Vec::new() });
    }
    let now = env.fresh_now();
    Ok(request.take_put_lease(now, now + PUT_LEASE))
}

/// A PUT lease one opener holds (the instant it runs out, which is also its token).
pub type Lease = DateTime<Utc>;

/// Runs `step`, and when another writer saved the request first, reloads it and runs `step`
/// again on what that writer left: every step here is written for whatever state it finds.
fn retrying(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    mut step: impl FnMut(&mut Versioned<AccessRequest>) -> Result<(), ApiError>,
) -> Result<(), ApiError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match step(request) {
            Err(error) if error.is_concurrent_update() && attempt < SETTLE_ATTEMPTS => {
                *request = env.request(request.value.id.as_str())?;
            }
            other => return other,
        }
    }
}

/// Releases this opener's lease once its PUT's outcome is known for sure: confirmed, with no
/// earlier attempt of this invocation that may still take effect. Otherwise the lease runs
/// out by itself. Other openers' leases are never touched.
fn release(env: &Env, request: &mut AccessRequest, mine: Option<Lease>) {
    if let Some(mine) = mine.filter(|_| !env.arm.had_uncertain_writes()) {
        request.release_put_lease(mine);
    }
}

/// The sweep's retry of an open that has not completed: unless the last PUT began less than
/// [`RETRY_PAUSE`] ago (its opener may still be at work), takes a lease of its own in the
/// store, then opens. Two PUTs of one rule are harmless; a close waits for every lease.
pub fn retry_open(env: &Env, request: &mut Versioned<AccessRequest>, policy: Option<&Policy>) -> Result<(), ApiError> {
    let now = env.fresh_now();
    if request.value.put_lease_end().is_some_and(|end| end - PUT_LEASE + RETRY_PAUSE > now) {
        return Ok(());
    }
    let lease = match policy {
        Some(policy) => {
            let lease = prepare_open(env, &mut request.value, policy)?;
            env.save_request(request)?;
            Some(lease)
        }
        None => None,
    };
    open(env, request, policy, lease)
}

/// Puts the allow rule of an approved request and activates it, or records why not. The
/// request holds the PUT lease this call is covered by (taken with the approval, or renewed
/// by [`retry_open`]); it is released only once the outcome is known: confirmed, or refused.
/// A PUT that failed otherwise (a timeout, a dropped connection) may still land, so its lease
/// stays until it runs out.
pub fn open(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    policy: Option<&Policy>,
    mine: Option<Lease>,
) -> Result<(), ApiError> {
    let outcome = open_unflushed(env, request, policy, mine);
    flushed(env, outcome)
}

/// A confirmed ARM write's event waits for the append of the state it led to; whatever ended
/// the step, it is written before the step returns, not at the end of a long invocation.
fn flushed(env: &Env, outcome: Result<(), ApiError>) -> Result<(), ApiError> {
    let flushed = env.flush();
    outcome.and(flushed)
}

fn open_unflushed(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    policy: Option<&Policy>,
    mine: Option<Lease>,
) -> Result<(), ApiError> {
    if request.value.state != State::Approved {
        return Ok(());
    }
    let Some(policy) = policy else {
        return abandon(env, request, "the policy was deleted before the rule could be opened".into());
    };
    if let Err(why) = still_allowed(&request.value, policy) {
        return abandon(env, request, format!("the policy no longer allows it: {why}"));
    }
    let mine = match mine {
        Some(lease) if !request.value.rules.is_empty() => lease,
        _ => {
            let lease = prepare_open(env, &mut request.value, policy)?;
            env.save_request(request)?;
            lease
        }
    };
    let mine = Some(mine);
    let ends_at = env.now + request.value.duration.as_delta();
    let Some(rules) = allow_rules(&request.value, policy, &request.value.ports, ends_at) else {
        return abandon(
            env,
            request,
            "the request was made before its policy protected several VMs and names none: ask again, naming the VM"
                .into(),
        );
    };
    // One PUT per NSG, in order; the first failure stops the rest (a refused one fails the
    // whole request closed, a transient one is retried whole: PUTs are idempotent).
    let mut priorities = Vec::with_capacity(rules.len());
    let mut outcome = Ok(ArmReceipt::default());
    let mut failed_on = String::new();
    for (rule_ref, mut rule) in request.value.rules.clone().into_iter().zip(rules) {
        outcome = put_in_band(env, &rule_ref.nsg, &mut rule, env.config.priorities);
        // A confirmed PUT is recorded with the activation that follows (one append); any other
        // outcome before anything else happens.
        let details = rule_details(&rule_ref.nsg, &rule);
        if outcome.is_ok() {
            defer_arm_write(env, "rule.put", subject_of(&request.value), details, &outcome);
            priorities.push(rule.priority);
        } else {
            record_arm_write(env, "rule.put", subject_of(&request.value), details, &outcome)?;
            failed_on = failure_site(policy, &request.value, &rule_ref.nsg);
            break;
        }
    }
    // Then the firewall's rules, all in one write of the firewall.
    let mut mapped = Vec::new();
    if outcome.is_ok()
        && let Some(firewall) = request.value.firewall.clone()
    {
        outcome = put_firewall_rules(env, &request.value, &firewall)?.map(|ports| {
            mapped = ports;
            ArmReceipt::default()
        });
        failed_on = format!(" on firewall {}", firewall.firewall);
    }
    match outcome {
        Ok(_) => {
            retrying(env, request, |request| settle_opened(env, request, &priorities, &mapped, mine))?;
            if request.value.state == State::Active {
                supersede_older_grants(env, request, policy)?;
            }
            Ok(())
        }
        Err(error @ ArmError::Refused { .. }) => retrying(env, request, |request| {
            if request.value.state != State::Approved {
                return settle_foreign(env, request, mine);
            }
            // An earlier attempt may have put the rule before this one was refused (a timeout
            // that succeeded after all, a crash before its record): remove it to be sure. If
            // this invocation had such an attempt, its lease stays until it can no longer land.
            record_attempt(request, &error);
            release(env, &mut request.value, mine);
            abandon(env, request, format!("ARM refused the rule{failed_on}: {error}"))
        }),
        Err(error @ (ArmError::Transient(_) | ArmError::PriorityConflict)) => {
            // The rules confirmed before this failure would be open with no end scheduled
            // while the open is retried: they come off again (the retry puts them back), but
            // only while the request is still opening as read now (a sweep's retry may have
            // activated it meanwhile, with these very rules).
            *request = env.request(request.value.id.as_str())?;
            if request.value.state == State::Approved {
                roll_back(env, &request.value, priorities.len())?;
            }
            retrying(env, request, |request| {
                if request.value.state != State::Approved {
                    // Closing meanwhile: delete now; the lease keeps the close open until this
                    // PUT can no longer land.
                    return settle_foreign(env, request, None);
                }
                let since = request.value.approved_at.unwrap_or(request.value.created_at);
                record_attempt(request, &error);
                // Listed again, should the sweep have dropped it while it was being approved.
                store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
                if env.now - since > OPEN_GRACE.max(request.value.duration.as_delta()) {
                    return abandon(env, request, format!("the rule could not be opened since {since}: {error}"));
                }
                env.save_request(request)
            })
        }
    }
}

/// Where an open failed, for the request's `last_error`: the NSG and the VMs behind it.
fn failure_site(policy: &Policy, request: &AccessRequest, nsg: &NsgId) -> String {
    let vms: Vec<&str> = request
        .vms
        .iter()
        .filter(|vm| policy.vm(vm.as_str()).is_some_and(|p| same_id(p.nsg.as_str(), nsg.as_str())))
        .map(|vm| vm.as_str().rsplit('/').next().unwrap_or_default())
        .collect();
    format!(" on NSG {nsg} (VMs {})", vms.join(", "))
}

/// Deletes the first `count` rules of a request whose open failed part-way, recording each.
/// A failure here is left to the close that follows or to the abandon at the end of the
/// open's grace: the request stays listed for the sweep, and every close deletes every rule.
fn roll_back(env: &Env, request: &AccessRequest, count: usize) -> Result<(), ApiError> {
    const WHY: &str = "the open failed part-way";
    for rule in request.rules.iter().take(count) {
        let outcome = env.arm.delete_rule(&rule.nsg, &rule.name);
        let details = json!({"nsg": rule.nsg.as_str(), "rule": rule.name, "reason": WHY});
        record_arm_write(env, "rule.deleted", subject_of(request), details, &outcome)?;
    }
    // Every NSG took its rule, so the firewall's write is what failed, and it may land yet:
    // its rules are removed too (one that lands after this is removed by the retry's close
    // or the abandon, as the PUT lease keeps the request from closing before).
    if count == request.rules.len()
        && let Some(firewall) = &request.firewall
    {
        let outcome = env.arm.delete_firewall_rules(&firewall.firewall, &firewall.names);
        let details = json!({"firewall": firewall.firewall.as_str(), "rules": firewall.names, "reason": WHY});
        record_arm_write(env, "firewall.rules_deleted", subject_of(request), details, &outcome)?;
    }
    Ok(())
}

/// Puts a grant's DNAT and network rules on its firewall (one write of the whole firewall,
/// recorded), and answers where each VM port is reached, or ARM's failure.
fn put_firewall_rules(
    env: &Env,
    request: &AccessRequest,
    firewall: &FirewallRules,
) -> Result<Result<Vec<MappedPort>, ArmError>, ApiError> {
    let wanted: Vec<FirewallWant> = request
        .firewall_targets()
        .into_iter()
        .map(|(name, private_ip, port)| FirewallWant {
            name,
            protocol: request.protocol,
            source: request.source.to_string(),
            private_ip,
            port,
        })
        .collect();
    let outcome = env.arm.put_firewall_rules(&firewall.firewall, &wanted);
    let written = outcome.as_ref().map(|(receipt, _)| receipt.clone()).map_err(Clone::clone);
    let details = json!({
        "firewall": firewall.firewall.as_str(),
        "rules": firewall.names,
        "source": request.source.to_string(),
    });
    // Confirmed, it goes into the trail with the activation; a failure at once.
    if written.is_ok() {
        defer_arm_write(env, "firewall.rules_put", subject_of(request), details, &written);
    } else {
        record_arm_write(env, "firewall.rules_put", subject_of(request), details, &written)?;
    }
    let granted = match outcome {
        Ok((_, granted)) => granted,
        Err(error) => return Ok(Err(error)),
    };
    Ok(Ok(granted
        .into_iter()
        .map(|g| MappedPort {
            private_ip: g.private_ip,
            port: g.port,
            public_ip: g.public_ip,
            mapped_port: g.mapped_port,
        })
        .collect()))
}

/// Deletes every rule of a request, recording each: all are sent even when one fails (a rule
/// that cannot be deleted must not keep the others open), and the first failure is answered.
/// Confirmed deletes go into the trail with the save that follows (see [`Env::defer`]).
pub(crate) fn delete_rules(
    env: &Env,
    request: &AccessRequest,
    reason: Option<&str>,
) -> Result<Result<(), ArmError>, ApiError> {
    let mut first_failure = Ok(());
    let mut unrecorded = Ok(());
    // The NSG rules first: they are what lets traffic in, and each is one quick write, while
    // a firewall's write waits for the whole resource.
    for rule in &request.rules {
        let outcome = env.arm.delete_rule(&rule.nsg, &rule.name);
        let mut details = json!({"nsg": rule.nsg.as_str(), "rule": rule.name});
        if let Some(reason) = reason {
            details["reason"] = json!(reason);
        }
        match &outcome {
            Ok(_) => defer_arm_write(env, "rule.deleted", subject_of(request), details, &outcome),
            Err(error) => {
                unrecorded =
                    unrecorded.and(record_arm_write(env, "rule.deleted", subject_of(request), details, &outcome));
                if first_failure.is_ok() {
                    first_failure = Err(error.clone());
                }
            }
        }
    }
    if let Some(firewall) = &request.firewall {
        let outcome = match env.arm.delete_firewall_rules(&firewall.firewall, &firewall.names) {
            // A firewall that is gone holds no rule of ours.
            Err(ArmError::Refused { status: 404, .. }) => Ok(ArmReceipt::default()),
            other => other,
        };
        let details = json!({"firewall": firewall.firewall.as_str(), "rules": firewall.names, "reason": reason});
        match &outcome {
            Ok(_) => defer_arm_write(env, "firewall.rules_deleted", subject_of(request), details, &outcome),
            Err(error) => {
                unrecorded = unrecorded.and(record_arm_write(
                    env,
                    "firewall.rules_deleted",
                    subject_of(request),
                    details,
                    &outcome,
                ));
                if first_failure.is_ok() {
                    first_failure = Err(error.clone());
                }
            }
        }
    }
    unrecorded?;
    Ok(first_failure)
}

/// Saves what a PUT that ARM confirmed achieved, on the request as it is now: still approved,
/// it becomes active; already active (another opener), nothing to do; closing or closed
/// meanwhile, the rule just put has no owner and is removed.
fn settle_opened(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    priorities: &[u16],
    mapped: &[MappedPort],
    mine: Option<Lease>,
) -> Result<(), ApiError> {
    if request.value.state != State::Approved {
        return settle_foreign(env, request, mine);
    }
    // The grant runs from when its rule is confirmed, on a fresh clock: the PUT took time.
    let opened_at = env.fresh_now();
    let ends_at = opened_at + request.value.duration.as_delta();
    // The due entry goes first: once it exists, the sweep will close the rule whatever
    // happens to the rest of this call.
    // Its warning before the end rides on the same entry (see `notices`).
    super::sweep::schedule(env, ends_at, &request.value.id)?;
    transition(request, Event::RuleOpened)?;
    request.value.activated_at = Some(opened_at);
    request.value.ends_at = Some(ends_at);
    request.value.arm_attempts = 0;
    request.value.last_error = None;
    release(env, &mut request.value, mine);
    for (rule, &priority) in request.value.rules.iter_mut().zip(priorities) {
        rule.priority = priority;
    }
    if let Some(firewall) = &mut request.value.firewall {
        firewall.mapped = mapped.to_vec();
    }
    let rule = request.value.rules.first().map(|r| r.name.clone());
    let nsgs: Vec<&str> = request.value.rules.iter().map(|r| r.nsg.as_str()).collect();
    env.commit(request, "request.activated", json!({ "ends_at": ends_at, "rule": rule, "nsgs": nsgs }))?;
    store::add_to_list(env.kv, &keys::live(&request.value.policy), request.value.id.as_str(), usize::MAX)?;
    store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
    Ok(())
}

/// After this call's PUT returned, the request turned out to have been changed by someone
/// else. A PUT whose outcome is known releases its lease (`mine`; `None` keeps it), and a
/// close that came meanwhile deletes the rule again, now that it has landed.
fn settle_foreign(env: &Env, request: &mut Versioned<AccessRequest>, mine: Option<Lease>) -> Result<(), ApiError> {
    match request.value.state {
        State::Approved | State::Active | State::Pending => Ok(()),
        State::Revoking { .. } => {
            release(env, &mut request.value, mine);
            finish_close(env, request)
        }
        State::Expired | State::Revoked | State::Denied | State::Cancelled | State::TimedOut | State::Failed => {
            remove_ownerless_rule(env, &request.value)
        }
    }
}

/// Deletes the rule of a request that has already ended (its close became final before a
/// late PUT landed): the rule has no owner and must not stay.
fn remove_ownerless_rule(env: &Env, request: &AccessRequest) -> Result<(), ApiError> {
    let outcome = delete_rules(env, request, Some("no owner: the request ended"))?;
    env.flush()?;
    Ok(outcome?)
}

/// Whether an approved request still fits its policy as it is now (an admin may have changed
/// it since the request was made); the reason when it does not.
pub fn still_allowed(request: &AccessRequest, policy: &Policy) -> Result<(), String> {
    if !policy.enabled {
        return Err(format!("policy '{}' is disabled", policy.name));
    }
    if !policy.requesters.is_empty()
        && !policy.requesters.iter().any(|m| m.covers(&request.requester, &request.requester_groups))
    {
        return Err(format!("'{}' may no longer request access under it", request.requester));
    }
    if let Some(vm) = request.vms.iter().find(|vm| policy.vm(vm.as_str()).is_none()) {
        return Err(format!("VM {vm} is no longer protected by it"));
    }
    if request.vms.is_empty() && policy.vms.len() != 1 {
        return Err("it was made before the policy protected several VMs: ask again, naming the VM".into());
    }
    addresses_still_held(request, policy)?;
    if request.break_glass {
        return match &policy.break_glass {
            Some(glass) if request.duration <= glass.max_duration => Ok(()),
            Some(glass) => Err(format!("break-glass access now lasts at most {}", glass.max_duration)),
            None => Err("the policy no longer allows break-glass access".into()),
        };
    }
    for port in request.ports.iter() {
        let rule = policy.port(port).ok_or_else(|| format!("port {port} is no longer in the policy"))?;
        if request.duration > rule.max_duration {
            return Err(format!("port {port} now allows at most {}", rule.max_duration));
        }
        if rule.protocol != request.protocol {
            return Err(format!("port {port} is now {}", rule.protocol.arm_name()));
        }
        if !rule.allowed_sources.iter().any(|allowed| allowed.admits(&request.source)) {
            return Err(format!("source {} is no longer allowed for port {port}", request.source));
        }
    }
    Ok(())
}

/// Whether every address a request's rules let in to (fixed at approval) is still one of its
/// own VMs' and no other VM's: a VM re-created or moved leaves its old address behind, and
/// another VM may take it.
pub fn addresses_still_held(request: &AccessRequest, policy: &Policy) -> Result<(), String> {
    if request.vms.is_empty() {
        return Ok(());
    }
    for rule in &request.rules {
        for &address in &rule.destinations {
            policy.address_of_one_of(&rule.nsg, address, &request.vms)?;
        }
    }
    Ok(())
}

/// Gives up opening a rule and removes whatever an attempt may have left on the NSG; the
/// request ends `failed` once ARM confirms the rule is gone.
fn abandon(env: &Env, request: &mut Versioned<AccessRequest>, reason: String) -> Result<(), ApiError> {
    transition(request, Event::OpenAbandoned)?;
    request.value.last_error = Some(reason.clone());
    env.commit(request, "request.abandoned", json!({ "reason": reason }))?;
    finish_close(env, request)
}

/// What an event about a rule written to an NSG says of it.
fn rule_details(nsg: &NsgId, rule: &SecurityRule) -> serde_json::Value {
    json!({
        "nsg": nsg.as_str(),
        "rule": rule.name,
        "priority": rule.priority,
        "access": match rule.access { Access::Allow => "allow", Access::Deny => "deny" },
        "protocol": rule.protocol.arm_name(),
        "ports": rule.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "source": rule.source.map_or_else(|| "*".to_owned(), |s| s.to_string()),
        "destinations": rule.destinations.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
    })
}

/// Records an ARM write with its outcome and ARM's request id.
pub(crate) fn record_arm_write(
    env: &Env,
    action: &'static str,
    subject: Subject,
    details: serde_json::Value,
    outcome: &Result<ArmReceipt, ArmError>,
) -> Result<(), ApiError> {
    let (result, details) = arm_write_event(details, outcome);
    env.record(action, subject, result, details).map(drop)
}

/// As [`record_arm_write`], for a write whose outcome the caller saves next: the event goes
/// into the trail with that save's (see [`Env::defer`]).
pub(crate) fn defer_arm_write(
    env: &Env,
    action: &'static str,
    subject: Subject,
    details: serde_json::Value,
    outcome: &Result<ArmReceipt, ArmError>,
) {
    let (result, details) = arm_write_event(details, outcome);
    env.defer(action, subject, result, details);
}

/// The outcome and details of an event about an ARM write.
pub(crate) fn arm_write_event(
    mut details: serde_json::Value,
    outcome: &Result<ArmReceipt, ArmError>,
) -> (Outcome, serde_json::Value) {
    let (result, request_id) = match outcome {
        Ok(receipt) => (Outcome::Ok, receipt.request_id.as_deref()),
        Err(error) => {
            details["error"] = json!(error.to_string());
            (Outcome::Failed, error.request_id())
        }
    };
    details["arm_request_id"] = json!(request_id);
    (result, details)
}

/// Moves an active (or approved) request into `revoking` for `event` and removes its rule.
/// A rule that cannot be removed now stays listed for the sweep, which retries it every tick.
/// A request that another call changed meanwhile is reloaded and closed as it now is.
pub fn close(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    event: Event,
    ending: Option<Ending>,
) -> Result<(), ApiError> {
    retrying(env, request, |request| {
        if request.value.state.is_final() {
            return Ok(());
        }
        // Extended meanwhile (the race of expiry and extend): not due any more.
        if event == Event::Due && request.value.ends_at.is_some_and(|end| end > env.now) {
            return Ok(());
        }
        if !matches!(request.value.state, State::Revoking { .. }) {
            transition(request, event)?;
            let reason = ending.as_ref().and_then(|e| e.reason.clone());
            if ending.is_some() {
                request.value.ended = ending.clone();
            }
            store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
            let action = if event == Event::Due { "request.expiring" } else { "request.revoking" };
            env.commit(request, action, json!({ "reason": reason }))?;
        }
        finish_close(env, request)
    })
}

/// Removes the rule of a request that is already `revoking`: `jit-<id>` is deleted whether
/// or not a PUT was ever confirmed (absent is success). The close becomes final only when no
/// PUT of the rule can still be in flight; until then the request stays `revoking`, listed
/// for the sweep, which deletes again once the lease has run out.
pub fn finish_close(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    let outcome = finish_close_unflushed(env, request);
    flushed(env, outcome)
}

fn finish_close_unflushed(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    retrying(env, request, |request| {
        if !matches!(request.value.state, State::Revoking { .. }) {
            return Ok(());
        }
        // Leases are judged at the time the DELETE is sent: a PUT that lands after that, while
        // its lease was still running, is deleted by a later try.
        let sent_at = env.fresh_now();
        // Every rule (none when it was never approved: no PUT was ever made); a failure
        // leaves the request closing, and the next try deletes them all again.
        let outcome = delete_rules(env, &request.value, None)?;
        match outcome {
            Ok(()) if request.value.put_in_flight(sent_at) => {
                let until = request.value.put_lease_end().unwrap_or(env.now);
                // A reason already there (why an open was abandoned) is worth more.
                request.value.last_error.get_or_insert_with(|| {
                    format!("a PUT of the rule may still be in flight until {until}: the sweep deletes again then")
                });
                store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
                env.save_request(request)
            }
            Ok(()) => {
                transition(request, Event::RuleClosed)?;
                request.value.closed_at = Some(env.now);
                request.value.arm_attempts = 0;
                request.value.put_leases.clear();
                if request.value.state != State::Failed {
                    // A failed request keeps why it failed.
                    request.value.last_error = None;
                }
                let action = match request.value.state {
                    State::Expired => "request.expired",
                    State::Revoked => "request.revoked",
                    _ => "request.failed",
                };
                env.commit(request, action, json!({}))?;
                forget_open(env, &request.value)?;
                store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
                Ok(())
            }
            Err(error) => {
                record_attempt(request, &error);
                store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
                env.save_request(request)
            }
        }
    })
}

/// Drops an ended request from the open, live and pending indexes.
pub fn forget_open(env: &Env, request: &AccessRequest) -> Result<(), ApiError> {
    store::remove_from_list(env.kv, &keys::open_of(&request.policy, &request.requester), request.id.as_str())?;
    store::remove_from_list(env.kv, &keys::live(&request.policy), request.id.as_str())?;
    store::remove_from_list(env.kv, &keys::pending(&request.policy), request.id.as_str())?;
    Ok(())
}

/// One person holds one rule per port: an older active grant of the same requester under the
/// same policy loses the ports the new one covers. Its rule is narrowed to what remains, or
/// removed when nothing does (recorded as "newer request initiated", as Azure does).
fn supersede_older_grants(env: &Env, request: &mut Versioned<AccessRequest>, policy: &Policy) -> Result<(), ApiError> {
    let key = keys::open_of(&request.value.policy, &request.value.requester);
    let newer = request.value.id.as_str().to_owned();
    for id in store::read_list(env.kv, &key)? {
        let Ok(mut older) = env.request(&id) else { continue };
        // A grant is replaced only where the new one covers all its VMs: narrowing its one
        // port set must not take a port from a VM the new grant does not open.
        if older.value.state != State::Active
            || older.value.id == request.value.id
            || !older.value.vms_within(&request.value)
        {
            continue;
        }
        let remaining: Vec<_> =
            older.value.ports.iter().filter(|p| !request.value.ports.iter().any(|n| n == *p)).collect();
        if remaining.len() == older.value.ports.iter().count() {
            continue;
        }
        let ending = Ending { by: "system".into(), at: env.now, reason: Some(format!("{SUPERSEDED}: {newer}")) };
        match PortSet::new(remaining) {
            // Its firewall rules are per port and are not rewritten: it ends whole.
            Ok(ports) if older.value.firewall.is_none() => narrow(env, &mut older, policy, ports)?,
            _ => close(env, &mut older, Event::Revoke, Some(ending))?,
        }
    }
    Ok(())
}

/// Re-PUTs an active grant's rule with fewer ports. If ARM fails, the grant keeps its wider
/// rule until it ends: still closed on time, so nothing is left open forever.
fn narrow(env: &Env, older: &mut Versioned<AccessRequest>, policy: &Policy, ports: PortSet) -> Result<(), ApiError> {
    let names: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    rewrite(env, older, policy, ports, "request.narrowed", json!({ "ports": names, "reason": SUPERSEDED }))
}

/// Puts back the rule of an active grant that went missing from its NSG (the reconciler,
/// with `drift_missing_rule = reput`), for the rest of the grant.
pub fn reput(env: &Env, grant: &mut Versioned<AccessRequest>, policy: &Policy) -> Result<(), ApiError> {
    let ports = grant.value.ports.clone();
    rewrite(
        env,
        grant,
        policy,
        ports,
        "request.rule_restored",
        json!({ "reason": "the rule was missing from the NSG" }),
    )
}

/// Re-PUTs an active grant's rule with `ports`, under a PUT lease like an open, so a close
/// racing the re-PUT still removes the rule once it has landed.
fn rewrite(
    env: &Env,
    grant: &mut Versioned<AccessRequest>,
    policy: &Policy,
    ports: PortSet,
    action: &'static str,
    details: serde_json::Value,
) -> Result<(), ApiError> {
    let Some(ends_at) = grant.value.ends_at else { return Ok(()) };
    if grant.value.rules.is_empty() || grant.value.state != State::Active || grant.value.put_in_flight(env.fresh_now())
    {
        return Ok(());
    }
    let now = env.fresh_now();
    let mine = grant.value.take_put_lease(now, now + PUT_LEASE);
    match env.save_request(grant) {
        Ok(()) => {}
        // It changed meanwhile (extended, revoked, expiring): leave it as it is.
        Err(error) if error.is_concurrent_update() => return Ok(()),
        Err(error) => return Err(error),
    }
    let Some(rules) = allow_rules(&grant.value, policy, &ports, ends_at) else {
        // A grant from before fleets whose policy now has several VMs: its rule stays as it
        // is and still closes on time.
        eprintln!("not rewriting the rules of {}: it names no VM", grant.value.id);
        return Ok(());
    };
    let mut outcome = Ok(ArmReceipt::default());
    for (rule_ref, rule) in grant.value.rules.iter().zip(rules) {
        outcome = env.arm.put_rule(&rule_ref.nsg, &rule);
        record_arm_write(env, "rule.put", subject_of(&grant.value), rule_details(&rule_ref.nsg, &rule), &outcome)?;
        if outcome.is_err() {
            break;
        }
    }
    // Confirmed, the PUT is over; failed, it may still land and the lease runs out by itself.
    let mine = outcome.is_ok().then_some(mine);
    retrying(env, grant, |grant| {
        if grant.value.state != State::Active {
            return settle_foreign(env, grant, mine);
        }
        release(env, &mut grant.value, mine);
        match &outcome {
            Ok(_) => {
                grant.value.ports = ports.clone();
                env.commit(grant, action, details.clone())
            }
            Err(error) => {
                eprintln!("rewriting the rule of {}: {error}", grant.value.id);
                env.save_request(grant)
            }
        }
    })
}

pub(crate) fn record_attempt(request: &mut Versioned<AccessRequest>, error: &ArmError) {
    request.value.arm_attempts += 1;
    request.value.last_error = Some(error.to_string());
}

pub(crate) fn transition(request: &mut Versioned<AccessRequest>, event: Event) -> Result<(), ApiError> {
    request.value.state = request
        .value
        .state
        .apply(event)
        .map_err(|e| ApiError::conflict("invalid_state", format!("request {}: {e}", request.value.id)))?;
    Ok(())
}

/// The allow rules of a request under its policy, one per rule it names. `None` when one of
/// them has no address: only a rule from before fleets can, and then only the one VM of a
/// one-VM policy may stand in (what such a rule always meant); anything else is refused.
fn allow_rules(
    request: &AccessRequest,
    policy: &Policy,
    ports: &PortSet,
    ends_at: DateTime<Utc>,
) -> Option<Vec<SecurityRule>> {
    request
        .rules
        .iter()
        .map(|rule| {
            let destinations = match (rule.destinations.as_slice(), policy.vms.as_slice()) {
                ([], [only]) if same_id(only.nsg.as_str(), rule.nsg.as_str()) => vec![only.private_ip],
                ([], _) => return None,
                (given, _) => given.to_vec(),
            };
            Some(SecurityRule {
                name: rule.name.clone(),
                priority: rule.priority,
                description: format!(
                    "portcullis JIT {} until {} for {}",
                    request.id,
                    ends_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    request.requester
                ),
                access: Access::Allow,
                protocol: request.protocol,
                source: Some(request.source),
                destinations,
                ports: ports.clone(),
            })
        })
        .collect()
}

/// The name of a policy's baseline deny rule.
pub fn baseline_name(policy: &Policy) -> String {
    format!("jit-deny-{}", policy.name)
}

/// Makes sure the policy's baseline deny rules are on its NSGs (one per NSG, covering every
/// VM behind it, created or updated to its ports) and records them on the policy. The first
/// failure stops: the policy is not saved, and the same PUT again finishes the job.
pub fn ensure_baselines(env: &Env, policy: &mut Policy, previous: &[RuleRef]) -> Result<(), ApiError> {
    let mut baselines = Vec::new();
    for nsg in policy.nsgs().into_iter().cloned().collect::<Vec<_>>() {
        let before = previous.iter().find(|p| same_id(p.nsg.as_str(), nsg.as_str()));
        baselines.push(ensure_baseline_on(env, policy, &nsg, before)?);
    }
    policy.baselines = baselines;
    Ok(())
}

/// Puts the policy's baseline deny rule on one NSG, at the priority it had there if any.
pub fn ensure_baseline_on(
    env: &Env,
    policy: &Policy,
    nsg: &NsgId,
    previous: Option<&RuleRef>,
) -> Result<RuleRef, ApiError> {
    let name = baseline_name(policy);
    let priority =
        previous.map_or_else(|| preferred_priority(policy.name.as_str(), env.config.deny_priorities), |p| p.priority);
    let ports = PortSet::new(policy.ports.iter().map(|p| p.port)).map_err(ApiError::internal)?;
    let destinations = policy.destinations_on(nsg);
    let mut rule = SecurityRule {
        name: name.clone(),
        priority,
        description: format!("portcullis JIT baseline of policy {}: closed unless granted", policy.name),
        access: Access::Deny,
        protocol: policy.baseline_protocol(),
        source: None,
        destinations: destinations.clone(),
        ports,
    };
    let outcome = put_in_band(env, nsg, &mut rule, env.config.deny_priorities);
    record_arm_write(env, "rule.put", subject_of_policy(&policy.name), rule_details(nsg, &rule), &outcome)?;
    outcome?;
    Ok(RuleRef { nsg: nsg.clone(), name, priority: rule.priority, destinations })
}

/// Removes a policy's baseline deny rule.
pub fn remove_baseline(env: &Env, policy: &PolicyName, baseline: &RuleRef) -> Result<(), ApiError> {
    let outcome = env.arm.delete_rule(&baseline.nsg, &baseline.name);
    let details = json!({"nsg": baseline.nsg.as_str(), "rule": baseline.name});
    record_arm_write(env, "rule.deleted", subject_of_policy(policy), details, &outcome)?;
    outcome.map(drop).map_err(ApiError::from)
}
