//! Policy administration: `PUT/GET/DELETE /api/policies/{name}`, `GET /api/policies`.

use serde_json::json;

use super::Env;
use crate::api::{ApiError, Reply, parse_json};
use crate::auth::{Caller, Role};
use crate::domain::policy::RawPolicy;
use crate::domain::{Policy, PolicyName};
use crate::keys;
use crate::store;

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

/// Creates or replaces a policy.
pub fn put(env: &Env, caller: &Caller, name: &str, body: &[u8]) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    let raw: RawPolicy = parse_json(body, false)?;
    let policy = Policy::from_raw(name.clone(), raw, env.config.limits)
        .map_err(|e| ApiError::unprocessable("invalid_policy", e.to_string()))?;
    let key = keys::policy(&name);
    let existing = store::load::<Policy>(env.kv, &key)?;
    store::save(env.kv, &key, &policy, existing.as_ref().map(|e| e.version))?;
    store::add_to_list(env.kv, keys::POLICIES, name.as_str(), usize::MAX)?;
    let body = serde_json::to_value(&policy).map_err(ApiError::internal)?;
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

/// Deletes a policy. Running grants keep their rule until they end: each request remembers
/// its NSG and rule, so the sweep can still close it.
pub fn delete(env: &Env, caller: &Caller, name: &str) -> Result<Reply, ApiError> {
    require_admin(caller)?;
    let name = parse_name(name)?;
    env.policy(&name)?;
    env.kv.delete(&keys::policy(&name))?;
    store::remove_from_list(env.kv, keys::POLICIES, name.as_str())?;
    Ok(Reply::ok(json!({ "deleted": name })))
}
