//! The stored trail: appending under concurrent instances, and reading it back by sequence
//! number (pages, ranges, verification) without ever listing the store.
//!
//! `audit:head` holds the last event in full and moves by compare-and-swap: an appender reads
//! it, seals its event after it and swaps it in, retrying when another instance got there
//! first, so sequence numbers are contiguous and the chain never forks. Every event is also
//! written to `audit:e:<seq>` right after its swap; an appender that dies in between leaves
//! its event in the head, and the next appender copies it to its key before moving on, so no
//! event is lost. One append costs two reads, one compare-and-swap and one write.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::chain::{AuditEvent, Checkpoint, Outcome, Subject, Verification, Verifier};
use crate::keys;
use crate::store::{self, KvStore, StoreError};

/// Swaps tried before an append gives up (each failure means another event went in first).
const APPEND_ATTEMPTS: usize = 64;

/// An audited fact before the trail numbers, times and seals it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// A principal, or `system`.
    pub actor: String,
    /// The actor's name for people to read, when it has one.
    pub actor_name: Option<String>,
    /// What happened (`request.created`, `rule.put`...).
    pub action: &'static str,
    /// What it happened to.
    pub subject: Subject,
    /// The caller's address, when there was a caller.
    pub source_ip: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Anything else worth keeping (never secrets or tokens).
    pub details: serde_json::Value,
}

