//! Policy administration: `PUT/GET/DELETE /api/policies/{name}`, `GET /api/policies`.
//!
//! Enabling a policy resolves its VM through ARM (unless the admin named the NSG and IP) and
//! puts its baseline deny rule, so the ports are closed by default. Disabling or deleting it
//! removes that rule; running grants keep their time unless `?revoke=true` ends them now.

use serde_json::json;

use super::sweep::Budgeted;
use super::{Env, grants, subject_of_policy};
use crate::api::{ApiError, Reply, parse_json};
use crate::arm::{ArmError, inventory};
use crate::audit::Outcome;
use crate::auth::{Caller, Role};
use crate::domain::policy::{Fleet, MAX_POLICY_VMS, PolicyError, ProtectedVm, RawPolicy, Unprotected, Wanted};
use crate::domain::request::Ending;
use crate::domain::{AccessRequest, Event, FirewallId, Policy, PolicyName, RequestId, State, VmId};
use crate::keys;
use crate::store;

impl From<PolicyError> for ApiError {
    fn from(error: PolicyError) -> Self {
        ApiError::unprocessable("invalid_policy", error.to_string())
    }
}

fn require_admin(caller: &Caller) -> Result<(), ApiError> {
    if caller.has(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden("admin_required", "only admins manage policies"))
    }
}

fn require_reader(caller: &Caller) -> Result<(), ApiError> {
    if [Role::Admin, Role::Requester, Role::Approver, Role::Auditor].iter().any(|r| caller.has(*r)) {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "role_required",
            "reading policies needs the admin, requester, approver or auditor role",
        ))
    }
}

fn parse_name(name: &str) -> Result<PolicyName, ApiError> {
    PolicyName::parse(name).map_err(|e| ApiError::bad_request("invalid_policy_name", e.to_string()))
}

/// Pages of a selector's VM listing one policy PUT reads.
const MAX_LIST_PAGES: usize = 20;

/// Where the VMs' rules go, asked of ARM: listed VMs must each be protectable (else the
/// policy is refused, naming the VM); a selector's VMs that are not are kept aside with why.
fn resolve(env: &Env, wanted: Wanted) -> Result<Fleet, ApiError> {
    let mut fleet = Fleet { resolved_at: Some(env.now), ..Fleet::default() };
    match wanted {
        Wanted::Vms(vms) => {
            for vm in vms {
                fleet.vms.push(resolve_one(env, &vm)?);
            }
        }
        Wanted::Selected(selector) => {
            let listing = inventory::list(env.arm, &selector, None, MAX_LIST_PAGES).map_err(|error| match error {
                ArmError::Refused { status, code, message, .. } => ApiError::unprocessable(
                    "vms_not_listed",
                    format!("ARM refused to list the VMs of {} ({status} {code}): {message}", selector.scope),
                ),
                other => ApiError::from(other),
            })?;
            if listing.resume.is_some() || listing.vms.len() > MAX_POLICY_VMS {
                return Err(ApiError::unprocessable(
                    "too_many_vms",
                    format!(
                        "{} holds more than {MAX_POLICY_VMS} VMs: narrow the selector (a resource group or a tag) or split the policy",
                        selector.scope
                    ),
                ));
            }
            for vm in listing.vms {
                match resolve_one(env, &vm) {
                    Ok(protected) => fleet.vms.push(protected),
                    Err(error) if error.status == 422 => {
                        fleet.unprotected.push(Unprotected { vm: vm.to_string(), reason: error.message })
                    }
                    Err(error) => return Err(error),
                }
            }
        }
    }
    Ok(fleet)
}

/// Whether grants can open a way through `firewall`: it exists, is readable, and keeps classic
/// rule collections (one managed by a Firewall Policy is refused, as Azure's JIT refuses it).
/// Asked of ARM by reading the firewall; nothing is written.
fn check_firewall(env: &Env, firewall: &FirewallId) -> Result<(), ApiError> {
    env.arm.list_firewall_rules(firewall).map(drop).map_err(|error| match error {
        ArmError::Refused { status: 404, .. } => ApiError::unprocessable(
            "firewall_not_found",
            format!("ARM has no Azure Firewall {firewall}: check the id and the identity's read access"),
        ),
        ArmError::Refused { status: 400..=499, message, .. } => {
            ApiError::unprocessable("firewall_not_supported", message)
        }
        other => ApiError::from(other),
    })
}

