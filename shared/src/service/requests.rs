//! Access requests: `POST /api/requests`, `GET /api/requests[/{id}]`, `POST .../{id}/cancel`.

use std::net::IpAddr;

use serde_json::json;

use super::grants;
use super::{Env, request_json};
use crate::api::{ApiError, Reply, parse_json};
use crate::auth::{Caller, Role};
use crate::domain::decide::{Decision, decide};
use crate::domain::request::{Ending, RawRequest, approvals_missing, may_approve};
use crate::domain::{AccessRequest, Approval, Event, Policy, PolicyName, RequestError, RequestId, State};
use crate::keys;
use crate::store::{self, Versioned};

/// The most requests one listing returns.
const MAX_LIST: usize = 200;
/// Requests a listing reads per round trip.
const LIST_PAGE: u64 = 100;

/// Maps a refusal from the domain to its HTTP status.
pub fn refusal(error: RequestError) -> ApiError {
    match error {
        RequestError::Malformed { code, message } => ApiError::bad_request(code, message),
        RequestError::Refused { code: code @ ("not_a_requester" | "break_glass_not_allowed"), message } => {
            ApiError::forbidden(code, message)
        }
        RequestError::Refused { code, message } => ApiError::unprocessable(code, message),
    }
}

/// Creates a request. It is approved at once when the policy says so (auto mode, a matching
/// auto-approval rule, or break-glass), and then its rule is opened before answering.
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
    env.prefetch(&name, &caller.principal);
    let policy = env.policy(&name)?.value;
    let mut request = AccessRequest::from_raw(raw, &policy, &caller.principal, &caller.groups, caller_ip, id, env.now)
        .map_err(refusal)?;
    request.requester_name.clone_from(&caller.display_name);
    check_duplicates_and_quotas(env, &request, &policy)?;
    let decision = if request.break_glass {
        Decision::AutoApproved { rule: None }
    } else {
        decide(&request, &policy, &caller.groups, env.now).0
    };
    if let Decision::AutoApproved { rule } = &decision {
        request.auto_rule = rule.clone();
        request.pending_until = None;
    }
    let details = json!({
        "ports": request.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "protocol": request.protocol.arm_name(),
        "source": request.source.to_string(),
        "duration": request.duration.to_string(),
        "justification": request.justification,
        "break_glass": request.break_glass,
        "auto_approved": matches!(decision, Decision::AutoApproved { .. }),
    });
    let subject = super::subject_of(&request);
    // Recorded with the request's creation, in the same append: if that fails, none is.
    let mut before = Vec::new();
    if request.break_glass {
        before.push(("break_glass.used", details.clone()));
    }
    let id = request.id.as_str().to_owned();
    // Whatever must follow the request is in place before it is saved, so a crash right after
    // the save leaves nothing stranded: an approved request is listed for the sweep to open
    // (and is saved approved, in one write), a pending one has its timeout in the due index.
    let auto_approved = matches!(decision, Decision::AutoApproved { .. });
    let mut lease = None;
    if auto_approved {
        lease = Some(approve(env, &mut request, &policy)?);
    } else {
        store::add_to_list(env.kv, &keys::pending(&policy.name), &id, usize::MAX)?;
        if let Some(deadline) = request.pending_until {
            // The sweep times the request out from the same due index that ends grants.
            super::sweep::schedule(env, deadline, &request.id)?;
        }
        super::notices::schedule_for_pending(env, &request)?;
    }
    // The request and its entries in the recent indexes, in one batch: its id is fresh and
    // random, so no one else can have written it.
    // Its events' archive writes join them (see `Env::audited_writes`).
    let writes = vec![
        keys::recent_requests().reserve(env.kv, &id)?,
        keys::requests_by(&caller.principal).reserve(env.kv, &id)?,
        (keys::request(&request.id), store::encode_new(&request)?),
    ];
    if auto_approved {
        before.push(("request.created", details));
        env.audited_writes(before, "request.approved", subject, approval_details(&request), writes)?;
    } else {
        env.audited_writes(before, "request.created", subject, details, writes)?;
    }
    let mut request = Versioned { value: request, version: 1 };
    store::add_to_list(env.kv, &keys::open_of(&policy.name, &caller.principal), &id, usize::MAX)?;
    if request.value.break_glass {
        eprintln!(
            "BREAK-GLASS: {} opened {:?} on {} from {} for {}: {}",
            caller.principal,
            request.value.ports,
            policy.name,
            request.value.source,
            request.value.duration,
            request.value.justification
        );
    }
    if auto_approved {
        grants::open(env, &mut request, Some(&policy), lease)?;
    }
    Ok(Reply::created(request_json(&request.value)))
}

