//! Decisions from other systems (`POST /webhooks/decision`): ticketing and workflow tools
//! (ServiceNow, Jira automation, PagerDuty) approve or deny as an integration. Each request is
//! signed as Standard Webhooks specify, with the integration's own secret; a timestamp more
//! than 5 minutes away and a message id seen before are refused. The integration decides as
//! `integration:<name>`, so it counts only where a policy lists it among the approvers, under
//! exactly the rules of the API; the person it names is kept beside it in the audit trail.

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::json;

use super::Env;
use crate::api::{ApiError, Reply};
use crate::auth::{Caller, Role, integration_principal};
use crate::config::Integration;
use crate::keys;
use crate::store::KvStore;

/// How far a message's timestamp may be from now, either way.
pub const TOLERANCE: TimeDelta = TimeDelta::minutes(5);

/// What an integration sends.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundDecision {
    request: String,
    decision: Verdict,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    on_behalf_of: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Approve,
    Deny,
}

/// The Standard Webhooks headers of a message.
pub struct Signed<'a> {
    /// `webhook-id`.
    pub id: Option<&'a str>,
    /// `webhook-timestamp`.
    pub timestamp: Option<&'a str>,
    /// `webhook-signature`.
    pub signature: Option<&'a str>,
}

/// The integration whose secret signed the message, within the time window. Every secret is
/// tried, so timing says nothing about which ones exist.
pub fn authenticate<'a>(
    integrations: &'a [Integration],
    signed: &Signed,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<(&'a Integration, String), ApiError> {
    let missing =
        || ApiError::unauthorized("send webhook-id, webhook-timestamp and webhook-signature (Standard Webhooks)");
    let (id, timestamp, signature) =
        (signed.id.ok_or_else(missing)?, signed.timestamp.ok_or_else(missing)?, signed.signature.ok_or_else(missing)?);
    if id.is_empty() || id.len() > 100 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(ApiError::unauthorized("webhook-id must be 1 to 100 letters, digits, '-', '_' or '.'"));
    }
    let timestamp: i64 = timestamp.parse().map_err(|_| ApiError::unauthorized("webhook-timestamp is not a number"))?;
    let at = DateTime::from_timestamp(timestamp, 0)
        .ok_or_else(|| ApiError::unauthorized("webhook-timestamp is out of range"))?;
    if (now - at).abs() > TOLERANCE {
        return Err(ApiError::unauthorized("webhook-timestamp is more than 5 minutes away: send a fresh message"));
    }
    let mut found = None;
    for integration in integrations {
        if integration.secret.verifies(signature, id, timestamp, body) {
            found = Some(integration);
        }
    }
    let integration = found.ok_or_else(|| ApiError::unauthorized("the signature matches no integration"))?;
    Ok((integration, id.to_owned()))
}

/// Refuses a message taken before, and marks this one taken (until no timestamp it could
/// carry is accepted any more). Answers the mark, to give back if the decision is refused:
/// a sender retrying after a 429 or a lost race must not be told its message is a replay.
pub fn first_time(
    kv: &dyn KvStore,
    integration: &Integration,
    id: &str,
    now: DateTime<Utc>,
) -> Result<String, ApiError> {
    let key = keys::seen_message(&integration.name, id);
    if !super::throttle::mark_once(kv, &key, now + TOLERANCE * 2)? {
        return Err(ApiError::conflict(
            "replayed",
            "this message was already taken; send a new one with a new webhook-id",
        ));
    }
    Ok(key)
}

impl InboundDecision {
    /// The integration as the approver, the person it names beside it.
    pub fn caller(&self, integration: &Integration) -> Caller {
        let display_name = self
            .on_behalf_of
            .as_ref()
            .map(|name| name.chars().filter(|c| !crate::domain::is_invisible(*c)).take(100).collect::<String>());
        Caller {
            principal: integration_principal(&integration.name),
            display_name,
            groups: Vec::new(),
            roles: vec![Role::Approver],
        }
    }

    /// Approves or denies, as the API would for this caller.
    pub fn decide(self, env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
        let note = self.comment.map(|c| c.chars().take(500).collect::<String>());
        match self.decision {
            Verdict::Approve => {
                let body = json!({ "comment": note });
                super::decisions::approve(env, caller, &self.request, body.to_string().as_bytes())
            }
            Verdict::Deny => {
                let body = json!({ "reason": note });
                super::decisions::deny(env, caller, &self.request, body.to_string().as_bytes())
            }
        }
    }
}
