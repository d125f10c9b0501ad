//! Decisions on requests: `POST /api/requests/{id}/approve` and `/deny` (approvers), and on
//! running grants: `/revoke` and `/extend` (the requester, approvers, admins).

use serde::Deserialize;
use serde_json::json;

use super::{Env, grants, request_json, requests};
use crate::api::{ApiError, Reply, parse_json};
use crate::auth::{Caller, Role};
use crate::domain::policy::Extensions;
use crate::domain::request::{ApprovalRecord, Ending, Extension, approvals_missing, may_approve};
use crate::domain::{AccessDuration, AccessRequest, Event, Policy, State};
use crate::store::Versioned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenyBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Longest comment or reason kept.
const MAX_NOTE: usize = 500;

fn note(text: Option<String>) -> Result<Option<String>, ApiError> {
    match text.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()) {
        Some(t) if t.chars().count() > MAX_NOTE || t.chars().any(crate::domain::is_invisible) => {
            Err(ApiError::bad_request(
                "invalid_note",
                format!(
                    "comments and reasons are at most {MAX_NOTE} characters without control, zero-width or bidirectional-override characters"
                ),
            ))
        }
        other => Ok(other),
    }
}

/// Loads a pending request and its policy, checking the caller may decide it.
fn decidable(env: &Env, caller: &Caller, id: &str) -> Result<(Versioned<AccessRequest>, Policy), ApiError> {
    if !caller.has(Role::Approver) {
        return Err(ApiError::forbidden("approver_role_required", "deciding requests needs the approver role"));
    }
    let request = env.request_to_change(id)?;
    let policy = env.policy(&request.value.policy)?.value;
    may_approve(&request.value, &policy, &caller.principal, &caller.groups).map_err(|why| {
        let code = if request.value.requester == caller.principal { "self_approval" } else { "not_an_approver" };
        ApiError::forbidden(code, why)
    })?;
    if request.value.state.apply(Event::Approve).is_err() {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("request is {}; only pending requests can be decided", request.value.state.name()),
        ));
    }
    if request.value.pending_until.is_some_and(|deadline| deadline <= env.now) {
        return Err(ApiError::conflict(
            "request_timed_out",
            "the request waited longer than the policy's pending_timeout; it can no longer be decided",
        ));
    }
    Ok((request, policy))
}

/// Records an approval; the last required one opens the rule.
pub fn approve(env: &Env, caller: &Caller, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: ApproveBody = parse_json(body, true)?;
    let comment = note(body.comment)?;
    let (mut request, policy) = decidable(env, caller, id)?;
    // The policy as it is now, not as it was when the request was made.
    grants::still_allowed(&request.value, &policy).map_err(|why| {
        ApiError::conflict("policy_changed", format!("the policy no longer allows this request: {why}"))
    })?;
    if request.value.approvals.iter().any(|a| a.by == caller.principal) {
        return Err(ApiError::conflict(
            "already_approved",
            format!("'{}' has already approved this request", caller.principal),
        ));
    }
    request.value.approvals.push(ApprovalRecord {
        by: caller.principal.clone(),
        at: env.now,
        comment: comment.clone(),
    });
    let missing = approvals_missing(&request.value, &policy);
    if missing == 0 {
        requests::approve_and_open(env, &mut request, &policy)?;
    } else {
        env.commit(
            &mut request,
            "request.approval_added",
            json!({ "comment": comment, "approvals_missing": missing }),
        )?;
    }
    Ok(Reply::ok(request_json(&request.value)))
}

