//! Approvers' decisions: `POST /api/requests/{id}/approve` and `/deny`.

use serde::Deserialize;

use super::{Env, request_json, requests};
use crate::api::{ApiError, Reply, parse_json};
use crate::auth::{Caller, Role};
use crate::domain::request::{ApprovalRecord, Ending, approvals_missing, may_approve};
use crate::domain::{AccessRequest, Event, Policy};
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
        Some(t) if t.chars().count() > MAX_NOTE || t.chars().any(char::is_control) => Err(ApiError::bad_request(
            "invalid_note",
            format!("comments and reasons are at most {MAX_NOTE} characters without control characters"),
        )),
        other => Ok(other),
    }
}

/// Loads a pending request and its policy, checking the caller may decide it.
fn decidable(env: &Env, caller: &Caller, id: &str) -> Result<(Versioned<AccessRequest>, Policy), ApiError> {
    if !caller.has(Role::Approver) {
        return Err(ApiError::forbidden("approver_role_required", "deciding requests needs the approver role"));
    }
    let request = env.request(id)?;
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
    Ok((request, policy))
}

/// Records an approval; the last required one opens the rule.
pub fn approve(env: &Env, caller: &Caller, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let body: ApproveBody = parse_json(body, true)?;
    let comment = note(body.comment)?;
    let (mut request, policy) = decidable(env, caller, id)?;
    if request.value.approvals.iter().any(|a| a.by == caller.principal) {
        return Err(ApiError::conflict(
            "already_approved",
            format!("'{}' has already approved this request", caller.principal),
        ));
    }
    request.value.approvals.push(ApprovalRecord { by: caller.principal.clone(), at: env.now, comment });
    if approvals_missing(&request.value, &policy) == 0 {
        requests::approve_and_open(env, &mut request, &policy)?;
    } else {
        env.save_request(&mut request)?;
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
    request.value.ended = Some(Ending { by: caller.principal.to_string(), at: env.now, reason });
    env.save_request(&mut request)?;
    Ok(Reply::ok(request_json(&request.value)))
}