impl Record {
    fn into_event(self, at: DateTime<Utc>) -> AuditEvent {
        AuditEvent {
            seq: 0,
            at,
            actor: self.actor,
            actor_name: self.actor_name,
            action: self.action.to_owned(),
            subject: self.subject,
            source_ip: self.source_ip,
            outcome: self.outcome,
            details: self.details,
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// How often the trail signs its head, and with what key.
#[derive(Clone, Copy, Debug)]
pub struct Checkpointing<'a> {
    /// The HMAC key (a secret variable).
    pub key: &'a [u8],
    /// A checkpoint every this many events.
    pub every: u64,
}

/// Appends a record at `now` (or at the last event's time, if that is later: times never go
/// backwards along the chain, whatever the instances' clocks say) and answers the sealed event.
pub fn append(
    kv: &dyn KvStore,
    record: Record,
    now: DateTime<Utc>,
    checkpointing: Option<Checkpointing>,
) -> Result<AuditEvent, StoreError> {
    let mut events = append_all(kv, vec![record], now, checkpointing)?;
    Ok(events.pop().expect("one record, one event"))
}

/// Appends several records as one step: one swap of the head for all of them, numbered and
/// chained in order exactly as single appends would be. The head holds the whole batch until
/// the next appender has archived it, so a crash after the swap loses none of them.
pub fn append_all(
    kv: &dyn KvStore,
    records: Vec<Record>,
    now: DateTime<Utc>,
    checkpointing: Option<Checkpointing>,
) -> Result<Vec<AuditEvent>, StoreError> {
    let (events, archive) = append_unarchived(kv, records, now, checkpointing)?;
    file(kv, &events, &archive);
    Ok(events)
}

/// Files appended events under their own keys. Nothing may report the append as failed
/// now (its caller would not make the change, and the trail would show one that never
/// happened): an archive write that fails is done by the next appender.
pub fn file(kv: &dyn KvStore, events: &[AuditEvent], archive: &[(String, Vec<u8>)]) {
    if archive.is_empty() {
        return;
    }
    if let Err(error) = kv.set_many(archive) {
        report_unfiled(events, &error);
    }
}

/// Says which events stay in the head because their archive write failed.
pub fn report_unfiled(events: &[AuditEvent], error: &StoreError) {
    if let (Some(first), Some(last)) = (events.first(), events.last()) {
        eprintln!(
            "audit: events {}..={} stay in the head until the next append archives them: {error}",
            first.seq, last.seq
        );
    }
}

/// The writes that file appended events under their own keys.
pub type ArchiveWrites = Vec<(String, Vec<u8>)>;

/// As [`append_all`], leaving the events' archive writes to the caller, who makes them with
/// writes of its own in one batch (see [`file`]); until then the head holds the events.
pub fn append_unarchived(
    kv: &dyn KvStore,
    records: Vec<Record>,
    now: DateTime<Utc>,
    checkpointing: Option<Checkpointing>,
) -> Result<(Vec<AuditEvent>, ArchiveWrites), StoreError> {
    if records.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    for _ in 0..APPEND_ATTEMPTS {
        let head_bytes = kv.get(keys::AUDIT_HEAD)?;
        let last_batch = head_bytes.as_deref().map(parse_head).transpose()?.unwrap_or_default();
        archive(kv, &last_batch)?;
        let mut previous = last_batch.last().map(|l| (l.seq, l.hash.clone(), l.at));
        let mut events = Vec::with_capacity(records.len());
        for record in &records {
            let at = previous.as_ref().map_or(now, |(_, _, at)| now.max(*at));
            let event =
                record.clone().into_event(at).seal(previous.as_ref().map(|(seq, hash, _)| (*seq, hash.as_str())));
            previous = Some((event.seq, event.hash.clone(), event.at));
            events.push(event);
        }
        let bytes = match events.as_slice() {
            [one] => serde_json::to_vec(one),
            batch => serde_json::to_vec(&HeadBatch { batch: batch.to_vec() }),
        }
        .map_err(|e| StoreError::Backend(e.to_string()))?;
        if !kv.compare_and_swap(keys::AUDIT_HEAD, head_bytes.as_deref(), &bytes)? {
            continue;
        }
        // The swap made the events part of the trail: from here on, nothing may report the
        // append as failed (an event that cannot be encoded for its key stays in the head).
        let archive = archived(&events).unwrap_or_default();
        if let Some(checkpointing) = checkpointing
            && let Some(event) = events.iter().find(|e| checkpoint_due(kv, e.seq, checkpointing.every))
            && let Err(error) = save_checkpoint(kv, &Checkpoint::sign(checkpointing.key, event.seq, &event.hash))
        {
            eprintln!("audit: checkpoint at {} not saved (the next one will be): {error}", event.seq);
        }
        return Ok((events, archive));
    }
    Err(StoreError::Conflict { key: keys::AUDIT_HEAD.to_owned() })
}

/// `audit:head` after an append of several events.
#[derive(Serialize, serde::Deserialize)]
struct HeadBatch {
    batch: Vec<AuditEvent>,
}

/// The events of the last append, as `audit:head` holds them: one event, or a batch.
fn parse_head(bytes: &[u8]) -> Result<Vec<AuditEvent>, StoreError> {
    if bytes.starts_with(b"{\"batch\"") {
        let corrupt = |reason: String| StoreError::Corrupt { key: keys::AUDIT_HEAD.to_owned(), reason };
        let head: HeadBatch = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        // One append's events: numbered in a row, each chained to the one before.
        let linked =
            head.batch.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1 && pair[1].prev_hash == pair[0].hash);
        if head.batch.is_empty() || !linked {
            return Err(corrupt("the head's batch is not one run of chained events".into()));
        }
        return Ok(head.batch);
    }
    Ok(vec![parse(keys::AUDIT_HEAD, bytes)?])
}

/// Each event under its own key, as archived.
fn archived(events: &[AuditEvent]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    events
        .iter()
        .map(|event| {
            let bytes = serde_json::to_vec(event).map_err(|e| StoreError::Backend(e.to_string()))?;
            Ok((keys::audit_event(event.seq), bytes))
        })
        .collect()
}

/// Copies the head's events that are missing from their own keys (their appender died
/// before filing them): one round trip to look, whatever the batch's size. Never overwrites
/// an archived event.
fn archive(kv: &dyn KvStore, batch: &[AuditEvent]) -> Result<(), StoreError> {
    if batch.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = batch.iter().map(|event| keys::audit_event(event.seq)).collect();
    let stored = kv.get_many(&keys)?;
    let missing: Vec<AuditEvent> =
        batch.iter().zip(&stored).filter(|(_, stored)| stored.is_none()).map(|(event, _)| event.clone()).collect();
    if !missing.is_empty() {
        kv.set_many(&archived(&missing)?)?;
    }
    Ok(())
}

fn parse(key: &str, bytes: &[u8]) -> Result<AuditEvent, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

/// How often an append looks whether the stored checkpoints fell behind (the key was just
/// set, or a save failed), and signs its own event if so.
const CHECKPOINT_CATCH_UP: u64 = 100;

/// Whether the event at `seq` is to be signed: every `every` events, and at the next
/// hundredth when the latest stored checkpoint is missing or a period behind.
fn checkpoint_due(kv: &dyn KvStore, seq: u64, every: u64) -> bool {
    every > 0
        && (seq.is_multiple_of(every)
            || seq.is_multiple_of(CHECKPOINT_CATCH_UP)
                && latest_checkpoint(kv).ok().flatten().is_none_or(|latest| latest.seq + every <= seq))
}

/// Stores a checkpoint: once under its own sequence number (never replaced), and as the
/// latest unless a later one is already there.
pub fn save_checkpoint(kv: &dyn KvStore, checkpoint: &Checkpoint) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(checkpoint).map_err(|e| StoreError::Backend(e.to_string()))?;
    // Written once: a swap over the absent key (a second signing of one event changes nothing).
    kv.compare_and_swap(&keys::audit_checkpoint_at(checkpoint.seq), None, &bytes)?;
    store::update::<Checkpoint, _>(kv, keys::AUDIT_CHECKPOINT, |stored| match stored {
        Some(stored) if stored.seq >= checkpoint.seq => None,
        _ => Some(checkpoint.clone()),
    })
    .map(drop)
}

