//! The sweep: closes grants whose time is up, finishes ARM work left unfinished, and runs a
//! share of the reconciler. It reads only the due minutes since its cursor and the
//! `work:arm` list, never the whole store, and one bad record never stops the batch: a record
//! that cannot be read is kept for the next tick, never dropped ("absent" and "could not
//! read" are different answers).
//!
//! Each invocation spends at most [`SWAP_BUDGET`] compare-and-swaps (Spin hosts may cap them
//! per invocation); what is left waits for the next tick, which continues where this one
//! stopped.

use std::cell::Cell;
use std::collections::HashMap;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use super::{Env, grants, reconcile};
use crate::api::ApiError;
use crate::arm::Arm;
use crate::domain::request::Ending;
use crate::domain::{AccessRequest, Event, RequestId, State};
use crate::keys;
use crate::store::{self, KvStore, StoreError, Versioned};

/// The furthest back a sweep catches up (longer outages jump ahead; the reconciler's pass over
/// live grants closes whatever such a jump skips).
const MAX_CATCH_UP: TimeDelta = TimeDelta::days(8);
/// How long a minute stays open after it has passed: writers on other instances, or with a
/// clock a little behind, may still add to it. Only older minutes are completed.
const SETTLE: TimeDelta = TimeDelta::minutes(2);
/// A slot handed out but still empty after this long belongs to a writer that died.
const EMPTY_SLOT_GRACE: TimeDelta = TimeDelta::minutes(5);
/// Compare-and-swaps one sweep spends before it stops taking new work (grants due together
/// close as one batch at two or three each; a close on its own costs about ten: the request
/// twice, its audit events, the indexes).
pub const SWAP_BUDGET: u32 = 200;
/// Swaps kept for the reconciler: retries that fail every tick cannot crowd it out.
const RECONCILE_RESERVE: u32 = 50;
/// Due minutes one sweep reads at most: after a long outage, the catch-up is spread over ticks.
const MAX_MINUTES_PER_SWEEP: usize = 240;
/// Swaps a batch of closes makes whatever its size (the ARM work list twice, the audit head
/// twice, and room for a checkpoint and a lost race), and per grant (its two saves; the index
/// lists it shares with no other grant of the batch are counted apart).
const BATCH_SWAPS: u32 = 8;
const BATCH_SWAPS_PER_GRANT: u32 = 2;
/// Slots tried when a backend's counter hands one out twice (Cosmos's increment can).
const SLOT_ATTEMPTS: usize = 8;

/// What one sweep did.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq, Clone)]
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
    /// Records that could not be read or saved (reported, kept for the next tick).
    pub skipped: usize,
    /// Due minutes read.
    pub minutes_scanned: usize,
    /// Whether the swap budget ran out before all the work was seen (the next tick goes on).
    pub deferred: bool,
    /// Policies the reconciler looked at.
    pub reconciled: usize,
    /// Grants still open after their end when the sweep finished.
    pub overdue: usize,
}

/// What the last sweep left, for the health check.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SweepStatus {
    /// When it ran.
    pub at: DateTime<Utc>,
    /// The last minute of the due index it had completed.
    pub cursor: Option<DateTime<Utc>>,
    /// Requests with ARM work outstanding after it.
    pub arm_work: usize,
    /// Grants it saw open past their end and could not close.
    pub overdue: usize,
    /// The earliest end among them.
    pub oldest_overdue: Option<DateTime<Utc>>,
    /// Sweeps in a row that could not see all their work.
    #[serde(default)]
    pub deferred_streak: u32,
    /// What it did.
    pub report: SweepReport,
}

