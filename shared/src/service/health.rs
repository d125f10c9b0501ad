//! `GET /api/health`: the watchdog. 503 when expiry is not keeping up (the sweep stopped, a
//! grant is open well past its end, the due index or the work list is falling behind). With
//! no credential it says that and when the last sweep ran; admins and auditors also see the
//! backlog it left and the problems.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;

use super::Env;
use super::sweep::SweepStatus;
use crate::api::{ApiError, Reply};
use crate::auth::{Caller, Role};
use crate::keys;

/// Sweeps in a row that could not see all their work before the backlog counts as a problem.
const DEFERRED_STREAK_LIMIT: u32 = 5;

/// Minutes the due index may lag behind the clock before it counts as a backlog: the sweep
/// completes a minute only once it is two minutes past.
const DUE_SETTLE_MINUTES: i64 = 3;

/// `GET /api/health` without a credential: whether expiry keeps up (200 or 503) and when the
/// last sweep ran, so an uptime check can watch it; the backlog (which would tell anyone when
/// a grant is outliving its end) is for admins and auditors.
pub fn public(env: &Env) -> Result<Reply, ApiError> {
    let detailed = assess(env)?;
    let body = json!({ "status": detailed.body["status"], "last_sweep_at": detailed.body["last_sweep_at"] });
    Ok(Reply { status: detailed.status, body })
}

/// `GET /api/health` with an admin's or auditor's credential: the backlog and the problems.
pub fn detailed(env: &Env, caller: &Caller) -> Result<Reply, ApiError> {
    if !caller.has(Role::Admin) && !caller.has(Role::Auditor) {
        return Err(ApiError::forbidden("role_required", "the health details need the admin or auditor role"));
    }
    assess(env)
}

/// The service's health, from what the last sweep recorded.
fn assess(env: &Env) -> Result<Reply, ApiError> {
    let limit = env.config.drift.max_sweep_age;
    let status: Option<SweepStatus> = match env.kv.get(keys::SWEEP_STATUS)? {
        Some(bytes) => serde_json::from_slice(&bytes).ok(),
        None => None,
    };
    let mut problems = Vec::new();
    // Minutes with one decimal, in integers: the float formatter alone is 17 KB of every
    // component that checks health.
    let minutes = |delta: TimeDelta| {
        let tenths = (delta.num_seconds().max(0) + 3) / 6;
        format!("{}.{}", tenths / 10, tenths % 10)
    };
    let body = match &status {
        None => {
            problems.push("no sweep has completed yet".to_owned());
            json!({"last_sweep_at": null})
        }
        Some(status) => {
            let age = env.now - status.at;
            if age > limit {
                problems.push(format!("the last sweep ran {} minutes ago", minutes(age)));
            }
            if let Some(oldest) = status.oldest_overdue.filter(|end| env.now - *end > limit) {
                problems.push(format!("a grant has been open {} minutes past its end", minutes(env.now - oldest)));
            }
            let lag = status.cursor.map(|cursor: DateTime<Utc>| (env.now - cursor).num_minutes() - DUE_SETTLE_MINUTES);
            if lag.is_some_and(|lag| lag > limit.num_minutes()) {
                problems.push(format!("the due index is {} minutes behind", lag.unwrap_or_default()));
            }
            if status.deferred_streak >= DEFERRED_STREAK_LIMIT {
                problems.push(format!("{} sweeps in a row had more work than they could do", status.deferred_streak));
            }
            json!({
                "last_sweep_at": status.at,
                "sweep_age_seconds": age.num_seconds(),
                "backlog": {
                    "arm_work": status.arm_work,
                    "overdue_grants": status.overdue,
                    "oldest_overdue_end": status.oldest_overdue,
                    "due_lag_minutes": lag.map(|l| l.max(0)),
                    "deferred": status.report.deferred,
                },
            })
        }
    };
    let mut body = body;
    body["status"] = json!(if problems.is_empty() { "ok" } else { "failing" });
    body["problems"] = json!(problems);
    body["limit_seconds"] = json!(limit.num_seconds());
    Ok(Reply { status: if problems.is_empty() { 200 } else { 503 }, body })
}
