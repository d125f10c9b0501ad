//! The sweep: closes grants whose time is up and finishes ARM work left unfinished.
//! It reads only the due minutes since its cursor and the `work:arm` list, never the whole
//! store, and one bad record never stops the batch.

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::Serialize;

use super::{Env, grants};
use crate::api::ApiError;
use crate::domain::request::Ending;
use crate::domain::{AccessRequest, Event, RequestId, State};
use crate::keys;
use crate::store::{self, StoreError, Versioned};

/// The furthest back a sweep catches up (longer outages jump ahead; grants never outlive 7 days).
const MAX_CATCH_UP: TimeDelta = TimeDelta::days(8);

/// What one sweep did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct SweepReport {
    /// Grants whose rule was removed.
    pub closed: usize,
    /// Approved requests whose rule was put in place.
    pub opened: usize,
    /// Requests whose ARM work failed again and stays queued.
    pub retrying: usize,
    /// Requests that ended as `failed`.
    pub failed: usize,
    /// Pending requests that waited too long for approval.
    pub timed_out: usize,
    /// Records that could not be read or saved (reported, skipped).
    pub skipped: usize,
    /// Due minutes read.
    pub minutes_scanned: usize,
}

/// The start of the minute containing `at`.
pub fn minute_floor(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

/// Lists a request in the due index for the minute of `at`, so the sweep looks at it then
/// (a grant's end, a pending request's timeout). The first entry ever also starts the sweep's
/// cursor, which is what makes the sweep read the index at all.
pub fn schedule(env: &Env, at: DateTime<Utc>, id: &RequestId) -> Result<(), ApiError> {
    store::add_to_list(env.kv, &keys::due(at), id.as_str(), usize::MAX)?;
    if store::load::<DateTime<Utc>>(env.kv, keys::SWEEP_CURSOR)?.is_none() {
        let start = minute_floor(env.now.min(at)) - TimeDelta::minutes(1);
        // Losing this race to another writer is fine: either cursor is early enough.
        match store::save(env.kv, keys::SWEEP_CURSOR, &start, None) {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

/// Runs one sweep at `env.now`.
pub fn sweep(env: &Env) -> Result<SweepReport, ApiError> {
    let mut report = SweepReport::default();
    let this_minute = minute_floor(env.now);
    let cursor = store::load::<DateTime<Utc>>(env.kv, keys::SWEEP_CURSOR)?;
    // Work handled in the due phase waits for the next sweep, whatever came of it.
    let mut handled = Vec::new();
    if let Some(cursor) = &cursor {
        let mut minute = (cursor.value + TimeDelta::minutes(1)).max(this_minute - MAX_CATCH_UP);
        let mut complete_until = cursor.value;
        let mut clean = true;
        while minute <= this_minute {
            report.minutes_scanned += 1;
            let ids = store::read_list(env.kv, &keys::due(minute))?;
            for id in &ids {
                if !process_due(env, id, &mut report) {
                    clean = false;
                }
                handled.push(id.clone());
            }
            // Minutes before this one are complete: every grant in them ended before now.
            if minute < this_minute && clean {
                complete_until = minute;
                if !ids.is_empty() {
                    env.kv.delete(&keys::due(minute))?;
                }
            }
            minute += TimeDelta::minutes(1);
        }
        if complete_until != cursor.value {
            // Losing this race means another sweep advanced it: its value is as good.
            match store::save(env.kv, keys::SWEEP_CURSOR, &complete_until, Some(cursor.version)) {
                Ok(_) | Err(StoreError::Conflict { .. }) => {}
                Err(other) => return Err(other.into()),
            }
        }
    }
    for id in store::read_list(env.kv, keys::ARM_WORK)? {
        if !handled.contains(&id) {
            finish_arm_work(env, &id, &mut report);
        }
    }
    Ok(report)
}

fn load(env: &Env, id: &str, report: &mut SweepReport) -> Option<Versioned<AccessRequest>> {
    let loaded = RequestId::parse(id)
        .map_err(|e| e.to_string())
        .and_then(|id| store::load::<AccessRequest>(env.kv, &keys::request(&id)).map_err(|e| e.to_string()));
    match loaded {
        Ok(request) => request,
        Err(reason) => {
            eprintln!("sweep: skipping request '{id}': {reason}");
            report.skipped += 1;
            None
        }
    }
}

/// Closes one due grant, or times out a request that waited too long for approval; `false`
/// when it could not be handled and must be seen again.
fn process_due(env: &Env, id: &str, report: &mut SweepReport) -> bool {
    let Some(mut request) = load(env, id, report) else { return true };
    if request.value.state == State::Pending && request.value.pending_until.is_some_and(|deadline| deadline <= env.now)
    {
        return match time_out(env, &mut request) {
            Ok(()) => {
                report.timed_out += 1;
                true
            }
            Err(error) => {
                eprintln!("sweep: timing out {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
                report.skipped += 1;
                false
            }
        };
    }
    let due = request.value.ends_at.is_some_and(|end| end <= env.now);
    if request.value.state != State::Active || !due {
        return true;
    }
    match grants::close(env, &mut request, Event::Due, None) {
        Ok(()) => {
            tally(&request.value, report);
            true
        }
        Err(error) => {
            eprintln!("sweep: closing {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
            report.skipped += 1;
            false
        }
    }
}

/// Retries the open or close of one request listed under `work:arm`.
fn finish_arm_work(env: &Env, id: &str, report: &mut SweepReport) {
    let Some(mut request) = load(env, id, report) else {
        // A listed id with no record has nothing left to do.
        let _ = store::remove_from_list(env.kv, keys::ARM_WORK, id);
        return;
    };
    let before = request.value.state;
    let result = match before {
        State::Approved => {
            let policy = env.policy(&request.value.policy).ok().map(|p| p.value);
            grants::open(env, &mut request, policy.as_ref())
        }
        State::Revoking { .. } => grants::finish_close(env, &mut request),
        State::Pending
        | State::Active
        | State::Expired
        | State::Revoked
        | State::Denied
        | State::Cancelled
        | State::TimedOut
        | State::Failed => store::remove_from_list(env.kv, keys::ARM_WORK, id).map_err(ApiError::from),
    };
    match result {
        Ok(()) if before.needs_arm_work() => tally(&request.value, report),
        Ok(()) => {}
        Err(error) => {
            eprintln!("sweep: ARM work for {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
            report.skipped += 1;
        }
    }
}

fn time_out(env: &Env, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
    request.value.state =
        request.value.state.apply(Event::TimeOut).map_err(|e| ApiError::conflict("invalid_state", e.to_string()))?;
    request.value.ended = Some(Ending {
        by: "system".into(),
        at: env.now,
        reason: Some("no decision before the pending timeout".into()),
    });
    env.commit(request, "request.timed_out", serde_json::json!({}))?;
    grants::forget_open(env, &request.value)
}

fn tally(request: &AccessRequest, report: &mut SweepReport) {
    match request.state {
        State::Expired | State::Revoked => report.closed += 1,
        State::Active => report.opened += 1,
        State::Failed => report.failed += 1,
        State::Approved | State::Revoking { .. } => report.retrying += 1,
        State::Pending | State::Denied | State::Cancelled | State::TimedOut => {}
    }
}