/// The start of the minute containing `at`.
pub fn minute_floor(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

/// Lists a request in the due index for the minute of `at`, so the sweep looks at it then
/// (a grant's end, a pending request's timeout). Never behind the sweep's cursor or the
/// clock: an entry there would never be read. The first entry ever also starts the cursor.
pub fn schedule(env: &Env, at: DateTime<Utc>, id: &RequestId) -> Result<(), ApiError> {
    // The cursor read at the start of the invocation will do, unless a slow call (ARM) has
    // passed since: the sweep may have moved on.
    if env.fresh_now() - env.now > TimeDelta::seconds(5) {
        env.kv.forget(keys::SWEEP_CURSOR);
    }
    let cursor = store::load::<DateTime<Utc>>(env.kv, keys::SWEEP_CURSOR)?;
    let mut at = at.max(env.fresh_now());
    if let Some(cursor) = &cursor {
        at = at.max(cursor.value + TimeDelta::minutes(1));
    }
    add_due(env.kv, minute_floor(at), id.as_str())?;
    if cursor.is_none() {
        let start = minute_floor(env.now.min(at)) - TimeDelta::minutes(1);
        // Losing this race to another writer is fine: either cursor is early enough.
        match store::save(env.kv, keys::SWEEP_CURSOR, &start, None) {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

/// Takes a slot of the minute's due index and writes the id in it. Each entry has a key of
/// its own, handed out by the store's atomic counter, so no write ever replaces another's and
/// nothing relies on a create-if-absent (an upsert on Spin's SQLite store). The write is
/// still a create-if-absent where the store makes it one: Cosmos DB's increment can hand a
/// slot out twice, and a plain write would then erase an entry.
fn add_due(kv: &dyn KvStore, minute: DateTime<Utc>, id: &str) -> Result<(), StoreError> {
    for _ in 0..SLOT_ATTEMPTS {
        let slot = kv.increment(&keys::due_count(minute), 1)?;
        if kv.compare_and_swap(&keys::due_slot(minute, slot), None, id.as_bytes())? {
            return Ok(());
        }
    }
    Err(StoreError::Conflict { key: keys::due_count(minute) })
}

/// What one slot of a due minute holds.
enum Slot {
    Id(String),
    Empty,
    /// Could not be read now.
    Unreadable,
    /// Read, but not an id.
    Garbage,
}

/// The slots of a due minute, in order.
fn read_due(kv: &dyn KvStore, minute: DateTime<Utc>) -> Result<Vec<Slot>, StoreError> {
    // Counters are read through `increment`, never `get`: each backend stores them its own
    // way (Cosmos DB cannot even `get` one). On SQLite this writes a 0 for an empty minute,
    // which the minute's completion deletes.
    let count = kv.increment(&keys::due_count(minute), 0)?;
    let slots: Vec<String> = (1..=count).map(|slot| keys::due_slot(minute, slot)).collect();
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    // One round trip for the minute; should the batch fail, each slot on its own, so one
    // unreadable slot holds up only itself.
    let values = match kv.get_many(&slots) {
        Ok(values) => values.into_iter().map(Ok).collect(),
        Err(_) => slots.iter().map(|slot| kv.get(slot)).collect::<Vec<_>>(),
    };
    Ok(values
        .into_iter()
        .zip(&slots)
        .map(|(value, slot)| match value {
            Ok(Some(bytes)) => String::from_utf8(bytes).map_or(Slot::Garbage, Slot::Id),
            Ok(None) => Slot::Empty,
            Err(error) => {
                eprintln!("sweep: reading {slot}: {error}");
                Slot::Unreadable
            }
        })
        .collect())
}

/// Removes a completed minute's index.
fn clear_due(kv: &dyn KvStore, minute: DateTime<Utc>, slots: usize) -> Result<(), StoreError> {
    let slots: Vec<String> = (1..=slots).map(|slot| keys::due_slot(minute, slot as i64)).collect();
    if !slots.is_empty() {
        kv.delete_many(&slots)?;
    }
    // The counter after its slots (one left behind would be read again, never lost), and the
    // minute's count of failed logins, done with too.
    kv.delete_many(&[keys::due_count(minute), keys::auth_failures(minute)])
}

/// A store that counts the compare-and-swaps and increments made through it.
pub struct Budgeted<'a> {
    inner: &'a dyn KvStore,
    swaps: Cell<u32>,
}

impl<'a> Budgeted<'a> {
    /// Counts what goes through to `inner`.
    pub fn new(inner: &'a dyn KvStore) -> Self {
        Self { inner, swaps: Cell::new(0) }
    }

    /// Whether the budget is spent.
    pub fn spent(&self) -> bool {
        self.swaps.get() >= SWAP_BUDGET
    }

    /// Swaps made so far.
    pub fn used(&self) -> u32 {
        self.swaps.get()
    }
}

impl KvStore for Budgeted<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.set(key, value)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        self.swaps.set(self.swaps.get() + 1);
        self.inner.compare_and_swap(key, expected, value)
    }

    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.increment(key, delta)
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.inner.get_many(keys)
    }

    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.inner.set_many(entries)
    }

    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        self.inner.delete_many(keys)
    }

    fn forget(&self, key: &str) {
        self.inner.forget(key);
    }
}