/// One VM's NIC, private IP and NSG, asked of ARM.
pub(crate) fn resolve_one(env: &Env, vm: &VmId) -> Result<ProtectedVm, ApiError> {
    let network = env.arm.resolve_vm(vm).map_err(|error| match error {
        ArmError::Refused { status: 404, .. } => ApiError::unprocessable(
            "vm_not_found",
            format!("ARM has no VM {vm}: check the id and the identity's read access"),
        ),
        ArmError::Refused { status: 422, message, .. } => ApiError::unprocessable("vm_not_protectable", message),
        other => ApiError::from(other),
    })?;
    let nsg = network.nsg.ok_or_else(|| {
        ApiError::unprocessable(
            "vm_has_no_nsg",
            format!("VM {vm} has no network security group on its NIC ({}) or subnet, so it cannot be protected: attach an NSG to either and PUT the policy again", network.nic),
        )
    })?;
    Ok(ProtectedVm { vm: vm.clone(), nsg, private_ip: network.private_ip, nic: Some(network.nic) })
}

/// Whether the query asks to end running grants (`?revoke=true`).
pub fn wants_revoke(query: &str) -> bool {
    crate::api::query_param(query, "revoke").as_deref() == Some("true")
}

/// Creates or replaces a policy.
pub fn put(env: &Env, caller: &Caller, name: &str, body: &[u8], revoke: bool) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    let raw: RawPolicy = parse_json(body, false)?;
    let mut policy = Policy::from_raw(name.clone(), raw, env.config.limits, |wanted| resolve(env, wanted))?;
    let key = keys::policy(&name);
    let existing = store::load::<Policy>(env.kv, &key)?;
    let previous = existing.as_ref().map(|e| e.value.baselines.clone()).unwrap_or_default();
    // The indexes a policy's requests are listed in exist before any request can be, so no
    // add ever meets a backend's non-atomic create (Spin's SQLite store upserts there).
    for list in [keys::ARM_WORK.to_owned(), keys::POLICIES.to_owned(), keys::live(&name), keys::pending(&name)] {
        store::create_list(env.kv, &list)?;
    }
    // ARM first, so a saved policy never claims a baseline that is not there; should the save
    // below lose a race, the reconciler puts the stored policy's baseline back.
    if policy.enabled {
        if let Some(firewall) = &policy.firewall {
            check_firewall(env, firewall)?;
        }
        grants::ensure_baselines(env, &mut policy, &previous)?;
    }
    // A baseline left behind on an NSG the policy no longer covers (its VMs moved or left) or
    // by a now-disabled policy goes.
    for stale in previous.iter().filter(|p| policy.baseline_on(&p.nsg).is_none()) {
        grants::remove_baseline(env, &name, stale)?;
    }
    let action = if existing.is_some() { "policy.updated" } else { "policy.created" };
    let document = serde_json::to_value(&policy).map_err(ApiError::internal)?;
    env.audited(action, subject_of_policy(&name), json!({ "policy": document }), || {
        Ok(store::save(env.kv, &key, &policy, existing.as_ref().map(|e| e.version))?)
    })?;
    store::add_to_list(env.kv, keys::POLICIES, name.as_str(), usize::MAX)?;
    let mut cancelled = 0;
    let mut revoked = Revoked::default();
    if !policy.enabled {
        let budget = Budgeted::new(env.kv);
        let env = &env.with_store(&budget);
        if revoke {
            revoked = revoke_grants(env, &budget, caller, &name)?;
        }
        cancelled = cancel_pending(env, &budget, caller, &name, "disabled")?;
    }
    let mut body = serde_json::to_value(&policy).map_err(ApiError::internal)?;
    if revoked.closed > 0 || revoked.remaining > 0 {
        body["revoked"] = json!(revoked.closed);
        // More than one call may swap for: the same call again ends the rest.
        body["revoke_remaining"] = json!(revoked.remaining);
    }
    if cancelled > 0 {
        body["cancelled"] = json!(cancelled);
    }
    Ok(if existing.is_some() { Reply::ok(body) } else { Reply::created(body) })
}