/// With a key configured, checkpoints must keep up with the trail: the latest must be at or
/// after the last multiple of `every` the head has passed, and it must stand in the
/// append-only record. A checkpoint that is missing, or an older genuine one put back in its
/// place (to hide a cut tail), is reported, not skipped.
fn check_checkpoint_record(
    kv: &dyn KvStore,
    verifier: &mut Verifier,
    last: u64,
    every: u64,
    latest: Option<&Checkpoint>,
) -> Result<(), StoreError> {
    let due = last / every * every;
    if due == 0 {
        return Ok(());
    }
    match latest {
        None => verifier.fail(due, format!("no checkpoint is stored, though one is due at event {due}")),
        Some(latest) if latest.seq < due => verifier.fail(
            due,
            format!(
                "the latest checkpoint is at event {}, before the one due at {due}: it was put back or lost",
                latest.seq
            ),
        ),
        Some(latest) => {
            let recorded = store_get_checkpoint(kv, latest.seq)?;
            if recorded.as_ref() != Some(latest) {
                verifier.fail(
                    latest.seq,
                    format!("the checkpoint at event {} is not in the append-only record", latest.seq),
                );
            }
        }
    }
    Ok(())
}

fn store_get_checkpoint(kv: &dyn KvStore, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
    let key = keys::audit_checkpoint_at(seq);
    kv.get(&key)?
        .map(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt { key: key.clone(), reason: e.to_string() })
        })
        .transpose()
}

/// The latest stored checkpoint.
pub fn latest_checkpoint(kv: &dyn KvStore) -> Result<Option<Checkpoint>, StoreError> {
    Ok(store::load::<Checkpoint>(kv, keys::AUDIT_CHECKPOINT)?.map(|v| v.value))
}

/// The last event, if any.
pub fn head(kv: &dyn KvStore) -> Result<Option<AuditEvent>, StoreError> {
    Ok(head_batch(kv)?.pop())
}

/// Event `seq` of the head's batch, if it is one of them.
pub fn in_batch(batch: &[AuditEvent], seq: u64) -> Option<&AuditEvent> {
    batch.iter().find(|event| event.seq == seq)
}

/// The events of the last append (empty before the first): the only copy of any its
/// appender died before archiving.
pub fn head_batch(kv: &dyn KvStore) -> Result<Vec<AuditEvent>, StoreError> {
    Ok(kv.get(keys::AUDIT_HEAD)?.as_deref().map(parse_head).transpose()?.unwrap_or_default())
}

/// What the store holds at one sequence number.
#[derive(Clone, Debug, PartialEq)]
pub enum Slot {
    /// A readable event.
    Event(Box<AuditEvent>),
    /// Nothing: deleted, or never written.
    Missing,
    /// Something that is not an event.
    Unreadable(String),
}

/// The stored event number `seq`.
pub fn read(kv: &dyn KvStore, seq: u64) -> Result<Slot, StoreError> {
    Ok(match kv.get(&keys::audit_event(seq))? {
        None => Slot::Missing,
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(event) => Slot::Event(Box::new(event)),
            Err(e) => Slot::Unreadable(e.to_string()),
        },
    })
}