/// Refuses a pending request.
pub fn deny(env: &Env, caller: &Caller, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: DenyBody = parse_json(body, true)?;
    let reason = note(body.reason)?;
    let (mut request, _) = decidable(env, caller, id)?;
    request.value.state =
        request.value.state.apply(Event::Deny).map_err(|e| ApiError::conflict("invalid_state", e.to_string()))?;
    request.value.ended = Some(Ending { by: caller.principal.to_string(), at: env.now, reason: reason.clone() });
    env.commit(&mut request, "request.denied", json!({ "reason": reason }))?;
    grants::forget_open(env, &request.value)?;
    Ok(Reply::ok(request_json(&request.value)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    duration: String,
}

/// Who is acting on a running grant.
enum Actor {
    Requester,
    Approver,
    Admin,
}

/// The caller's standing towards a request; others' requests read as absent.
fn actor(env: &Env, caller: &Caller, request: &AccessRequest) -> Result<Actor, ApiError> {
    let policy = env.policy(&request.policy).ok().map(|p| p.value);
    // Requester first: an admin or approver acting on their own grant acts as its requester.
    if request.requester == caller.principal {
        Ok(Actor::Requester)
    } else if caller.has(Role::Admin) {
        Ok(Actor::Admin)
    } else if caller.has(Role::Approver) && policy.as_ref().is_some_and(|p| requests::is_approver(p, caller)) {
        Ok(Actor::Approver)
    } else {
        Err(ApiError::not_found("request_not_found", format!("no request '{}'", request.id)))
    }
}

/// Ends a running (or approved) grant now: the rule is removed before answering.
pub fn revoke(env: &Env, caller: &Caller, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: DenyBody = parse_json(body, true)?;
    let reason = note(body.reason)?;
    let mut request = env.request_to_change(id)?;
    actor(env, caller, &request.value)?;
    if !matches!(request.value.state, State::Active | State::Approved) {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("request is {}; only active grants can be revoked", request.value.state.name()),
        ));
    }
    let ending = Ending { by: caller.principal.to_string(), at: env.now, reason };
    grants::close(env, &mut request, Event::Revoke, Some(ending))?;
    Ok(Reply::ok(request_json(&request.value)))
}

/// Extends a running grant within the policy's maximum, measured from when it opened.
pub fn extend(env: &Env, caller: &Caller, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: ExtendBody = parse_json(body, false)?;
    let by =
        AccessDuration::parse(&body.duration).map_err(|e| ApiError::bad_request("invalid_duration", e.to_string()))?;
    let mut request = env.request_to_change(id)?;
    let actor = actor(env, caller, &request.value)?;
    let policy = env.policy(&request.value.policy)?.value;
    if matches!(actor, Actor::Requester) && policy.extensions == Extensions::Approval {
        return Err(ApiError::forbidden(
            "extension_needs_approval",
            "this policy has extensions approved: ask an approver to extend the grant",
        ));
    }
    let (State::Active, Some(started), Some(ends_at)) =
        (request.value.state, request.value.activated_at, request.value.ends_at)
    else {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("request is {}; only active grants can be extended", request.value.state.name()),
        ));
    };
    if matches!(actor, Actor::Requester) {
        // A requester who may no longer ask under this policy may not stretch what they hold.
        let eligible = policy.enabled
            && (policy.requesters.is_empty()
                || policy.requesters.iter().any(|m| m.covers(&caller.principal, &caller.groups)))
            && (!request.value.break_glass
                || policy
                    .break_glass
                    .as_ref()
                    .is_some_and(|g| g.members.iter().any(|m| m.covers(&caller.principal, &caller.groups))));
        if !eligible {
            return Err(ApiError::forbidden(
                "not_a_requester",
                format!("'{}' may no longer request access under policy '{}'", caller.principal, policy.name),
            ));
        }
    }
    grants::still_allowed(&request.value, &policy).map_err(|why| {
        ApiError::conflict("policy_changed", format!("the policy no longer allows this grant: {why}"))
    })?;
    // The smallest of every limit that applies: each port's, break-glass's, the service's.
    let port_limits = request.value.ports.iter().filter_map(|p| policy.port(p).map(|rule| rule.max_duration));
    let glass_limit = request.value.break_glass.then(|| policy.break_glass.as_ref().map(|g| g.max_duration)).flatten();
    let maximum = port_limits
        .chain(glass_limit)
        .chain(std::iter::once(env.config.limits.max_duration))
        .min()
        .expect("the service's maximum is always there");
    let new_end = ends_at + by.as_delta();
    let total = new_end - started;
    if total > maximum.as_delta() {
        let total_minutes = total.num_minutes();
        return Err(ApiError::unprocessable(
            "extension_too_long",
            format!(
                "the grant would last {total_minutes} minutes in all; the policy allows {maximum} from when it opened"
            ),
        ));
    }
    super::sweep::schedule(env, new_end, &request.value.id)?;
    request.value.ends_at = Some(new_end);
    request.value.extensions.push(Extension { by: caller.principal.clone(), at: env.now, by_duration: by });
    env.commit(&mut request, "request.extended", json!({ "by": by.to_string(), "ends_at": new_end }))?;
    Ok(Reply::ok(request_json(&request.value)))
}
