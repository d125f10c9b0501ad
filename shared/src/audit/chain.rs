//! The hash chain: events, verification that names the first broken link, and HMAC
//! checkpoints that make a cut-off tail detectable.
//!
//! Each event's hash is SHA-256 over its canonical JSON (every field but `hash`, in a fixed
//! order, with `prev_hash` set to the previous event's hash), so changing, deleting or
//! reordering any event breaks the chain at that point. Pure: the same code verifies the
//! stored trail and an exported JSON Lines file offline.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subject {
    /// The request, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The policy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

/// How the audited step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It happened.
    Ok,
    /// It was not allowed (authentication, authorization, policy).
    Refused,
    /// It was tried and failed (ARM, the store).
    Failed,
}

/// One audited fact, as stored and exported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// Position in the chain, from 1, contiguous.
    pub seq: u64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// A principal, or `system`.
    pub actor: String,
    /// The actor's name for people to read (an OIDC token's `name`), when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_name: Option<String>,
    /// What happened (`request.created`, `rule.deleted`...).
    pub action: String,
    /// What it happened to.
    pub subject: Subject,
    /// The caller's address, when there was a caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ip: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// Anything else worth keeping (never secrets or tokens).
    pub details: serde_json::Value,
    /// The previous event's hash ([`GENESIS`] for the first).
    pub prev_hash: String,
    /// This event's hash.
    pub hash: String,
}

/// The hashed part of an event: every field but `hash`, in this order.
#[derive(Serialize)]
struct Canonical<'a> {
    seq: u64,
    at: &'a DateTime<Utc>,
    actor: &'a str,
    // Absent when `None`, so events from before it hash as they did.
    #[serde(skip_serializing_if = "Option::is_none")]
    actor_name: &'a Option<String>,
    action: &'a str,
    subject: &'a Subject,
    source_ip: &'a Option<String>,
    outcome: Outcome,
    details: &'a serde_json::Value,
    prev_hash: &'a str,
}

impl AuditEvent {
    /// The hash this event must carry.
    pub fn compute_hash(&self) -> String {
        let canonical = Canonical {
            seq: self.seq,
            at: &self.at,
            actor: &self.actor,
            actor_name: &self.actor_name,
            action: &self.action,
            subject: &self.subject,
            source_ip: &self.source_ip,
            outcome: self.outcome,
            details: &self.details,
            prev_hash: &self.prev_hash,
        };
        let bytes = serde_json::to_vec(&canonical).expect("an audit event always serialises");
        hex::encode(Sha256::digest(bytes))
    }

    /// Links an event after `previous` (`None`: the first event) and seals it.
    pub fn seal(mut self, previous: Option<(u64, &str)>) -> Self {
        let (seq, prev_hash) = previous.map_or((1, GENESIS), |(seq, hash)| (seq + 1, hash));
        self.seq = seq;
        self.prev_hash = prev_hash.to_owned();
        self.hash = self.compute_hash();
        self
    }
}

/// Where and why a chain breaks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Break {
    /// The first sequence number that does not verify.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// The outcome of walking a chain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Events checked.
    pub checked: u64,
    /// The last good event's sequence number and hash (`{"seq":..,"hash":..}` in JSON).
    #[serde(serialize_with = "link")]
    pub head: Option<(u64, String)>,
    /// The first broken link, if any.
    pub broken: Option<Break>,
}

fn link<S: serde::Serializer>(head: &Option<(u64, String)>, serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Link<'a> {
        seq: u64,
        hash: &'a str,
    }
    head.as_ref().map(|(seq, hash)| Link { seq: *seq, hash }).serialize(serializer)
}

/// Checks events one at a time, in order, remembering the last good link: the walk over the
/// stored trail and over an export share it.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    report: Verification,
}

impl Verifier {
    /// Starts at the chain's beginning (`None`) or after the event with this sequence number
    /// and hash.
    pub fn new(start: Option<(u64, String)>) -> Self {
        Self { report: Verification { head: start, ..Verification::default() } }
    }

    /// The sequence number the next event must carry.
    pub fn expected_seq(&self) -> u64 {
        self.report.head.as_ref().map_or(1, |(seq, _)| seq + 1)
    }

    /// Checks the next event; `false` once the chain is broken (later events are ignored).
    pub fn push(&mut self, event: AuditEvent) -> bool {
        if self.report.broken.is_some() {
            return false;
        }
        let expected_seq = self.expected_seq();
        let expected_prev = self.report.head.as_ref().map_or(GENESIS, |(_, hash)| hash.as_str());
        let reason = if event.seq != expected_seq {
            Some(format!("expected event {expected_seq}, found {}: an event is missing or out of order", event.seq))
        } else if event.prev_hash != expected_prev {
            Some("prev_hash does not match the previous event: the chain was reordered or an event replaced".to_owned())
        } else if event.hash != event.compute_hash() {
            Some("the event's content does not match its hash: it was changed".to_owned())
        } else {
            None
        };
        if let Some(reason) = reason {
            self.fail(expected_seq, reason);
            return false;
        }
        self.report.checked += 1;
        self.report.head = Some((event.seq, event.hash));
        true
    }

    /// Records a break found outside the chain itself (a missing or unreadable record); the
    /// first break stands.
    pub fn fail(&mut self, seq: u64, reason: String) {
        if self.report.broken.is_none() {
            self.report.broken = Some(Break { seq, reason });
        }
    }

    /// The last good event's sequence number and hash.
    pub fn last(&self) -> Option<&(u64, String)> {
        self.report.head.as_ref()
    }