/// Events `from..=to` in order, as far as they are readable (missing ones are skipped: the
/// chain shows the gap). Events only the head holds yet are read from it.
pub fn range(kv: &dyn KvStore, from: u64, to: u64) -> impl Iterator<Item = Result<AuditEvent, StoreError>> + '_ {
    let mut batch = None;
    (from.max(1)..=to).filter_map(move |seq| match read(kv, seq) {
        Ok(Slot::Event(event)) => Some(Ok(*event)),
        Ok(Slot::Missing) => {
            let batch = match batch.get_or_insert_with(|| head_batch(kv)) {
                Ok(batch) => batch,
                Err(error) => return Some(Err(error.clone())),
            };
            in_batch(batch, seq).cloned().map(Ok)
        }
        Ok(Slot::Unreadable(_)) => None,
        Err(e) => Some(Err(e)),
    })
}

/// The result of verifying the stored trail (or a range of it).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredVerification {
    /// The first event checked.
    pub from: u64,
    /// The last event checked.
    pub to: u64,
    /// The chain walk.
    #[serde(flatten)]
    pub chain: Verification,
    /// The latest checkpoint, when one is configured and stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointStatus>,
}

/// What became of the latest checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckpointStatus {
    /// Its sequence number.
    pub seq: u64,
    /// Whether the trail reaches it, through it, under a genuine signature.
    pub verified: bool,
}

/// Walks stored events `from..=to` (clamped to the head), reporting the first broken link by
/// sequence number: a changed, missing, unreadable or reordered event, a head that is not the
/// last event, or (with a key) a tail cut off before the latest checkpoint.
pub fn verify_stored(
    kv: &dyn KvStore,
    from: u64,
    to: Option<u64>,
    checkpointing: Option<Checkpointing>,
) -> Result<StoredVerification, StoreError> {
    let key = checkpointing.map(|c| c.key);
    let from = from.max(1);
    let batch = head_batch(kv)?;
    let head = batch.last().cloned();
    let last = head.as_ref().map_or(0, |h| h.seq);
    let to = to.map_or(last, |to| to.min(last));
    let mut verifier = Verifier::new(None);
    if from > 1 {
        match read(kv, from - 1)? {
            Slot::Event(before) => verifier = Verifier::new(Some((before.seq, before.hash))),
            Slot::Missing if let Some(before) = in_batch(&batch, from - 1) => {
                verifier = Verifier::new(Some((before.seq, before.hash.clone())));
            }
            Slot::Missing => verifier.fail(from - 1, format!("event {} is missing from the store", from - 1)),
            Slot::Unreadable(why) => verifier.fail(from - 1, format!("event {} is unreadable: {why}", from - 1)),
        }
    }
    let checkpoint = match key {
        Some(_) => latest_checkpoint(kv)?,
        None => None,
    };
    let latest = checkpoint.clone();
    let mut at_checkpoint = None;
    for seq in from..=to {
        if verifier.is_broken() {
            break;
        }
        match read(kv, seq)? {
            Slot::Event(event) => {
                let hash = event.hash.clone();
                if verifier.push(*event) && checkpoint.as_ref().is_some_and(|c| c.seq == seq) {
                    at_checkpoint = Some(hash);
                }
            }
            Slot::Missing if let Some(event) = in_batch(&batch, seq) => {
                // Its appender died before archiving it; the head holds it.
                verifier.push(event.clone());
            }
            Slot::Missing => verifier.fail(seq, format!("event {seq} is missing from the store")),
            Slot::Unreadable(why) => verifier.fail(seq, format!("event {seq} is unreadable: {why}")),
        }
    }
    if let (Some(head), Some((seq, hash)), false) = (&head, verifier.last(), verifier.is_broken())
        && *seq == head.seq
        && *hash != head.hash
    {
        verifier.fail(head.seq, "the head is not the stored last event: one of them was replaced".into());
    }
    let checkpoint = match (checkpoint, key) {
        (Some(checkpoint), Some(key)) => {
            let verified = if !checkpoint.is_genuine(key) {
                verifier.fail(checkpoint.seq, "the latest checkpoint's signature is not genuine".into());
                false
            } else if checkpoint.seq > last {
                verifier.fail(
                    last + 1,
                    format!(
                        "the trail ends at {last}, before its checkpoint at {}: its tail was cut off",
                        checkpoint.seq
                    ),
                );
                false
            } else if let Some(hash) = at_checkpoint {
                let same = hash == checkpoint.hash;
                if !same {
                    verifier.fail(checkpoint.seq, "the event at the checkpoint has another hash".into());
                }
                same
            } else {
                false
            };
            Some(CheckpointStatus { seq: checkpoint.seq, verified })
        }
        _ => None,
    };
    if let Some(checkpointing) = checkpointing.filter(|c| c.every > 0 && to == last) {
        check_checkpoint_record(kv, &mut verifier, last, checkpointing.every, latest.as_ref())?;
    }
    Ok(StoredVerification { from, to, chain: verifier.finish(), checkpoint })
}

