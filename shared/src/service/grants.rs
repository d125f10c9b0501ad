//! Opening and closing NSG rules: the only code that writes to ARM.
//!
//! Both steps are written so a crash at any point leaves the request where the sweep finds
//! it: the request is listed under `work:arm` before ARM is called and leaves it only once
//! ARM confirmed the outcome. A rule that may exist is never forgotten.
//!
//! Every ARM write is audited with its outcome and ARM's request id before the state that
//! depends on it is saved: if that record fails, the request stays where the sweep retries
//! the (idempotent) write and records it then.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

use super::{Env, subject_of, subject_of_policy};
use crate::api::ApiError;
use crate::arm::{Access, ArmError, ArmReceipt, SecurityRule};
use crate::audit::{Outcome, Subject};
use crate::config::PriorityBand;
use crate::domain::request::{Ending, RuleRef};
use crate::domain::{AccessRequest, Event, NsgId, Policy, PolicyName, PortSet, State};
use crate::keys;
use crate::store::{self, Versioned};

/// Conflicts tolerated in one placement: each one re-reads the NSG, so more than a few means
/// another writer is racing us and the sweep should try later.
const CONFLICT_RETRIES: usize = 3;
/// How long an approved request may keep failing to open before it is abandoned (and any
/// rule that may have been created is removed).
const OPEN_GRACE: TimeDelta = TimeDelta::minutes(15);
/// Cap of the most-recent index lists.
pub(crate) const RECENT_CAP: usize = 1000;
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

/// Puts the allow rule of an approved request and activates it, or records why not.
pub fn open(env: &Env, request: &mut Versioned<AccessRequest>, policy: Option<&Policy>) -> Result<(), ApiError> {
    debug_assert_eq!(request.value.state, State::Approved);
    store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
    let Some(policy) = policy else {
        return fail(env, request, "the policy was deleted before the rule could be opened".into());
    };
    let ends_at = env.now + request.value.duration.as_delta();
    let rule_ref = request.value.rule.clone().unwrap_or_else(|| RuleRef {
        nsg: policy.nsg.clone(),
        name: request.value.rule_name(),
        priority: preferred_priority(request.value.id.as_str(), env.config.priorities),
    });
    let mut rule = allow_rule(&request.value, policy, &rule_ref, &request.value.ports, ends_at);
    let outcome = put_in_band(env, &rule_ref.nsg, &mut rule, env.config.priorities);
    record_arm_write(env, "rule.put", subject_of(&request.value), rule_details(&rule_ref.nsg, &rule), &outcome)?;
    request.value.rule = Some(RuleRef { priority: rule.priority, ..rule_ref });
    match outcome {
        Ok(_) => {
            activate(env, request, ends_at)?;
            supersede_older_grants(env, request, policy)
        }
        Err(error @ ArmError::Refused { .. }) => {
            // An earlier attempt may have put the rule before this one was refused (a timeout
            // that succeeded after all, a crash before its record): remove it to be sure.
            record_attempt(request, &error);
            abandon(env, request, format!("ARM refused the rule: {error}"))
        }
        Err(error @ (ArmError::Transient(_) | ArmError::PriorityConflict)) => {
            let since = request.value.approved_at.unwrap_or(request.value.created_at);
            record_attempt(request, &error);
            if env.now - since > OPEN_GRACE.max(request.value.duration.as_delta()) {
                return abandon(env, request, format!("the rule could not be opened since {since}: {error}"));
            }
            env.save_request(request)
        }
    }
}

/// Gives up opening a rule and removes whatever an attempt may have left on the NSG; the
/// request ends `failed` once ARM confirms the rule is gone.
fn abandon(env: &Env, request: &mut Versioned<AccessRequest>, reason: String) -> Result<(), ApiError> {
    transition(request, Event::OpenAbandoned)?;
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
    })
}

/// Records an ARM write with its outcome and ARM's request id.
fn record_arm_write(
    env: &Env,
    action: &'static str,
    subject: Subject,
    mut details: serde_json::Value,
    outcome: &Result<ArmReceipt, ArmError>,
) -> Result<(), ApiError> {
    let (result, request_id) = match outcome {
        Ok(receipt) => (Outcome::Ok, receipt.request_id.as_deref()),
        Err(error) => {
            details["error"] = json!(error.to_string());
            (Outcome::Failed, error.request_id())
        }
    };
    details["arm_request_id"] = json!(request_id);
    env.record(action, subject, result, details).map(drop)
}