/// Grants seen open past their end.
#[derive(Default)]
pub(crate) struct Overdue {
    count: usize,
    oldest: Option<DateTime<Utc>>,
}

impl Overdue {
    /// Notes a request if it is still open after its end.
    pub(crate) fn note(&mut self, request: &AccessRequest, now: DateTime<Utc>) {
        let end = match request.state {
            State::Active => request.ends_at,
            State::Revoking { .. } => {
                Some(request.ended.as_ref().map(|e| e.at).into_iter().chain(request.ends_at).min().unwrap_or(now))
            }
            _ => None,
        };
        if let Some(end) = end.filter(|end| *end <= now) {
            self.count += 1;
            self.oldest = Some(self.oldest.map_or(end, |o| o.min(end)));
        }
    }
}

/// Runs one sweep at `env.now`, the reconciler's share on the same ARM client.
pub fn sweep(env: &Env) -> Result<SweepReport, ApiError> {
    sweep_with(env, env.arm)
}

/// Runs one sweep at `env.now`; the reconciler's share uses `reconciler_arm`, a client with
/// ARM time of its own, so an ARM that hangs on the closes cannot starve the safety net.
pub fn sweep_with(env: &Env, reconciler_arm: &dyn Arm) -> Result<SweepReport, ApiError> {
    let unbudgeted = env.kv;
    let budget = Budgeted::new(env.kv);
    let env = &env.with_store(&budget);
    let mut report = SweepReport::default();
    let mut overdue = Overdue::default();
    // Work handled in the due phase waits for the next sweep, whatever came of it.
    let mut handled = Vec::new();
    let cursor = due_phase(env, &budget, &mut report, &mut overdue, &mut handled)?;
    let work = store::read_list(env.kv, keys::ARM_WORK)?;
    // Each tick starts at another place in the list, so items that fail every time cannot
    // starve the ones behind them; and some of the budget is kept for the reconciler.
    let start = usize::try_from(env.now.timestamp() / 60).unwrap_or_default() % work.len().max(1);
    for id in work.iter().cycle().skip(start).take(work.len()) {
        if budget.used() >= SWAP_BUDGET - RECONCILE_RESERVE {
            report.deferred = true;
            break;
        }
        if !handled.contains(id) {
            finish_arm_work(env, id, &mut report, &mut overdue);
        }
    }
    if !budget.spent() {
        match reconcile::round(&env.with_arm(reconciler_arm), &budget, &mut overdue) {
            Ok(looked) => report.reconciled = looked,
            Err(error) => eprintln!("sweep: reconciling: {}", error.internal.as_deref().unwrap_or(&error.message)),
        }
    } else {
        report.deferred = true;
    }
    report.overdue = overdue.count;
    let previous: Option<SweepStatus> =
        env.kv.get(keys::SWEEP_STATUS).ok().flatten().and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let status = SweepStatus {
        at: env.now,
        cursor,
        arm_work: store::read_list(env.kv, keys::ARM_WORK)?.len(),
        overdue: overdue.count,
        oldest_overdue: overdue.oldest,
        deferred_streak: if report.deferred { previous.map_or(0, |p| p.deferred_streak) + 1 } else { 0 },
        report: report.clone(),
    };
    // One writer's status is as good as another's: a plain write, no swap.
    let bytes = serde_json::to_vec(&status).map_err(ApiError::internal)?;
    env.kv.set(keys::SWEEP_STATUS, &bytes)?;
    // Last, after the status (the health check), with a budget of its own: the rate limits'
    // counters of minutes that are over.
    if let Err(error) = super::throttle::clear_tallies(unbudgeted, env.now) {
        eprintln!("sweep: deleting rate-limit tallies: {error}");
    }
    Ok(report)
}

