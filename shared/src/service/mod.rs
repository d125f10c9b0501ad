//! The operations the components expose. Each takes an [`Env`] (the ports and the time,
//! read once per invocation) and the authenticated caller, and returns an API answer.

pub mod decisions;
pub mod grants;
pub mod policies;
pub mod requests;
pub mod sweep;

use chrono::{DateTime, Utc};

use crate::api::ApiError;
use crate::arm::Arm;
use crate::config::Config;
use crate::domain::{AccessRequest, Policy, PolicyName, RequestId};
use crate::keys;
use crate::store::{self, KvStore, Versioned};

/// What an operation works with.
pub struct Env<'a> {
    /// The key-value store.
    pub kv: &'a dyn KvStore,
    /// Azure Resource Manager.
    pub arm: &'a dyn Arm,
    /// Configuration.
    pub config: &'a Config,
    /// The time of this invocation.
    pub now: DateTime<Utc>,
}

impl Env<'_> {
    /// Loads a policy, or 404.
    pub fn policy(&self, name: &PolicyName) -> Result<Versioned<Policy>, ApiError> {
        store::load(self.kv, &keys::policy(name))?
            .ok_or_else(|| ApiError::not_found("policy_not_found", format!("no policy named '{name}'")))
    }

    /// Loads a request by the id in a path, or 404.
    pub fn request(&self, id: &str) -> Result<Versioned<AccessRequest>, ApiError> {
        let not_found = || {
            ApiError::not_found(
                "request_not_found",
                format!("no request '{}'", id.chars().take(64).collect::<String>()),
            )
        };
        let id = RequestId::parse(id).map_err(|_| not_found())?;
        store::load(self.kv, &keys::request(&id))?.ok_or_else(not_found)
    }

    /// Saves a request at the version it was read.
    pub fn save_request(&self, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
        request.version =
            store::save(self.kv, &keys::request(&request.value.id), &request.value, Some(request.version))?;
        Ok(())
    }
}

/// A request as the API shows it.
pub fn request_json(request: &AccessRequest) -> serde_json::Value {
    serde_json::to_value(request).unwrap_or_default()
}

#[cfg(test)]
mod tests;
