//! Opening and closing the NSG rule of a grant: the only code that writes to ARM.
//!
//! Both steps are written so a crash at any point leaves the request where the sweep finds
//! it: the request is listed under `work/arm` before ARM is called and leaves it only once
//! ARM confirmed the outcome. A rule that may exist is never forgotten.

use chrono::TimeDelta;

use super::Env;
use crate::api::ApiError;
use crate::arm::{AllowRule, ArmError};
use crate::domain::request::RuleRef;
use crate::domain::{AccessRequest, Event, Policy, State};
use crate::keys;
use crate::store::{self, Versioned};

/// Priorities tried after a `SecurityRuleConflict` before the attempt is left to the sweep.
const PRIORITY_PROBES: u16 = 16;
/// How long an approved request may keep failing to open before it is abandoned (and any
/// rule that may have been created is removed).
const OPEN_GRACE: TimeDelta = TimeDelta::minutes(15);
/// Cap of the most-recent index lists.
pub(crate) const RECENT_CAP: usize = 1000;

/// Puts the allow rule of an approved request and activates it, or records why not.
pub fn open(env: &Env, request: &mut Versioned<AccessRequest>, policy: Option<&Policy>) -> Result<(), ApiError> {
    debug_assert_eq!(request.value.state, State::Approved);
    store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
    let Some(policy) = policy else {
        return fail(env, request, "the policy was deleted before the rule could be opened".into());
    };
    let band = env.config.priorities;
    let span = band.max - band.min + 1;
    let mut rule_ref = request.value.rule.clone().unwrap_or_else(|| RuleRef {
        nsg: policy.nsg.clone(),
        name: request.value.rule_name(),
        priority: band.min + (stable_hash(request.value.id.as_str()) % u32::from(span)) as u16,
    });
    let mut outcome = Err(ArmError::PriorityConflict);
    for _ in 0..PRIORITY_PROBES {
        let rule = allow_rule(&request.value, policy, &rule_ref, env.now + request.value.duration.as_delta());
        outcome = env.arm.put_rule(&rule_ref.nsg, &rule);
        if outcome != Err(ArmError::PriorityConflict) {
            break;
        }
        rule_ref.priority = band.min + (rule_ref.priority - band.min + 1) % span;
    }
    request.value.rule = Some(rule_ref);
    match outcome {
        Ok(()) => activate(env, request),
        Err(ArmError::Refused { .. }) => fail(env, request, outcome.unwrap_err().to_string()),
        Err(error @ (ArmError::Transient(_) | ArmError::PriorityConflict)) => {
            let since = request.value.approved_at.unwrap_or(request.value.created_at);
            record_attempt(request, &error);
            if env.now - since > OPEN_GRACE.max(request.value.duration.as_delta()) {
                transition(request, Event::OpenAbandoned)?;
                env.save_request(request)?;
                return finish_close(env, request);
            }
            env.save_request(request)
        }
    }
}

/// Moves an active (or approved) request into `revoking` for `event` and removes its rule.
/// A rule that cannot be removed now stays listed for the sweep, which retries it every tick.
pub fn close(env: &Env, request: &mut Versioned<AccessRequest>, event: Event) -> Result<(), ApiError> {
    if !matches!(request.value.state, State::Revoking { .. }) {
        transition(request, event)?;
        store::add_to_list(env.kv, keys::ARM_WORK, request.value.id.as_str(), usize::MAX)?;
        env.save_request(request)?;
    }
    finish_close(env, request)
}

/// Removes the rule of a request that is already `revoking`.
pub fn finish_close(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    let outcome = match &request.value.rule {
        Some(rule) => env.arm.delete_rule(&rule.nsg, &rule.name),
        None => Ok(()),
    };
    match outcome {
        Ok(()) => {
            transition(request, Event::RuleClosed)?;
            request.value.closed_at = Some(env.now);
            request.value.arm_attempts = 0;
            env.save_request(request)?;
            store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
            Ok(())
        }
        Err(error) => {
            record_attempt(request, &error);
            env.save_request(request)
        }
    }
}

fn activate(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    let ends_at = env.now + request.value.duration.as_delta();
    // The due entry goes first: once it exists, the sweep will close the rule whatever
    // happens to the rest of this call.
    store::add_to_list(env.kv, &keys::due(ends_at), request.value.id.as_str(), usize::MAX)?;
    if store::load::<chrono::DateTime<chrono::Utc>>(env.kv, keys::SWEEP_CURSOR)?.is_none() {
        let start = super::sweep::minute_floor(env.now) - TimeDelta::minutes(1);
        // Losing this race to another activation is fine: either cursor is early enough.
        match store::save(env.kv, keys::SWEEP_CURSOR, &start, None) {
            Ok(_) | Err(store::StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    transition(request, Event::RuleOpened)?;
    request.value.activated_at = Some(env.now);
    request.value.ends_at = Some(ends_at);
    request.value.arm_attempts = 0;
    request.value.last_error = None;
    env.save_request(request)?;
    store::remove_from_list(env.kv, keys::ARM_WORK, request.value.id.as_str())?;
    Ok(())
}

fn fail(env: &Env, request: &mut Versioned<AccessRequest>, reason: String) -> Result<(), ApiError> {
    transition(request, Event::OpenRefused)?;
    request.value.last_error = Some(reason);
    request.value.closed_at = Some(env.now);
    env.save_request(request)?;
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
pub fn allow_rule(
    request: &AccessRequest,
    policy: &Policy,
    rule: &RuleRef,
    ends_at: chrono::DateTime<chrono::Utc>,
) -> AllowRule {
    AllowRule {
        name: rule.name.clone(),
        priority: rule.priority,
        description: format!(
            "portcullis JIT {} until {} for {}",
            request.id,
            ends_at.format("%Y-%m-%dT%H:%M:%SZ"),
            request.requester
        ),
        protocol: request.protocol,
        source: request.source,
        destination: policy.private_ip,
        ports: request.ports.clone(),
    }
}

/// FNV-1a: a stable spread of request ids over the priority band.
fn stable_hash(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193))
}