/// Moves an active (or approved) request into `revoking` for `event` and removes its rule.
/// A rule that cannot be removed now stays listed for the sweep, which retries it every tick.
pub fn close(
    env: &Env,
    request: &mut Versioned<AccessRequest>,
    event: Event,
    ending: Option<Ending>,
) -> Result<(), ApiError> {
    if !matches!(request.value.state, State::Revoking { .. }) {
        transition(request, event)?;
        let reason = ending.as_ref().and_then(|e| e.reason.clone());
        if ending.is_some() {
            request.value.ended = ending;
        }
        store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
        let action = if event == Event::Due { "request.expiring" } else { "request.revoking" };
        env.commit(request, action, json!({ "reason": reason }))?;
    }
    finish_close(env, request)
}

/// Removes the rule of a request that is already `revoking`.
pub fn finish_close(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    let outcome = match &request.value.rule {
        Some(rule) => {
            let outcome = env.arm.delete_rule(&rule.nsg, &rule.name);
            let details = json!({"nsg": rule.nsg.as_str(), "rule": rule.name});
            record_arm_write(env, "rule.deleted", subject_of(&request.value), details, &outcome)?;
            outcome.map(drop)
        }
        None => Ok(()),
    };
    match outcome {
        Ok(()) => {
            transition(request, Event::RuleClosed)?;
            request.value.closed_at = Some(env.now);
            request.value.arm_attempts = 0;
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
            env.save_request(request)
        }
    }
}

fn activate(env: &Env, request: &mut Versioned<AccessRequest>, ends_at: DateTime<Utc>) -> Result<(), ApiError> {
    // The due entry goes first: once it exists, the sweep will close the rule whatever
    // happens to the rest of this call.
    super::sweep::schedule(env, ends_at, &request.value.id)?;
    transition(request, Event::RuleOpened)?;
    request.value.activated_at = Some(env.now);
    request.value.ends_at = Some(ends_at);
    request.value.arm_attempts = 0;
    request.value.last_error = None;
    let rule = request.value.rule.as_ref().map(|r| r.name.clone());
    env.commit(request, "request.activated", json!({ "ends_at": ends_at, "rule": rule }))?;
    store::add_to_list(env.kv, &keys::live(&request.value.policy), request.value.id.as_str(), usize::MAX)?;
    store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
    Ok(())
}

/// Drops an ended request from the open and live indexes.
pub fn forget_open(env: &Env, request: &AccessRequest) -> Result<(), ApiError> {
    store::remove_from_list(env.kv, &keys::open_of(&request.policy, &request.requester), request.id.as_str())?;
    store::remove_from_list(env.kv, &keys::live(&request.policy), request.id.as_str())?;
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
        if older.value.state != State::Active || older.value.id == request.value.id {
            continue;
        }
        let remaining: Vec<_> =
            older.value.ports.iter().filter(|p| !request.value.ports.iter().any(|n| n == *p)).collect();
        if remaining.len() == older.value.ports.iter().count() {
            continue;
        }
        let ending = Ending { by: "system".into(), at: env.now, reason: Some(format!("{SUPERSEDED}: {newer}")) };
        match PortSet::new(remaining) {
            Err(_) => close(env, &mut older, Event::Revoke, Some(ending))?,
            Ok(ports) => narrow(env, &mut older, policy, ports)?,
        }
    }
    Ok(())
}