/// One policy.
pub fn get(env: &Env, caller: &Caller, name: &str) -> Result<Reply, ApiError> {
    require_reader(caller)?;
    let policy = env.policy(&parse_name(name)?)?;
    Ok(Reply::ok(serde_json::to_value(&policy.value).map_err(ApiError::internal)?))
}

/// All policies.
pub fn list(env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
    require_reader(caller)?;
    let mut policies = Vec::new();
    for name in store::read_list(env.kv, keys::POLICIES)? {
        let Ok(name) = PolicyName::parse(&name) else { continue };
        if let Some(policy) = store::load::<Policy>(env.kv, &keys::policy(&name))? {
            policies.push(policy.value);
        }
    }
    Ok(Reply::ok(json!({ "policies": policies })))
}

/// Deletes a policy and its baseline rule. Running grants keep their rule until they end (each
/// request remembers its NSG and rule), or end now with `revoke`; pending requests are
/// cancelled. With `revoke`, the grants are ended first: should that fail part-way, the
/// policy is still there and the same call can be repeated.
pub fn delete(env: &Env, caller: &Caller, name: &str, revoke: bool) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    let policy = env.policy(&name)?;
    let budget = Budgeted::new(env.kv);
    let bounded = &env.with_store(&budget);
    let revoked = if revoke { revoke_grants(bounded, &budget, caller, &name)? } else { Revoked::default() };
    if revoked.remaining > 0 {
        return Err(ApiError::conflict(
            "revoke_incomplete",
            format!(
                "{} grants were ended and {} remain (more than one call may change): repeat the same call to end them and delete the policy",
                revoked.closed, revoked.remaining
            ),
        ));
    }
    let cancelled = cancel_pending(bounded, &budget, caller, &name, "deleted")?;
    let revoked = revoked.closed;
    for baseline in &policy.value.baselines {
        grants::remove_baseline(env, &name, baseline)?;
    }
    env.record("policy.deleted", subject_of_policy(&name), Outcome::Ok, json!({ "revoke": revoke }))?;
    env.kv.delete(&keys::policy(&name))?;
    // While it has grants, it stays in the reconciler's round (which drops it after them).
    if store::read_list(env.kv, &keys::live(&name))?.is_empty() {
        store::remove_from_list(env.kv, keys::POLICIES, name.as_str())?;
    }
    Ok(Reply::ok(json!({ "deleted": name, "revoked": revoked, "cancelled": cancelled })))
}

/// Cancels a policy's pending requests (it was disabled or deleted); answers how many.
/// Stops when the invocation's swap budget is spent: requests left pending cannot be approved
/// under a disabled or deleted policy, and time out.
fn cancel_pending(
    env: &Env,
    budget: &Budgeted,
    caller: &Caller,
    policy: &PolicyName,
    why: &str,
) -> Result<usize, ApiError> {
    let mut cancelled = 0;
    for id in store::read_list(env.kv, &keys::pending(policy))? {
        if budget.spent() {
            break;
        }
        let Ok(id) = RequestId::parse(&id) else { continue };
        let Some(mut request) = store::load::<AccessRequest>(env.kv, &keys::request(&id))? else { continue };
        if let Ok(next) = request.value.state.apply(Event::Cancel) {
            request.value.state = next;
            request.value.ended = Some(Ending {
                by: caller.principal.to_string(),
                at: env.now,
                reason: Some(format!("policy {policy} {why}")),
            });
            env.commit(&mut request, "request.cancelled", json!({ "reason": format!("policy {why}") }))?;
            cancelled += 1;
            grants::forget_open(env, &request.value)?;
        } else {
            // Decided meanwhile: only this index is stale; its other indexes still hold it.
            store::remove_from_list(env.kv, &keys::pending(policy), id.as_str())?;
        }
    }
    Ok(cancelled)
}

