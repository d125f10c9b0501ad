//! Notices no peer sends, each an audit event and so a webhook: a reminder when a request has
//! waited for approval (`request.reminder`, naming who can still approve), a warning when it
//! is about to time out (`request.reminder` with `"notice": "timing_out"`), and a warning
//! before a grant ends (`grant.expiring`, again after each extension). Each is sent once: the
//! request keeps the notices it has had. They ride on the sweep's due index: the warnings
//! before an end on the entry of that end, which the sweep reads `notice_lead` ahead (see
//! [`ahead`]), so opening or extending a grant writes no entry of its own for them; the
//! reminder on an entry of its own.

use chrono::{DateTime, Utc};
use serde_json::json;

use super::{Env, subject_of};
use crate::api::ApiError;
use crate::domain::{AccessRequest, Approval, Policy, State};
use crate::keys;
use crate::store::{self, Versioned};

/// Schedules the notices of a request that starts waiting for approval.
pub fn schedule_for_pending(env: &Env, request: &AccessRequest) -> Result<(), ApiError> {
    let Some(until) = request.pending_until else { return Ok(()) };
    let settings = &env.config.webhooks;
    if let Some(after) = settings.reminder_after
        && request.created_at + after < until
    {
        super::sweep::schedule(env, request.created_at + after, &request.id)?;
    }
    Ok(())
}

/// The due minutes whose entries are owed a warning when the sweep reads `minute`: those
/// `notice_lead` later (two when the lead is not a whole number of minutes, since an end
/// anywhere in `minute + lead` and the minute after can be a lead away from `minute`).
pub fn ahead(env: &Env, minute: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let Some(lead) = env.config.webhooks.notice_lead else { return Vec::new() };
    let first = super::sweep::minute_floor(minute + lead);
    if first == minute + lead { vec![first] } else { vec![first, first + chrono::TimeDelta::minutes(1)] }
}

/// Sends the notices that are due for a request the sweep was told about, one at a time.
pub fn send_due(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<usize, ApiError> {
    let mut sent = 0;
    while let Some((action, notice, details)) = next_due(env, &request.value)? {
        request.value.notices.push(notice);
        env.audited(action, subject_of(&request.value), details, || env.save_request(request))?;
        sent += 1;
    }
    Ok(sent)
}

/// The next notice this request is owed now, if any.
fn next_due(env: &Env, request: &AccessRequest) -> Result<Option<(&'static str, String, serde_json::Value)>, ApiError> {
    let settings = &env.config.webhooks;
    let had = |notice: &str| request.notices.iter().any(|n| n == notice);
    match (request.state, request.pending_until, request.ends_at) {
        (State::Pending, Some(until), _) if env.now < until => {
            let waited = settings.reminder_after.is_some_and(|after| request.created_at + after <= env.now);
            let closing = settings.notice_lead.is_some_and(|lead| until - lead <= env.now);
            let notice = if closing && !had("timing_out") {
                "timing_out"
            } else if waited && !had("reminder") && !had("timing_out") {
                "reminder"
            } else {
                return Ok(None);
            };
            let details = json!({
                "notice": notice,
                "waiting_since": request.created_at,
                "times_out_at": until,
                "approvals": request.approvals.len(),
                "approvers_left": approvers_left(env, request)?,
            });
            Ok(Some(("request.reminder", notice.to_owned(), details)))
        }
        (State::Active, _, Some(ends_at)) if env.now < ends_at => {
            let notice = format!("expiring:{}", ends_at.to_rfc3339());
            let close = settings.notice_lead.is_some_and(|lead| ends_at - lead <= env.now);
            if !close || had(&notice) {
                return Ok(None);
            }
            let details =
                json!({"notice": notice, "ends_at": ends_at, "minutes_left": (ends_at - env.now).num_minutes()});
            Ok(Some(("grant.expiring", notice, details)))
        }
        _ => Ok(None),
    }
}

/// The policy's approvers who have not approved yet (members as the policy names them).
fn approvers_left(env: &Env, request: &AccessRequest) -> Result<Vec<String>, ApiError> {
    let Some(policy) = store::load::<Policy>(env.kv, &keys::policy(&request.policy))? else { return Ok(Vec::new()) };
    let Approval::Manual { approvers, .. } = &policy.value.approval else { return Ok(Vec::new()) };
    let approved: Vec<String> = request.approvals.iter().map(|a| a.by.to_string()).collect();
    Ok(approvers.iter().cloned().map(String::from).filter(|member| !approved.contains(member)).collect())
}
