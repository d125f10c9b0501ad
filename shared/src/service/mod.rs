//! The operations the components expose. Each takes an [`Env`] (the ports and the time,
//! read once per invocation) and the authenticated caller, and returns an API answer.

pub mod audit;
pub mod decisions;
pub mod expiry;
pub mod fleet;
pub mod grants;
pub mod health;
pub mod inbound;
pub mod links;
pub mod notices;
pub mod policies;
pub mod reconcile;
pub mod requests;
pub mod sweep;
pub mod throttle;
pub mod webhooks;
pub mod whoami;

use std::cell::RefCell;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::api::ApiError;
use crate::arm::Arm;
use crate::audit::log::{self, Checkpointing};
use crate::audit::{AuditEvent, Outcome, Record, Subject};
use crate::config::Config;
use crate::domain::{AccessRequest, Policy, PolicyName, Principal, RequestId};
use crate::http::Clock;
use crate::keys;
use crate::store::{self, KvStore, Versioned};

/// Tries at recording that a change which was recorded ahead did not happen.
const FAILURE_RECORD_ATTEMPTS: usize = 4;

/// Who set an invocation off, as the audit trail names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The authenticated principal, or `system` (the sweep) or `anonymous`.
    pub actor: String,
    /// The principal's name for people to read, when it has one.
    pub actor_name: Option<String>,
    /// The caller's address, when there was a caller.
    pub source_ip: Option<IpAddr>,
}

impl Origin {
    /// The service itself (the sweep).
    pub fn system() -> Self {
        Self { actor: "system".into(), actor_name: None, source_ip: None }
    }

    /// A caller who could not be authenticated.
    pub fn anonymous(source_ip: Option<IpAddr>) -> Self {
        Self { actor: "anonymous".into(), actor_name: None, source_ip }
    }

    /// An authenticated caller.
    pub fn of(caller: &crate::auth::Caller, source_ip: Option<IpAddr>) -> Self {
        Self { actor: caller.principal.to_string(), actor_name: caller.display_name.clone(), source_ip }
    }
}

/// What an operation works with.
pub struct Env<'a> {
    /// The key-value store.
    pub kv: &'a dyn KvStore,
    /// Azure Resource Manager.
    pub arm: &'a dyn Arm,
    /// Configuration.
    pub config: &'a Config,
    /// The time of this invocation: what its decisions are made at.
    pub now: DateTime<Utc>,
    /// The clock itself, for the few times that must be read fresh (an ARM call can take
    /// seconds: a grant's end is counted from when its rule is confirmed, not from before).
    pub clock: &'a dyn Clock,
    /// Who the audit trail names for what this invocation does.
    pub origin: Origin,
    /// Events waiting to go into the trail with the next append (see [`Env::defer`]).
    deferred: RefCell<Vec<Record>>,
}

impl<'a> Env<'a> {
    /// An invocation's ports, time and actor.
    pub fn new(
        kv: &'a dyn KvStore,
        arm: &'a dyn Arm,
        config: &'a Config,
        now: DateTime<Utc>,
        clock: &'a dyn Clock,
        origin: Origin,
    ) -> Self {
        Self { kv, arm, config, now, clock, origin, deferred: RefCell::default() }
    }
}

impl Drop for Env<'_> {
    /// Events still deferred when the invocation ends (an error cut it short) are written now.
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            eprintln!("audit: events deferred to the end of the invocation were not recorded: {}", error.message);
        }
    }
}