/// Which events a listing wants.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// At or after this time.
    pub since: Option<DateTime<Utc>>,
    /// At or before this time.
    pub until: Option<DateTime<Utc>>,
    /// By this actor.
    pub actor: Option<String>,
    /// This action (`request.created`), or a family of them (`request.`).
    pub action: Option<String>,
    /// About this request.
    pub request: Option<String>,
    /// About this policy.
    pub policy: Option<String>,
}

impl Filter {
    fn matches(&self, event: &AuditEvent) -> bool {
        let action_ok = self
            .action
            .as_deref()
            .is_none_or(|wanted| event.action == wanted || (wanted.ends_with('.') && event.action.starts_with(wanted)));
        action_ok
            && self.since.is_none_or(|since| event.at >= since)
            && self.until.is_none_or(|until| event.at <= until)
            && self.actor.as_deref().is_none_or(|actor| event.actor == actor)
            && self.request.as_deref().is_none_or(|r| event.subject.request.as_deref() == Some(r))
            && self.policy.as_deref().is_none_or(|p| event.subject.policy.as_deref() == Some(p))
    }
}

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Page {
    /// Matching events, oldest first.
    pub events: Vec<AuditEvent>,
    /// Where the next page starts (pass it back as `cursor`); `None` at the end.
    pub next_cursor: Option<String>,
}

/// Events one page reads at most, so a selective filter over a long trail answers in bounded
/// time and hands back a cursor instead.
pub const SCAN_BUDGET: u64 = 5_000;

/// Matching events after `cursor` (a sequence number from a previous page), else from the
/// first event at or after `since` (found by bisection: times never decrease along the chain).
pub fn page(kv: &dyn KvStore, filter: &Filter, cursor: Option<u64>, limit: usize) -> Result<Page, StoreError> {
    let batch = head_batch(kv)?;
    let Some(head) = batch.last() else { return Ok(Page { events: Vec::new(), next_cursor: None }) };
    let start = match (cursor, filter.since) {
        (Some(after), _) => after + 1,
        (None, Some(since)) => first_at_or_after(kv, since, head.seq)?,
        (None, None) => 1,
    }
    .max(1);
    let end = head.seq.min(start.saturating_add(SCAN_BUDGET - 1));
    let mut events = Vec::new();
    let mut last_read = start - 1;
    for seq in start..=end {
        last_read = seq;
        let event = match read(kv, seq)? {
            Slot::Event(event) => *event,
            Slot::Missing if let Some(event) = in_batch(&batch, seq) => event.clone(),
            Slot::Missing | Slot::Unreadable(_) => continue,
        };
        if filter.until.is_some_and(|until| event.at > until) {
            return Ok(Page { events, next_cursor: None });
        }
        if filter.matches(&event) {
            events.push(event);
            if events.len() == limit {
                break;
            }
        }
    }
    let next_cursor = (last_read < head.seq).then(|| last_read.to_string());
    Ok(Page { events, next_cursor })
}

/// The first sequence number whose event is at or after `since`.
fn first_at_or_after(kv: &dyn KvStore, since: DateTime<Utc>, last: u64) -> Result<u64, StoreError> {
    let (mut low, mut high) = (1, last + 1);
    while low < high {
        let middle = low + (high - low) / 2;
        match read(kv, middle)? {
            Slot::Event(event) if event.at < since => low = middle + 1,
            Slot::Event(_) => high = middle,
            // A hole: scan from here rather than guess.
            Slot::Missing | Slot::Unreadable(_) => return Ok(low),
        }
    }
    Ok(low)
}

#[cfg(test)]
mod tests;
