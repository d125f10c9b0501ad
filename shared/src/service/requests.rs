//! Access requests: `POST /api/requests`, `GET /api/requests[/{id}]`, `POST .../{id}/cancel`.

use std::net::IpAddr;

use serde_json::json;

use super::grants::{self, RECENT_CAP};
use super::{Env, request_json};
use crate::api::{ApiError, Reply, parse_json};
use crate::auth::{Caller, Role};
use crate::domain::request::{Ending, RawRequest};
use crate::domain::{AccessRequest, Approval, Event, Policy, PolicyName, RequestError, RequestId};
use crate::keys;
use crate::store::{self, Versioned};

/// The most requests one listing returns.
const MAX_LIST: usize = 200;

/// Creates a request; under an auto-approving policy, opens the rule before answering.
pub fn create(
    env: &Env,
    caller: &Caller,
    caller_ip: Option<IpAddr>,
    id: RequestId,
    body: &[u8],
) -> Result<Reply, ApiError> {
    if !caller.has(Role::Requester) {
        return Err(ApiError::forbidden("requester_role_required", "asking for access needs the requester role"));
    }
    let raw: RawRequest = parse_json(body, false)?;
    let name =
        PolicyName::parse(&raw.policy).map_err(|e| ApiError::bad_request("invalid_policy_name", e.to_string()))?;
    let policy = env.policy(&name)?.value;
    let request = AccessRequest::from_raw(raw, &policy, &caller.principal, &caller.groups, caller_ip, id, env.now)
        .map_err(|e| match e {
            RequestError::Malformed { code, message } => ApiError::bad_request(code, message),
            RequestError::Refused { code: code @ "not_a_requester", message } => ApiError::forbidden(code, message),
            RequestError::Refused { code, message } => ApiError::unprocessable(code, message),
        })?;
    let key = keys::request(&request.id);
    let version = store::save(env.kv, &key, &request, None)?;
    let mut request = Versioned { value: request, version };
    store::add_to_list(env.kv, keys::RECENT_REQUESTS, request.value.id.as_str(), RECENT_CAP)?;
    store::add_to_list(env.kv, &keys::requests_by(&caller.principal), request.value.id.as_str(), RECENT_CAP)?;
    if policy.approval == Approval::Auto {
        approve_and_open(env, &mut request, &policy)?;
    }
    Ok(Reply::created(request_json(&request.value)))
}

/// Approves a pending request and opens its rule (ARM failures stay queued for the sweep).
pub fn approve_and_open(env: &Env, request: &mut Versioned<AccessRequest>, policy: &Policy) -> Result<(), ApiError> {
    request.value.state =
        request.value.state.apply(Event::Approve).map_err(|e| ApiError::conflict("invalid_state", e.to_string()))?;
    request.value.approved_at = Some(env.now);
    request.value.auto_approved = policy.approval == Approval::Auto;
    env.save_request(request)?;
    grants::open(env, request, Some(policy))
}

/// Whether a caller may see a request: its requester, admins, auditors, and the approvers of
/// its policy.
fn may_read(env: &Env, caller: &Caller, request: &AccessRequest) -> bool {
    if request.requester == caller.principal || caller.has(Role::Admin) || caller.has(Role::Auditor) {
        return true;
    }
    caller.has(Role::Approver)
        && env.policy(&request.policy).is_ok_and(|policy| match &policy.value.approval {
            Approval::Manual { approvers, .. } => approvers.iter().any(|m| m.covers(&caller.principal, &caller.groups)),
            Approval::Auto => false,
        })
}

/// One request; others' requests read as absent unless the caller may see them.
pub fn get(env: &Env, caller: &Caller, id: &str) -> Result<Reply, ApiError> {
    let request = env.request(id)?;
    if !may_read(env, caller, &request.value) {
        return Err(ApiError::not_found("request_not_found", format!("no request '{id}'")));
    }
    Ok(Reply::ok(request_json(&request.value)))
}

/// Recent requests, newest first: the caller's own with `mine`, else every one they may see.
pub fn list(env: &Env, caller: &Caller, state: Option<&str>, mine: bool) -> Result<Reply, ApiError> {
    const STATES: [&str; 10] = [
        "pending",
        "approved",
        "active",
        "revoking",
        "expired",
        "revoked",
        "denied",
        "cancelled",
        "timed_out",
        "failed",
    ];
    if let Some(state) = state.filter(|s| !STATES.contains(s)) {
        return Err(ApiError::bad_request(
            "invalid_state_filter",
            format!("unknown state '{state}'; use one of {}", STATES.join(", ")),
        ));
    }
    let sees_others = [Role::Admin, Role::Auditor, Role::Approver].iter().any(|r| caller.has(*r));
    let index =
        if mine || !sees_others { keys::requests_by(&caller.principal) } else { keys::RECENT_REQUESTS.to_owned() };
    let mut requests = Vec::new();
    for id in store::read_list(env.kv, &index)?.iter().rev() {
        let Ok(id) = RequestId::parse(id) else { continue };
        let Some(request) = store::load::<AccessRequest>(env.kv, &keys::request(&id))? else { continue };
        let request = request.value;
        if state.is_some_and(|s| s != request.state.name())
            || (mine && request.requester != caller.principal)
            || !may_read(env, caller, &request)
        {
            continue;
        }
        requests.push(request_json(&request));
        if requests.len() == MAX_LIST {
            break;
        }
    }
    Ok(Reply::ok(json!({ "requests": requests })))
}

/// The requester (or an admin) withdraws a pending request.
pub fn cancel(env: &Env, caller: &Caller, id: &str) -> Result<Reply, ApiError> {
    let mut request = env.request(id)?;
    if request.value.requester != caller.principal && !caller.has(Role::Admin) {
        return Err(if may_read(env, caller, &request.value) {
            ApiError::forbidden("not_your_request", "only the requester or an admin can cancel a request")
        } else {
            ApiError::not_found("request_not_found", format!("no request '{id}'"))
        });
    }
    request.value.state = request.value.state.apply(Event::Cancel).map_err(|_| {
        ApiError::conflict(
            "invalid_state",
            format!("request is {}; only pending requests can be cancelled", request.value.state.name()),
        )
    })?;
    request.value.ended = Some(Ending { by: caller.principal.to_string(), at: env.now, reason: None });
    env.save_request(&mut request)?;
    Ok(Reply::ok(request_json(&request.value)))
}