impl Env<'_> {
    /// The same invocation over another store (a wrapper that counts or bounds its use).
    pub fn with_store<'b>(&'b self, kv: &'b dyn KvStore) -> Env<'b> {
        Env::new(kv, self.arm, self.config, self.now, self.clock, self.origin.clone())
    }

    /// The same invocation with another ARM client.
    pub fn with_arm<'b>(&'b self, arm: &'b dyn Arm) -> Env<'b> {
        Env::new(self.kv, arm, self.config, self.now, self.clock, self.origin.clone())
    }

    /// The time now, never before the invocation's.
    pub fn fresh_now(&self) -> DateTime<Utc> {
        self.clock.now().max(self.now)
    }

    /// Reads in one round trip what a change of a request by `requester` under `policy` reads
    /// next: the policy, its indexes, and what opening or closing a rule touches. The store's
    /// cache answers those reads from then on; should this fail, they happen one by one.
    pub fn prefetch(&self, policy: &PolicyName, requester: &Principal) {
        let keys = [
            keys::policy(policy),
            keys::open_of(policy, requester),
            keys::live(policy),
            keys::pending(policy),
            keys::SWEEP_CURSOR.to_owned(),
            keys::ARM_WORK.to_owned(),
            keys::ARM_TOKEN.to_owned(),
            keys::AUDIT_HEAD.to_owned(),
            keys::WEBHOOKS.to_owned(),
        ];
        let _ = self.kv.get_many(&keys);
    }

    /// Loads a request by the id in a path with what changing it reads (see [`Env::prefetch`]),
    /// or 404.
    pub fn request_to_change(&self, id: &str) -> Result<Versioned<AccessRequest>, ApiError> {
        let request = self.request(id)?;
        self.prefetch(&request.value.policy, &request.value.requester);
        Ok(request)
    }

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

    /// Saves a request at the version it was read, after the events deferred so far (the
    /// trail is written ahead of every change).
    pub fn save_request(&self, request: &mut Versioned<AccessRequest>) -> Result<(), ApiError> {
        self.flush()?;
        request.version =
            store::save(self.kv, &keys::request(&request.value.id), &request.value, Some(request.version))?;
        Ok(())
    }

    /// Appends an event by this invocation's actor to the audit trail, after any deferred ones
    /// (in the same append). An event that cannot be recorded fails the operation: nothing
    /// changes unaudited.
    pub fn record(
        &self,
        action: &'static str,
        subject: Subject,
        outcome: Outcome,
        details: serde_json::Value,
    ) -> Result<AuditEvent, ApiError> {
        let record = self.record_of(action, subject, outcome, details);
        let mut events = self.append([record])?;
        Ok(events.pop().expect("the record's own event is last"))
    }

    /// Queues an event to go into the trail with the next one this invocation records, or
    /// before its next save of a request, or when it ends, whichever comes first: one append
    /// (one swap of the head) for several events. For facts the caller records a change of
    /// right after (an ARM write, then the request it changed).
    pub fn defer(&self, action: &'static str, subject: Subject, outcome: Outcome, details: serde_json::Value) {
        let record = self.record_of(action, subject, outcome, details);
        self.deferred.borrow_mut().push(record);
    }

    /// Writes the deferred events now.
    pub fn flush(&self) -> Result<(), ApiError> {
        if self.deferred.borrow().is_empty() {
            return Ok(());
        }
        self.append(None).map(drop)
    }

    fn record_of(
        &self,
        action: &'static str,
        subject: Subject,
        outcome: Outcome,
        details: serde_json::Value,
    ) -> Record {
        Record {
            actor: self.origin.actor.clone(),
            actor_name: self.origin.actor_name.clone(),
            action,
            subject,
            source_ip: self.origin.source_ip.map(|ip| ip.to_string()),
            outcome,
            details,
        }
    }

    /// Appends events by this invocation's actor, after any deferred ones, in one append (one
    /// swap of the head): for a batch of changes the caller makes next, each event written
    /// ahead of its change. Nothing is queued when the append fails.
    pub fn record_all(
        &self,
        events: impl IntoIterator<Item = (&'static str, Subject, Outcome, serde_json::Value)>,
    ) -> Result<(), ApiError> {
        let records = events
            .into_iter()
            .map(|(action, subject, outcome, details)| self.record_of(action, subject, outcome, details));
        self.append(records.collect::<Vec<_>>()).map(drop)
    }

    /// Appends the deferred events and `records`; on failure the deferred ones stay queued.
    fn append(&self, records: impl IntoIterator<Item = Record>) -> Result<Vec<AuditEvent>, ApiError> {
        let (events, archive) = self.append_unfiled(records)?;
        log::file(self.kv, &events, &archive);
        Ok(events)
    }

    /// As [`Env::append`], answering the events' archive writes for the caller to make.
    fn append_unfiled(
        &self,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<(Vec<AuditEvent>, log::ArchiveWrites), ApiError> {
        let mut queued = std::mem::take(&mut *self.deferred.borrow_mut());
        let deferred = queued.len();
        queued.extend(records);
        let mut records = queued;
        let audit = &self.config.audit;
        let checkpointing = audit
            .checkpoint_key
            .as_ref()
            .map(|key| Checkpointing { key: key.expose().as_bytes(), every: audit.checkpoint_every });
        log::append_unarchived(self.kv, records.clone(), self.now, checkpointing).map_err(|e| {
            records.truncate(deferred);
            self.deferred.borrow_mut().splice(0..0, records);
            ApiError::internal(format!("appending to the audit trail: {e}"))
        })
    }

    /// Records a change, then makes it: the event is written ahead of the change, and a change
    /// whose event cannot be written is not made. Should the change then fail (a lost race), a
    /// `failed` event with the same action follows, so the trail never shows a change that did
    /// not happen without saying so.
    pub fn audited<T>(
        &self,
        action: &'static str,
        subject: Subject,
        details: serde_json::Value,
        change: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.record(action, subject.clone(), Outcome::Ok, details)?;
        change().inspect_err(|error| self.record_failure(action, subject, error))
    }

    /// As [`Env::audited`], for a change that is a batch of plain writes (keys no one else
    /// can know yet), recorded by `before` (facts of the same change, such as a break-glass
    /// use) and `action`: the events' archive writes go into the same batch, one round trip in
    /// all. Until that batch lands, the trail's head holds the events. Should the append fail,
    /// none of these events is kept for a later one: the change was not made.
    pub fn audited_writes(
        &self,
        before: Vec<(&'static str, serde_json::Value)>,
        action: &'static str,
        subject: Subject,
        details: serde_json::Value,
        writes: Vec<(String, Vec<u8>)>,
    ) -> Result<(), ApiError> {
        let records: Vec<Record> = before
            .into_iter()
            .chain([(action, details)])
            .map(|(action, details)| self.record_of(action, subject.clone(), Outcome::Ok, details))
            .collect();
        let (events, mut batch) = self.append_unfiled(records)?;
        batch.extend(writes);
        self.kv.set_many(&batch).map_err(|error| {
            log::report_unfiled(&events, &error);
            let error = ApiError::from(error);
            self.record_failure(action, subject, &error);
            error
        })
    }

    /// Records that a change recorded ahead failed. The trail must not claim a change that did
    /// not happen: a store that just failed the change may fail once more, so the correction
    /// is tried a few times. Only a lost race is sure not to have written; a store error may
    /// hide a write that landed (Cosmos DB reports every error as a failed swap).
    pub(crate) fn record_failure(&self, action: &'static str, subject: Subject, error: &ApiError) {
        let saved = if error.is_concurrent_update() { json!(false) } else { json!("unknown") };
        let details = json!({"error": error.message, "saved": saved});
        let recorded = (0..FAILURE_RECORD_ATTEMPTS)
            .any(|_| self.record(action, subject.clone(), Outcome::Failed, details.clone()).is_ok());
        if !recorded {
            eprintln!("audit: could not record that {action} on {subject:?} failed: {}", error.message);
        }
    }

    /// Records a change of a request (with the state it moves to), then saves it.
    pub fn commit(
        &self,
        request: &mut Versioned<AccessRequest>,
        action: &'static str,
        mut details: serde_json::Value,
    ) -> Result<(), ApiError> {
        if let Some(fields) = details.as_object_mut() {
            fields.insert("state".into(), json!(request.value.state.name()));
        }
        self.audited(action, subject_of(&request.value), details, || self.save_request(request))
    }
}

/// What an event about a request is about.
pub fn subject_of(request: &AccessRequest) -> Subject {
    Subject { request: Some(request.id.to_string()), policy: Some(request.policy.to_string()) }
}

/// What an event about a policy is about.
pub fn subject_of_policy(policy: &PolicyName) -> Subject {
    Subject { request: None, policy: Some(policy.to_string()) }
}

/// A request as the API shows it.
pub fn request_json(request: &AccessRequest) -> serde_json::Value {
    serde_json::to_value(request).unwrap_or_default()
}

#[cfg(test)]
mod tests;