/// Ends every running grant under a policy now; answers how many. Reads the policy's live
/// index (active grants) and the ARM work queue (approved ones still opening), never a
/// capped recent list, so no grant can be missed however old it is.
/// Stops when the invocation's swap budget is spent, answering how many remain.
fn revoke_grants(env: &Env, budget: &Budgeted, caller: &Caller, policy: &PolicyName) -> Result<Revoked, ApiError> {
    let mut ids = store::read_list(env.kv, &keys::live(policy))?;
    ids.extend(store::read_list(env.kv, keys::ARM_WORK)?);
    ids.sort();
    ids.dedup();
    let mut revoked = Revoked::default();
    for id in ids {
        let Ok(id) = RequestId::parse(&id) else { continue };
        let Some(mut request) = store::load::<AccessRequest>(env.kv, &keys::request(&id))? else { continue };
        if request.value.policy != *policy || !matches!(request.value.state, State::Active | State::Approved) {
            continue;
        }
        if budget.spent() {
            revoked.remaining += 1;
            continue;
        }
        let ending = Ending {
            by: caller.principal.to_string(),
            at: env.now,
            reason: Some(format!("policy {policy} disabled or deleted")),
        };
        grants::close(env, &mut request, Event::Revoke, Some(ending))?;
        revoked.closed += 1;
    }
    Ok(revoked)
}

/// What ending a policy's grants came to.
#[derive(Default)]
struct Revoked {
    closed: usize,
    remaining: usize,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EvaluateBody {
    principal: String,
    #[serde(default)]
    groups: Vec<String>,
    request: serde_json::Value,
}

/// A dry run: would this principal's request be allowed, auto-approved, and by which rule?
/// Checks everything a real request is checked against; changes nothing.
pub fn evaluate(env: &Env, caller: &Caller, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    if !caller.has(Role::Admin) && !caller.has(Role::Approver) {
        return Err(ApiError::forbidden("role_required", "evaluating policies needs the admin or approver role"));
    }
    let name = parse_name(name)?;
    let policy = env.policy(&name)?.value;
    let body: EvaluateBody = parse_json(body, false)?;
    let principal = crate::domain::Principal::parse(&body.principal)
        .map_err(|e| ApiError::bad_request("invalid_principal", e.to_string()))?;
    let groups: Vec<crate::domain::GroupName> = body
        .groups
        .iter()
        .map(|g| crate::domain::GroupName::parse(g).map_err(|e| ApiError::bad_request("invalid_group", e.to_string())))
        .collect::<Result<_, _>>()?;
    let mut raw = body.request;
    let Some(fields) = raw.as_object_mut() else {
        return Err(ApiError::bad_request("invalid_body", "'request' must be an object, as POST /api/requests takes"));
    };
    fields.insert("policy".into(), json!(name));
    let raw: crate::domain::RawRequest =
        serde_json::from_value(raw).map_err(|e| ApiError::bad_request("invalid_body", format!("request: {e}")))?;
    let id = RequestId::parse("dry-run").expect("a valid id");
    let request = match AccessRequest::from_raw(raw, &policy, &principal, &groups, None, id, env.now) {
        Ok(request) => request,
        Err(refused) => {
            let error = super::requests::refusal(refused);
            return Ok(Reply::ok(json!({"allowed": false, "code": error.code, "reason": error.message})));
        }
    };
    let (decision, verdicts) = if request.break_glass {
        (crate::domain::decide::Decision::AutoApproved { rule: None }, Vec::new())
    } else {
        crate::domain::decide::decide(&request, &policy, &groups, env.now)
    };
    let rules: Vec<serde_json::Value> = verdicts
        .into_iter()
        .map(|v| json!({"rule": v.rule, "matched": v.why_not.is_none(), "why_not": v.why_not}))
        .collect();
    let answer = match decision {
        crate::domain::decide::Decision::AutoApproved { rule } => {
            let reason = if request.break_glass {
                "break-glass self-activation".to_owned()
            } else {
                rule.as_ref().map_or_else(
                    || "the policy approves every valid request".to_owned(),
                    |r| format!("auto-approval rule '{r}' matches"),
                )
            };
            json!({"allowed": true, "auto_approved": true, "rule": rule, "reason": reason, "rules": rules})
        }
        crate::domain::decide::Decision::NeedsApprovals { required } => json!({
            "allowed": true, "auto_approved": false, "required_approvals": required,
            "reason": format!("no auto-approval rule matches: {required} approval(s) needed"), "rules": rules,
        }),
    };
    Ok(Reply::ok(answer))
}