/// Re-PUTs an active grant's rule with fewer ports. If ARM fails, the grant keeps its wider
/// rule until it ends: still closed on time, so nothing is left open forever.
fn narrow(env: &Env, older: &mut Versioned<AccessRequest>, policy: &Policy, ports: PortSet) -> Result<(), ApiError> {
    let (Some(rule_ref), Some(ends_at)) = (older.value.rule.clone(), older.value.ends_at) else { return Ok(()) };
    let rule = allow_rule(&older.value, policy, &rule_ref, &ports, ends_at);
    let outcome = env.arm.put_rule(&rule_ref.nsg, &rule);
    record_arm_write(env, "rule.put", subject_of(&older.value), rule_details(&rule_ref.nsg, &rule), &outcome)?;
    match outcome {
        Ok(_) => {
            older.value.ports = ports;
            let ports: Vec<String> = older.value.ports.iter().map(|p| p.to_string()).collect();
            env.commit(older, "request.narrowed", json!({ "ports": ports, "reason": SUPERSEDED }))
        }
        Err(error) => {
            eprintln!("narrowing {} after a newer request: {error}", older.value.id);
            Ok(())
        }
    }
}

fn fail(env: &Env, request: &mut Versioned<AccessRequest>, reason: String) -> Result<(), ApiError> {
    transition(request, Event::OpenRefused)?;
    request.value.last_error = Some(reason.clone());
    request.value.closed_at = Some(env.now);
    env.commit(request, "request.failed", json!({ "reason": reason }))?;
    forget_open(env, &request.value)?;
    store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
    Ok(())
}

fn record_attempt(request: &mut Versioned<AccessRequest>, error: &ArmError) {
    request.value.arm_attempts += 1;
    request.value.last_error = Some(error.to_string());
}

fn transition(request: &mut Versioned<AccessRequest>, event: Event) -> Result<(), ApiError> {
    request.value.state = request
        .value
        .state
        .apply(event)
        .map_err(|e| ApiError::conflict("invalid_state", format!("request {}: {e}", request.value.id)))?;
    Ok(())
}

/// The allow rule for a request under its policy.
fn allow_rule(
    request: &AccessRequest,
    policy: &Policy,
    rule: &RuleRef,
    ports: &PortSet,
    ends_at: DateTime<Utc>,
) -> SecurityRule {
    SecurityRule {
        name: rule.name.clone(),
        priority: rule.priority,
        description: format!(
            "portcullis JIT {} until {} for {}",
            request.id,
            ends_at.format("%Y-%m-%dT%H:%M:%SZ"),
            request.requester
        ),
        access: Access::Allow,
        protocol: request.protocol,
        source: Some(request.source),
        destination: policy.private_ip,
        ports: ports.clone(),
    }
}

/// The name of a policy's baseline deny rule.
pub fn baseline_name(policy: &Policy) -> String {
    format!("jit-deny-{}", policy.name)
}

/// Makes sure the policy's baseline deny rule is on its NSG (created or updated to its ports)
/// and records it on the policy.
pub fn ensure_baseline(env: &Env, policy: &mut Policy, previous: Option<&RuleRef>) -> Result<(), ApiError> {
    let name = baseline_name(policy);
    let priority = previous
        .filter(|p| p.nsg == policy.nsg)
        .map_or_else(|| preferred_priority(policy.name.as_str(), env.config.deny_priorities), |p| p.priority);
    let ports = PortSet::new(policy.ports.iter().map(|p| p.port)).map_err(ApiError::internal)?;
    let mut rule = SecurityRule {
        name: name.clone(),
        priority,
        description: format!("portcullis JIT baseline of policy {}: closed unless granted", policy.name),
        access: Access::Deny,
        protocol: policy.baseline_protocol(),
        source: None,
        destination: policy.private_ip,
        ports,
    };
    let outcome = put_in_band(env, &policy.nsg, &mut rule, env.config.deny_priorities);
    record_arm_write(env, "rule.put", subject_of_policy(&policy.name), rule_details(&policy.nsg, &rule), &outcome)?;
    outcome?;
    policy.baseline = Some(RuleRef { nsg: policy.nsg.clone(), name, priority: rule.priority });
    Ok(())
}

/// Removes a policy's baseline deny rule.
pub fn remove_baseline(env: &Env, policy: &PolicyName, baseline: &RuleRef) -> Result<(), ApiError> {
    let outcome = env.arm.delete_rule(&baseline.nsg, &baseline.name);
    let details = json!({"nsg": baseline.nsg.as_str(), "rule": baseline.name});
    record_arm_write(env, "rule.deleted", subject_of_policy(policy), details, &outcome)?;
    outcome.map(drop).map_err(ApiError::from)
}