/// Refuses a second pending request for the same ports, and requests beyond the quotas.
/// Grants this request would replace (same person, overlapping ports) do not count.
fn check_duplicates_and_quotas(env: &Env, request: &AccessRequest, policy: &Policy) -> Result<(), ApiError> {
    let mut running = 0;
    let open = store::read_list(env.kv, &keys::open_of(&policy.name, &request.requester))?;
    let _ = env.kv.get_many(
        &open.iter().filter_map(|id| RequestId::parse(id).ok()).map(|id| keys::request(&id)).collect::<Vec<_>>(),
    );
    for id in open {
        let Ok(other) = env.request(&id) else { continue };
        let other = other.value;
        // What the new grant would replace (same VMs, overlapping ports) does not count.
        let replaced = other.ports.iter().any(|p| request.ports.iter().any(|q| q == p)) && other.vms_within(request);
        match other.state {
            State::Pending if other.ports == request.ports && other.shares_vm_with(request) => {
                return Err(ApiError::conflict(
                    "duplicate_request",
                    format!("request {} already asks for these ports and is pending", other.id),
                ));
            }
            State::Active | State::Approved if !replaced => running += 1,
            _ => {}
        }
    }
    if running >= usize::from(policy.quotas.per_requester) {
        return Err(ApiError::unprocessable(
            "quota_exceeded",
            format!(
                "at most {} concurrent grants per requester under policy '{}'",
                policy.quotas.per_requester, policy.name
            ),
        ));
    }
    let live = store::read_list(env.kv, &keys::live(&policy.name))?;
    // A policy of one VM counts its grants; a fleet's, those on one of the request's VMs.
    let on_these_vms = if policy.vms.len() <= 1 {
        live.len()
    } else {
        let ids: Vec<RequestId> = live.iter().filter_map(|id| RequestId::parse(id).ok()).collect();
        let _ = env.kv.get_many(&ids.iter().map(keys::request).collect::<Vec<_>>());
        ids.iter()
            .filter_map(|id| env.request(id.as_str()).ok())
            .filter(|other| other.value.state == State::Active && other.value.shares_vm_with(request))
            .count()
    };
    if on_these_vms >= usize::from(policy.quotas.per_vm) {
        return Err(ApiError::unprocessable(
            "quota_exceeded",
            format!("policy '{}' already has {on_these_vms} concurrent grants on these VMs, its limit", policy.name),
        ));
    }
    Ok(())
}

/// Moves a pending request to approved, naming its rule and taking the PUT lease, so a revoke
/// that comes while the PUT is in flight knows what to delete and waits for the PUT before it
/// is final. The caller saves it.
fn approve(env: &Env, request: &mut AccessRequest, policy: &Policy) -> Result<grants::Lease, ApiError> {
    request.state =
        request.state.apply(Event::Approve).map_err(|e| ApiError::conflict("invalid_state", e.to_string()))?;
    request.approved_at = Some(env.now);
    request.auto_approved = request.approvals.is_empty();
    grants::prepare_open(env, request, policy)
}

/// What the audit trail says of an approval.
fn approval_details(request: &AccessRequest) -> serde_json::Value {
    let approvers: Vec<String> = request.approvals.iter().map(|a| a.by.to_string()).collect();
    json!({
        "auto_approved": request.auto_approved,
        "rule": request.auto_rule,
        "break_glass": request.break_glass,
        "approvers": approvers,
        "state": request.state.name(),
    })
}

/// Approves a pending request and opens its rule (ARM failures stay queued for the sweep).
pub fn approve_and_open(env: &Env, request: &mut Versioned<AccessRequest>, policy: &Policy) -> Result<(), ApiError> {
    let lease = approve(env, &mut request.value, policy)?;
    let details = approval_details(&request.value);
    env.commit(request, "request.approved", details)?;
    store::remove_from_list(env.kv, &keys::pending(&policy.name), request.value.id.as_str())?;
    grants::open(env, request, Some(policy), Some(lease))
}