/// Reads the due minutes from the cursor on (at most [`MAX_MINUTES_PER_SWEEP`] of them, and
/// the last few minutes whatever the cursor), handles what they list, and advances the cursor
/// over the minutes that are complete. Answers the cursor it leaves. A minute that cannot be
/// read is left for the next tick; the others go on.
fn due_phase(
    env: &Env,
    budget: &Budgeted,
    report: &mut SweepReport,
    overdue: &mut Overdue,
    handled: &mut Vec<String>,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    let this_minute = minute_floor(env.now);
    let Some(cursor) = store::load::<DateTime<Utc>>(env.kv, keys::SWEEP_CURSOR)? else { return Ok(None) };
    let first = (cursor.value + TimeDelta::minutes(1)).max(this_minute - MAX_CATCH_UP);
    let mut minutes: Vec<DateTime<Utc>> = std::iter::successors(Some(first), |m| Some(*m + TimeDelta::minutes(1)))
        .take_while(|m| *m <= this_minute)
        .take(MAX_MINUTES_PER_SWEEP)
        .collect();
    if minutes.last().is_some_and(|last| *last < this_minute) {
        // A long catch-up (or a minute that keeps failing) must not keep the sweep from what
        // is due now: the latest minutes are read too.
        report.deferred = true;
        let recent = (0..=SETTLE.num_minutes()).rev().map(|back| this_minute - TimeDelta::minutes(back));
        minutes.extend(recent.filter(|m| *m > first + TimeDelta::minutes(MAX_MINUTES_PER_SWEEP as i64 - 1)));
    }
    let mut complete_until = cursor.value;
    let mut contiguous = true;
    for minute in minutes {
        if budget.spent() {
            report.deferred = true;
            break;
        }
        report.minutes_scanned += 1;
        let swept = sweep_minute(env, budget, minute, report, overdue, handled);
        // After the minute's own work (closes come first), and before it may be completed.
        let warned = warn_ahead(env, budget, minute, report);
        let complete = match swept {
            Ok(clean) => clean && warned && minute + SETTLE < this_minute,
            Err(error) => {
                eprintln!("sweep: minute {minute} left for the next tick: {error}");
                report.skipped += 1;
                false
            }
        };
        contiguous &= complete && minute == complete_until + TimeDelta::minutes(1);
        if contiguous {
            complete_until = minute;
        }
    }
    if complete_until != cursor.value {
        // Losing this race means another sweep advanced it: its value is as good.
        match store::save(env.kv, keys::SWEEP_CURSOR, &complete_until, Some(cursor.version)) {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    Ok(Some(complete_until))
}

/// Sends the warnings owed, as of `minute`, before the ends the due index lists a lead later
/// (see [`notices::ahead`](super::notices::ahead)). Those minutes are only read here, never
/// cleared: each is cleared in its own turn. A warning that cannot be sent now is tried again
/// while `minute` is still read (until it settles).
fn warn_ahead(env: &Env, budget: &Budgeted, minute: DateTime<Utc>, report: &mut SweepReport) -> bool {
    let mut complete = true;
    for ahead in super::notices::ahead(env, minute) {
        let slots = match read_due(env.kv, ahead) {
            Ok(slots) => slots,
            Err(error) => {
                eprintln!("sweep: warnings listed at {ahead}: {error}");
                report.skipped += 1;
                complete = false;
                continue;
            }
        };
        let mut ids: Vec<&str> = Vec::new();
        for slot in &slots {
            if let Slot::Id(id) = slot
                && !ids.contains(&id.as_str())
            {
                ids.push(id);
            }
        }
        let mut requests = load_all(env, &ids);
        for id in ids {
            if budget.used() >= SWAP_BUDGET - RECONCILE_RESERVE {
                report.deferred = true;
                return false;
            }
            let Some(Ok(Some(mut request))) = requests.remove(id) else { continue };
            if matches!(request.value.state, State::Active | State::Pending)
                && let Err(error) = super::notices::send_due(env, &mut request)
            {
                eprintln!("sweep: warning of {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
                report.skipped += 1;
                complete = false;
            }
        }
    }
    complete
}

/// Handles one due minute; answers whether everything in it was handled (and, when the minute
/// has settled, clears it).
fn sweep_minute(
    env: &Env,
    budget: &Budgeted,
    minute: DateTime<Utc>,
    report: &mut SweepReport,
    overdue: &mut Overdue,
    handled: &mut Vec<String>,
) -> Result<bool, StoreError> {
    let slots = read_due(env.kv, minute)?;
    let mut clean = true;
    let listed: Vec<&str> = slots
        .iter()
        .filter_map(|slot| match slot {
            Slot::Id(id) => Some(id.as_str()),
            _ => None,
        })
        .collect();
    let mut requests = load_all(env, &listed);
    // The grants due to close, together, as many as the swaps left before the reconciler's
    // reserve allow; the rest of the minute one by one.
    let mut room = (SWAP_BUDGET - RECONCILE_RESERVE).saturating_sub(budget.used() + BATCH_SWAPS);
    let mut batch: Vec<Versioned<AccessRequest>> = Vec::new();
    let mut lists: Vec<String> = Vec::new();
    for id in &listed {
        let due = matches!(requests.get(*id), Some(Ok(Some(request)))
            if request.value.state == State::Active && request.value.ends_at.is_some_and(|end| end <= env.now));
        if !due || batch.iter().any(|grant| grant.value.id.as_str() == *id) {
            continue;
        }
        let Some(Ok(Some(grant))) = requests.get(*id) else { continue };
        // Its two saves, and a write of each index list no grant before it in the batch has.
        let touched = [keys::open_of(&grant.value.policy, &grant.value.requester), keys::live(&grant.value.policy)];
        let new_lists: Vec<String> = touched.into_iter().filter(|key| !lists.contains(key)).collect();
        let cost = BATCH_SWAPS_PER_GRANT + new_lists.len() as u32;
        if cost > room {
            report.deferred = true;
            clean = false;
            break;
        }
        room -= cost;
        lists.extend(new_lists);
        if let Some(Ok(Some(request))) = requests.remove(*id) {
            batch.push(request);
        }
    }
    let mut settled = Vec::new();
    if !batch.is_empty() {
        // What the close will read before its swaps, for the whole batch.
        let results = super::expiry::close_due(env, &mut batch);
        for (grant, result) in batch.iter().zip(results) {
            overdue.note(&grant.value, env.now);
            let due = match result {
                Ok(()) => {
                    tally(&grant.value, report);
                    Due::Handled
                }
                Err(error) => {
                    let id = &grant.value.id;
                    eprintln!("sweep: closing {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
                    report.skipped += 1;
                    Due::Again
                }
            };
            settled.push((grant.value.id.to_string(), due));
        }
        // The batch's ARM calls took time: what is left is read afresh.
        let left: Vec<&str> = requests.keys().map(String::as_str).collect();
        requests = load_all(env, &left);
    }
    let mut seen: Vec<&str> = Vec::new();
    for slot in &slots {
        match slot {
            Slot::Id(id) => {
                if seen.contains(&id.as_str()) {
                    continue;
                }
                seen.push(id);
                let due = match settled.iter().position(|(settled, _)| settled == id) {
                    Some(at) => settled.swap_remove(at).1,
                    None if !requests.contains_key(id.as_str()) => continue,
                    None => {
                        if budget.spent() {
                            report.deferred = true;
                            return Ok(false);
                        }
                        let loaded = requests.remove(id.as_str()).unwrap_or(Ok(None));
                        process_due(env, id, loaded, report, overdue)
                    }
                };
                match due {
                    Due::Nothing => {}
                    Due::Handled => handled.push(id.clone()),
                    Due::Again => {
                        handled.push(id.clone());
                        // Kept where the sweep retries every tick, so the minute can complete.
                        if let Err(error) = store::add_to_list(env.kv, keys::ARM_WORK, id, usize::MAX) {
                            eprintln!("sweep: keeping {id} for the next tick: {error}");
                            clean = false;
                        }
                    }
                }
            }
            // A writer between taking its slot and filling it, unless long dead.
            Slot::Empty => clean &= minute + EMPTY_SLOT_GRACE < env.now,
            // Could not be read now: again next tick.
            Slot::Unreadable => {
                report.skipped += 1;
                clean = false;
            }
            // Not an id and never will be: whatever it pointed to, the reconciler's pass over
            // live grants still finds.
            Slot::Garbage => report.skipped += 1,
        }
    }
    if clean && minute + SETTLE < minute_floor(env.now) {
        clear_due(env.kv, minute, slots.len())?;
    }
    Ok(clean)
}

/// Reads the requests a due minute lists, in one round trip (should the batch fail, one by
/// one), as [`load`] does each.
fn load_all(env: &Env, ids: &[&str]) -> HashMap<String, Result<Option<Versioned<AccessRequest>>, String>> {
    let keys: Vec<String> =
        ids.iter().filter_map(|id| RequestId::parse(id).ok()).map(|id| keys::request(&id)).collect();
    keys.iter().for_each(|key| env.kv.forget(key));
    // Fills the cache; `load` then reads each from it (or from the store, if this failed).
    let _ = env.kv.get_many(&keys);
    ids.iter().map(|id| ((*id).to_owned(), load_cached(env, id))).collect()
}

/// Reads a request the sweep was told about: `Ok(None)` when there is none, `Err` when it
/// cannot be read now (the caller keeps the work).
fn load(env: &Env, id: &str) -> Result<Option<Versioned<AccessRequest>>, String> {
    let id = RequestId::parse(id).map_err(|e| e.to_string())?;
    // Fresh: this sweep may have read it a while ago, and another instance changed it since.
    store::load_fresh::<AccessRequest>(env.kv, &keys::request(&id)).map_err(|e| e.to_string())
}

/// As [`load`], from what the invocation's cache holds when it holds it.
fn load_cached(env: &Env, id: &str) -> Result<Option<Versioned<AccessRequest>>, String> {
    let id = RequestId::parse(id).map_err(|e| e.to_string())?;
    store::load::<AccessRequest>(env.kv, &keys::request(&id)).map_err(|e| e.to_string())
}

/// What came of a due entry.
enum Due {
    /// Nothing was due (already handled, or not yet).
    Nothing,
    /// Closed or timed out (or tried: what is left is under `work:arm`).
    Handled,
    /// Could not be handled: it must be seen again.
    Again,
}

/// Closes one due grant, or times out a request that waited too long for approval.
fn process_due(
    env: &Env,
    id: &str,
    loaded: Result<Option<Versioned<AccessRequest>>, String>,
    report: &mut SweepReport,
    overdue: &mut Overdue,
) -> Due {
    let mut request = match loaded {
        Ok(Some(request)) => request,
        Ok(None) => return Due::Nothing,
        Err(reason) => {
            eprintln!("sweep: cannot read due request '{id}', keeping it: {reason}");
            report.skipped += 1;
            return Due::Again;
        }
    };
    if request.value.state == State::Pending && request.value.pending_until.is_some_and(|deadline| deadline <= env.now)
    {
        return match time_out(env, &mut request) {
            Ok(()) => {
                report.timed_out += 1;
                Due::Handled
            }
            Err(error) => {
                eprintln!("sweep: timing out {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
                report.skipped += 1;
                Due::Again
            }
        };
    }
    if request.value.state.needs_arm_work() {
        // Listed under `work:arm` by whoever moved it there, unless a sweep that read it
        // earlier dropped it from the list meanwhile: listed again (a fresh look when it seems
        // listed), for this sweep's pass over that list to finish.
        return match store::add_to_list(env.kv, keys::ARM_WORK, id, usize::MAX) {
            Ok(()) => Due::Nothing,
            Err(error) => {
                eprintln!("sweep: listing {id} for its ARM work: {error}");
                report.skipped += 1;
                Due::Again
            }
        };
    }
    let due = request.value.ends_at.is_some_and(|end| end <= env.now);
    if request.value.state != State::Active || !due {
        // Not due to end: perhaps due a notice (a reminder, a warning before its end).
        return match super::notices::send_due(env, &mut request) {
            Ok(_) => Due::Nothing,
            Err(error) => {
                eprintln!("sweep: notices of {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
                report.skipped += 1;
                Due::Again
            }
        };
    }
    // What the close will read before its swaps (the requester's open list, the policy's
    // live list, the ARM work list, the audit head): one batch, or none once cached.
    env.prefetch(&request.value.policy, &request.value.requester);
    let result = grants::close(env, &mut request, Event::Due, None);
    overdue.note(&request.value, env.now);
    match result {
        Ok(()) => {
            tally(&request.value, report);
            Due::Handled
        }
        Err(error) => {
            eprintln!("sweep: closing {id}: {}", error.internal.as_deref().unwrap_or(&error.message));
            report.skipped += 1;
            Due::Again
        }
    }
}

/// Retries the open or close of one request listed under `work:arm`, closes a listed grant
/// that is past its end, and drops what has nothing left to do. An unreadable record stays
/// listed.
fn finish_arm_work(env: &Env, id: &str, report: &mut SweepReport, overdue: &mut Overdue) {
    let mut request = match load(env, id) {
        Ok(Some(request)) => request,
        Ok(None) => {
            // A listed id with no record has nothing left to do (no rule was ever named).
            let _ = store::remove_from_list(env.kv, keys::ARM_WORK, id);
            return;
        }
        Err(reason) => {
            eprintln!("sweep: cannot read listed request '{id}', keeping it: {reason}");
            report.skipped += 1;
            return;
        }
    };
    let before = request.value.state;
    if before.needs_arm_work() {
        // What the retry will read before its swaps (see `process_due`).
        env.prefetch(&request.value.policy, &request.value.requester);
    }
    let result = match before {
        State::Approved => {
            let policy = match store::load(env.kv, &keys::policy(&request.value.policy)) {
                Ok(policy) => policy.map(|p: Versioned<crate::domain::Policy>| p.value),
                Err(error) => {
                    eprintln!("sweep: cannot read policy of '{id}', keeping it: {error}");
                    report.skipped += 1;
                    return;
                }
            };
            grants::retry_open(env, &mut request, policy.as_ref())
        }
        State::Revoking { .. } => grants::finish_close(env, &mut request),
        // Its timeout's due entry could not be handled: time it out here.
        State::Pending if request.value.pending_until.is_some_and(|deadline| deadline <= env.now) => {
            time_out(env, &mut request)
        }
        State::Active if request.value.ends_at.is_some_and(|end| end <= env.now) => {
            grants::close(env, &mut request, Event::Due, None)
        }
        State::Pending
        | State::Active
        | State::Expired
        | State::Revoked
        | State::Denied
        | State::Cancelled
        | State::TimedOut
        | State::Failed => store::remove_from_list(env.kv, keys::ARM_WORK, id).map_err(ApiError::from),
    };
    overdue.note(&request.value, env.now);
    match result {
        Ok(()) if before != request.value.state || before.needs_arm_work() => tally(&request.value, report),
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

pub(crate) fn tally(request: &AccessRequest, report: &mut SweepReport) {
    match request.state {
        State::Expired | State::Revoked => report.closed += 1,
        State::Active => report.opened += 1,
        State::Failed => report.failed += 1,
        State::Approved | State::Revoking { .. } => report.retrying += 1,
        State::Pending | State::Denied | State::Cancelled | State::TimedOut => {}
    }
}