    /// Whether a break was found.
    pub fn is_broken(&self) -> bool {
        self.report.broken.is_some()
    }

    /// The report so far.
    pub fn finish(self) -> Verification {
        self.report
    }
}

/// Walks events in order from `start` (`None`: the chain's beginning; else the sequence number
/// and hash of the event just before the first one given), stopping at the first broken link.
pub fn verify<I: IntoIterator<Item = AuditEvent>>(events: I, start: Option<(u64, String)>) -> Verification {
    let mut verifier = Verifier::new(start);
    for event in events {
        if !verifier.push(event) {
            break;
        }
    }
    verifier.finish()
}

/// A signed statement that the chain had reached `seq` with `hash`: a truncated tail shows as
/// a chain shorter than its last checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The sequence number reached.
    pub seq: u64,
    /// That event's hash.
    pub hash: String,
    /// HMAC-SHA256 over both, hex.
    pub mac: String,
}

fn checkpoint_mac(key: &[u8], seq: u64, hash: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(format!("portcullis-audit-checkpoint:v1:{seq}:{hash}").as_bytes());
    mac
}

impl Checkpoint {
    /// Signs the chain's head.
    pub fn sign(key: &[u8], seq: u64, hash: &str) -> Self {
        Self { seq, hash: hash.to_owned(), mac: hex::encode(checkpoint_mac(key, seq, hash).finalize().into_bytes()) }
    }

    /// Whether the signature is genuine (compared in constant time).
    pub fn is_genuine(&self, key: &[u8]) -> bool {
        hex::decode(&self.mac).is_ok_and(|mac| checkpoint_mac(key, self.seq, &self.hash).verify_slice(&mac).is_ok())
    }

    /// Checks a verified chain against this checkpoint: the chain must reach it, through it.
    pub fn check(&self, key: &[u8], events: &[AuditEvent]) -> Result<(), Break> {
        if !self.is_genuine(key) {
            return Err(Break { seq: self.seq, reason: "the checkpoint's signature is not genuine".into() });
        }
        match events.iter().find(|e| e.seq == self.seq) {
            Some(event) if event.hash == self.hash => Ok(()),
            Some(_) => Err(Break { seq: self.seq, reason: "the event at the checkpoint has another hash".into() }),
            None => Err(Break {
                seq: events.last().map_or(1, |e| e.seq + 1),
                reason: format!("the chain ends before checkpoint {}: its tail was cut off", self.seq),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::at;

    fn event(n: i64) -> AuditEvent {
        AuditEvent {
            seq: 0,
            at: at(n),
            actor: "alice".into(),
            action: "request.created".into(),
            subject: Subject { request: Some(format!("r{n}")), policy: Some("demo-vm".into()) },
            source_ip: Some("203.0.113.7".into()),
            actor_name: None,
            outcome: Outcome::Ok,
            details: serde_json::json!({"ports": [22], "duration": "PT1H"}),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn chain(n: usize) -> Vec<AuditEvent> {
        let mut events: Vec<AuditEvent> = Vec::new();
        for i in 0..n {
            let previous = events.last().map(|e| (e.seq, e.hash.as_str()));
            let sealed = event(i as i64).seal(previous);
            events.push(sealed);
        }
        events
    }

    #[test]
    fn an_untouched_chain_verifies_and_survives_json_lines() {
        let events = chain(5);
        let report = verify(events.clone(), None);
        assert_eq!((report.checked, report.broken.clone()), (5, None));
        let lines: String = events.iter().map(|e| serde_json::to_string(e).unwrap() + "\n").collect();
        let parsed: Vec<AuditEvent> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(verify(parsed, None), report);
    }

    #[test]
    fn a_changed_a_deleted_and_a_reordered_event_are_each_found_at_their_sequence_number() {
        let mut changed = chain(5);
        changed[2].details["ports"] = serde_json::json!([3389]);
        assert_eq!(verify(changed, None).broken.unwrap().seq, 3);

        let mut deleted = chain(5);
        deleted.remove(3);
        assert_eq!(verify(deleted, None).broken.unwrap().seq, 4);

        let mut reordered = chain(5);
        reordered.swap(1, 2);
        assert_eq!(verify(reordered, None).broken.unwrap().seq, 2);

        // Re-sealing a changed event does not help: the next link no longer matches.
        let mut resealed = chain(5);
        resealed[2].actor = "mallory".into();
        resealed[2].hash = resealed[2].compute_hash();
        let broken = verify(resealed, None).broken.unwrap();
        assert_eq!(broken.seq, 4, "{}", broken.reason);
    }

    #[test]
    fn a_range_verifies_from_the_event_before_it() {
        let events = chain(6);
        let start = Some((events[2].seq, events[2].hash.clone()));
        assert_eq!(verify(events[3..].to_vec(), start).checked, 3);
    }

    #[test]
    fn checkpoints_catch_a_cut_off_tail_and_forged_signatures() {
        let key = b"checkpoint key";
        let events = chain(5);
        let checkpoint = Checkpoint::sign(key, 5, &events[4].hash);
        assert_eq!(checkpoint.check(key, &events), Ok(()));
        let truncated = &events[..3];
        assert!(verify(truncated.to_vec(), None).broken.is_none(), "the chain alone cannot tell");
        assert_eq!(checkpoint.check(key, truncated).unwrap_err().seq, 4);
        assert!(!checkpoint.is_genuine(b"another key"));
        let forged = Checkpoint { seq: 3, ..checkpoint.clone() };
        assert!(forged.check(key, &events).is_err());
    }
}
