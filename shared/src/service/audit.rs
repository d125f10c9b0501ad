//! The audit trail's API: `GET /api/audit` (filtered pages), `GET /api/audit/export` (JSON
//! Lines or CloudEvents), `GET /api/audit/verify`, and `POST /api/audit/checkpoint` (sign the
//! head now). Auditors and admins only.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::Env;
use crate::api::{ApiError, Reply, query_param};
use crate::audit::export::{self, Format};
use crate::audit::log::{self, Filter};
use crate::audit::{AuditEvent, Checkpoint, Outcome, Subject};
use crate::auth::{Caller, Role};
use crate::store::StoreError;

/// Events one page returns by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

fn require_auditor(caller: &Caller) -> Result<(), ApiError> {
    if caller.has(Role::Auditor) || caller.has(Role::Admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden("auditor_role_required", "the audit trail is for auditors and admins"))
    }
}

fn time(query: &str, name: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
    query_param(query, name)
        .map(|value| {
            DateTime::parse_from_rfc3339(&value).map(|t| t.with_timezone(&Utc)).map_err(|_| {
                ApiError::bad_request(
                    "invalid_time",
                    format!("{name} must be an RFC 3339 time such as 2026-01-31T12:00:00Z"),
                )
            })
        })
        .transpose()
}

fn number(query: &str, name: &'static str) -> Result<Option<u64>, ApiError> {
    query_param(query, name)
        .map(|value| {
            value.parse().map_err(|_| ApiError::bad_request("invalid_number", format!("{name} must be a whole number")))
        })
        .transpose()
}

/// A page of events matching the query's filters, oldest first, with the cursor of the next.
pub fn list(env: &Env, caller: &Caller, query: &str) -> Result<Reply, ApiError> {
    require_auditor(caller)?;
    let filter = Filter {
        since: time(query, "since")?,
        until: time(query, "until")?,
        actor: query_param(query, "actor"),
        action: query_param(query, "action"),
        request: query_param(query, "request"),
        policy: query_param(query, "policy"),
    };
    let cursor = query_param(query, "cursor")
        .map(|c| c.parse::<u64>().map_err(|_| ApiError::bad_request("invalid_cursor", "cursor comes from next_cursor")))
        .transpose()?;
    let limit = match number(query, "limit")? {
        None => DEFAULT_LIMIT,
        Some(n @ 1..) if n as usize <= MAX_LIMIT => n as usize,
        Some(_) => return Err(ApiError::bad_request("invalid_limit", format!("limit must be 1..{MAX_LIMIT}"))),
    };
    let page = log::page(env.kv, &filter, cursor, limit)?;
    Ok(Reply::ok(serde_json::to_value(page).map_err(ApiError::internal)?))
}

/// What an export covers and how it renders it.
#[derive(Clone, Copy, Debug)]
pub struct ExportPlan {
    /// First event.
    pub from: u64,
    /// Last event.
    pub to: u64,
    /// Rendering.
    pub format: Format,
}

/// Checks an export query (`from`, `to`, `format`) against the trail: where it starts and ends.
pub fn plan_export(env: &Env, caller: &Caller, query: &str) -> Result<ExportPlan, ApiError> {
    require_auditor(caller)?;
    let format = Format::parse(query_param(query, "format").as_deref())
        .map_err(|message| ApiError::bad_request("invalid_format", message))?;
    let last = log::head(env.kv)?.map_or(0, |head| head.seq);
    let from = number(query, "from")?.unwrap_or(1).max(1);
    let to = number(query, "to")?.map_or(last, |to| to.min(last));
    Ok(ExportPlan { from, to, format })
}

/// The export's lines, read from the store as they are consumed (the component streams them).
pub fn export_lines<'a>(env: &'a Env, plan: ExportPlan) -> impl Iterator<Item = Result<String, StoreError>> + 'a {
    log::range(env.kv, plan.from, plan.to).map(move |event| event.map(|e| export::line(&e, plan.format)))
}

/// Walks the chain (or `from..to`) and reports the first broken link.
pub fn verify(env: &Env, caller: &Caller, query: &str) -> Result<Reply, ApiError> {
    require_auditor(caller)?;
    let from = number(query, "from")?.unwrap_or(1);
    let to = number(query, "to")?;
    let audit = &env.config.audit;
    let checkpointing = audit
        .checkpoint_key
        .as_ref()
        .map(|k| log::Checkpointing { key: k.expose().as_bytes(), every: audit.checkpoint_every });
    let report = log::verify_stored(env.kv, from, to, checkpointing)?;
    let mut body = serde_json::to_value(&report).map_err(ApiError::internal)?;
    body["valid"] = json!(report.chain.broken.is_none());
    Ok(Reply::ok(body))
}

/// Signs the head now (after recording that it was asked to) and answers the checkpoint, for
/// the auditor to keep outside the store.
pub fn checkpoint(env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
    require_auditor(caller)?;
    let key = env.config.audit.checkpoint_key.as_ref().ok_or_else(|| {
        ApiError::conflict("checkpoints_disabled", "set the audit_checkpoint_key variable to sign checkpoints")
    })?;
    let event: AuditEvent = env.record("audit.checkpoint", Subject::default(), Outcome::Ok, json!({}))?;
    let checkpoint = Checkpoint::sign(key.expose().as_bytes(), event.seq, &event.hash);
    log::save_checkpoint(env.kv, &checkpoint)?;
    Ok(Reply::created(serde_json::to_value(checkpoint).map_err(ApiError::internal)?))
}