/// Whether a caller may see a request: its requester, admins, auditors, and the approvers of
/// its policy.
pub fn may_read(env: &Env, caller: &Caller, request: &AccessRequest) -> bool {
    if request.requester == caller.principal || caller.has(Role::Admin) || caller.has(Role::Auditor) {
        return true;
    }
    caller.has(Role::Approver) && env.policy(&request.policy).is_ok_and(|policy| is_approver(&policy.value, caller))
}

/// Whether the caller is listed among a policy's approvers.
pub fn is_approver(policy: &Policy, caller: &Caller) -> bool {
    match &policy.approval {
        Approval::Manual { approvers, .. } => approvers.iter().any(|m| m.covers(&caller.principal, &caller.groups)),
        Approval::Auto => false,
    }
}

/// One request; others' requests read as absent unless the caller may see them.
pub fn get(env: &Env, caller: &Caller, id: &str) -> Result<Reply, ApiError> {
    let request = env.request(id)?;
    if !may_read(env, caller, &request.value) {
        return Err(ApiError::not_found("request_not_found", format!("no request '{id}'")));
    }
    Ok(Reply::ok(request_json(&request.value)))
}

/// What `GET /api/requests` filters on.
pub struct ListFilter<'a> {
    /// Only requests in this state.
    pub state: Option<&'a str>,
    /// Only the caller's own.
    pub mine: bool,
    /// Only pending requests the caller can still approve (`awaiting=me`).
    pub awaiting_me: bool,
}

/// Recent requests, newest first: the caller's own with `mine`, what waits for the caller with
/// `awaiting=me`, else every one they may see.
pub fn list(env: &Env, caller: &Caller, filter: ListFilter) -> Result<Reply, ApiError> {
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
    if let Some(state) = filter.state.filter(|s| !STATES.contains(s)) {
        return Err(ApiError::bad_request(
            "invalid_state_filter",
            format!("unknown state '{state}'; use one of {}", STATES.join(", ")),
        ));
    }
    let sees_others = [Role::Admin, Role::Auditor, Role::Approver].iter().any(|r| caller.has(*r));
    let (ring, legacy) = if filter.mine || !sees_others {
        (keys::requests_by(&caller.principal), keys::legacy_requests_by(&caller.principal))
    } else {
        (keys::recent_requests(), keys::LEGACY_RECENT_REQUESTS.to_owned())
    };
    let mut requests = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Newest first, a page of documents per round trip; then what an earlier version's list
    // document still holds.
    let mut pages = (0..keys::RECENT_CAP.div_ceil(LIST_PAGE))
        .map(|page| ring.newest(env.kv, page * LIST_PAGE, LIST_PAGE))
        .take_while(|page| page.as_ref().map_or(true, |ids| !ids.is_empty()))
        .chain(std::iter::once_with(|| store::read_list(env.kv, &legacy).map(|ids| ids.into_iter().rev().collect())));
    'pages: for page in &mut pages {
        let ids: Vec<RequestId> =
            page?.iter().filter_map(|id| RequestId::parse(id).ok()).filter(|id| seen.insert(id.clone())).collect();
        let docs = env.kv.get_many(&ids.iter().map(keys::request).collect::<Vec<_>>())?;
        for (id, doc) in ids.iter().zip(docs) {
            let Some(bytes) = doc else { continue };
            let request = store::decode::<AccessRequest>(&keys::request(id), &bytes)?;
            let request = request.value;
            let wanted = filter.state.is_none_or(|s| s == request.state.name())
                && (!filter.mine || request.requester == caller.principal)
                && (!filter.awaiting_me || awaits(env, caller, &request))
                && may_read(env, caller, &request);
            if wanted {
                requests.push(request_json(&request));
                if requests.len() == MAX_LIST {
                    break 'pages;
                }
            }
        }
    }
    Ok(Reply::ok(json!({ "requests": requests })))
}

/// Whether a request waits for this caller's approval.
fn awaits(env: &Env, caller: &Caller, request: &AccessRequest) -> bool {
    request.state == State::Pending
        && caller.has(Role::Approver)
        && !request.approvals.iter().any(|a| a.by == caller.principal)
        && env.policy(&request.policy).is_ok_and(|p| {
            may_approve(request, &p.value, &caller.principal, &caller.groups).is_ok()
                && approvals_missing(request, &p.value) > 0
        })
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
    env.commit(&mut request, "request.cancelled", json!({}))?;
    grants::forget_open(env, &request.value)?;
    Ok(Reply::ok(request_json(&request.value)))
}
