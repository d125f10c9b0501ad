//! The key layout of the key-value store: the only place a key is spelled.
//!
//! Segments are separated by `:`, never `/`: Azure Cosmos DB, the natural multi-instance store
//! on Azure, refuses keys containing `/`, `\`, `?` or `#`, allows at most 255 characters, and
//! Spin's Cosmos backend puts keys unescaped into a SQL query, so no key may hold `'` either
//! (ids here are letters, digits and `-_.@`, so no key can contain any of them).
//!
//! | key | value |
//! |---|---|
//! | `policy:<name>` | a policy |
//! | `req:<id>` | an access request |
//! | `idx:policies` | names of all policies |
//! | `idx:recent:n` | a counter (`increment` only): requests ever added to the recent index |
//! | `idx:recent:<slot>` | `<number> <id>`: one of the 1,000 most recent requests (slot: number mod 1,000) |
//! | `idx:by:<principal>:n`, `idx:by:<principal>:<slot>` | the same for one requester's requests |
//! | `idx:recent`, `idx:by:<principal>` | before the indexes above: one list document each (read, never written) |
//! | `due:<yyyymmddhhmm>:n` | a counter (`increment` only): slots taken in that minute's due index |
//! | `due:<yyyymmddhhmm>:<k>` | slot `k`: the id of a request whose access ends, or whose wait for approval runs out, in that minute (UTC) |
//! | `work:arm` | ids of requests with unfinished ARM work (open or close), and due ids the sweep must see again |
//! | `sweep:cursor` | the last minute the sweep fully processed |
//! | `sweep:status` | when the last sweep ran and what it left (the health check reads it) |
//! | `probe:swap:<nonce>` | a moment's test of the store's compare-and-swap (deleted right after) |
//! | `drift:<policy>` | the reconciler's last scan of a policy's NSG and what it found |
//! | `reconcile:next` | where the reconciler's round over the policies goes on |
//! | `cache:arm-token` | the cached ARM access token |
//! | `cache:jwks` | the OIDC issuer's key set and when it was fetched |
//! | `open:<policy>:<principal>` | ids of a requester's pending and active requests under a policy |
//! | `live:<policy>` | ids of a policy's active grants (until their rule is confirmed gone) |
//! | `pending:<policy>` | ids of a policy's requests waiting for approval |
//! | `authfail:<yyyymmddhhmm>` | a counter (`increment` only): failed logins in that minute |
//! | `tally:<yyyymmddhhmm>:<kind>:<subject>` | a rate-limit counter (`increment` only) of one principal or address in that minute; kind `fail` (failed logins), `by` (changes by a principal), `from` (changes from an address) |
//! | `tally:<yyyymmddhhmm>:block:<address>` | present when an address is over its failed-login limit in that minute |
//! | `tally:<yyyymmddhhmm>:n` | a counter (`increment` only): slots taken in that minute's tally index |
//! | `tally:<yyyymmddhhmm>:<k>` | slot `k`: the name of a tally key created in that minute (the sweep deletes them) |
//! | `tally:cursor` | the first minute whose tallies the sweep has not deleted yet |
//! | `idx:webhooks` | names of all webhook subscriptions |
//! | `hook:<name>` | a webhook subscription (with its signing secrets) |
//! | `hook:<name>:state` | its delivery state: cursor into the audit trail, queue, backoff |
//! | `hook:<name>:slack:<request>` | the channel and `ts` of the Slack message about a request, until it ends |
//! | `hook:<name>:d:<seq>` | one delivery: the event of audit number `seq`, its body and attempts |
//! | `seen:<integration>:<webhook-id>` | a decision message already taken (replays are refused; deleted by the sweep after the replay window) |
//! | `audit:head` | the audit trail's last event, moved by compare-and-swap |
//! | `audit:e:<seq>` | audit event number `seq` (from 1, contiguous) |
//! | `audit:checkpoint` | the latest signed checkpoint of the audit trail |
//! | `audit:cp:<seq>` | the checkpoint signed at event `seq`, written once |

use chrono::{DateTime, Utc};

use crate::domain::{PolicyName, Principal, RequestId, WebhookName};
use crate::store::Ring;

/// The minute of `at` as `yyyymmddhhmm` (UTC). Written out by hand: chrono's format strings
/// cost 12 KB of every component.
pub fn minute_stamp(at: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    format!("{:04}{:02}{:02}{:02}{:02}", at.year(), at.month(), at.day(), at.hour(), at.minute())
}

/// A policy document.
pub fn policy(name: &PolicyName) -> String {
    format!("policy:{name}")
}

/// An access request document.
pub fn request(id: &RequestId) -> String {
    format!("req:{id}")
}

/// All policy names.
pub const POLICIES: &str = "idx:policies";
/// Entries the indexes of recent requests keep.
pub const RECENT_CAP: u64 = 1000;

/// The most recent requests.
pub fn recent_requests() -> Ring {
    Ring::new("idx:recent".into(), RECENT_CAP)
}

/// One requester's recent requests.
pub fn requests_by(principal: &Principal) -> Ring {
    Ring::new(format!("idx:by:{principal}"), RECENT_CAP)
}

/// The recent requests as earlier versions kept them: one list document.
pub const LEGACY_RECENT_REQUESTS: &str = "idx:recent";

/// One requester's recent requests as earlier versions kept them.
pub fn legacy_requests_by(principal: &Principal) -> String {
    format!("idx:by:{principal}")
}
/// Requests with ARM work outstanding.
pub const ARM_WORK: &str = "work:arm";
/// The sweep's progress through the due index.
pub const SWEEP_CURSOR: &str = "sweep:cursor";
/// The cached ARM token.
pub const ARM_TOKEN: &str = "cache:arm-token";
/// The cached OIDC key set.
pub const JWKS: &str = "cache:jwks";

/// How many slots the due index of the minute of `at` has handed out (a counter).
pub fn due_count(at: DateTime<Utc>) -> String {
    format!("due:{}:n", minute_stamp(at))
}

/// Slot `slot` (from 1) of the due index of the minute of `at`: one request id.
pub fn due_slot(at: DateTime<Utc>, slot: i64) -> String {
    format!("due:{}:{slot}", minute_stamp(at))
}

/// A policy's requests waiting for approval (cancelled when it is disabled or deleted).
pub fn pending(policy: &PolicyName) -> String {
    format!("pending:{policy}")
}

/// Failed logins in the minute of `at` (a counter, `increment` only).
pub fn auth_failures(at: DateTime<Utc>) -> String {
    format!("authfail:{}", minute_stamp(at))
}

/// A rate-limit counter: `kind` of `subject` in the minute of `at`.
pub fn tally(at: DateTime<Utc>, kind: &str, subject: &str) -> String {
    format!("tally:{}:{kind}:{subject}", minute_stamp(at))
}

/// How many slots the tally index of the minute of `at` has handed out (a counter).
pub fn tally_count(at: DateTime<Utc>) -> String {
    format!("tally:{}:n", minute_stamp(at))
}

/// Slot `slot` (from 1) of the tally index of the minute of `at`: one tally key's name.
pub fn tally_slot(at: DateTime<Utc>, slot: i64) -> String {
    format!("tally:{}:{slot}", minute_stamp(at))
}

/// The first minute whose tallies are not all deleted yet.
pub const TALLY_CURSOR: &str = "tally:cursor";

/// The reconciler's last scan of a policy's NSG.
pub fn drift(policy: &PolicyName) -> String {
    format!("drift:{policy}")
}

/// When the last sweep ran and the backlog it left.
pub const SWEEP_STATUS: &str = "sweep:status";

/// A fresh key a store's compare-and-swap is tested on, deleted right after.
pub fn swap_probe(nonce: u64) -> String {
    format!("probe:swap:{nonce:016x}")
}
/// Where the reconciler's round over the policies goes on.
pub const RECONCILE_NEXT: &str = "reconcile:next";

/// A requester's pending and active requests under one policy (duplicates, quotas, and
/// replacing an older grant with a newer one).
pub fn open_of(policy: &PolicyName, principal: &Principal) -> String {
    format!("open:{policy}:{principal}")
}

/// A policy's active grants (the per-VM quota).
pub fn live(policy: &PolicyName) -> String {
    format!("live:{policy}")
}

/// All webhook subscriptions.
pub const WEBHOOKS: &str = "idx:webhooks";

/// A webhook subscription.
pub fn webhook(name: &WebhookName) -> String {
    format!("hook:{name}")
}

/// A webhook subscription's delivery state.
pub fn webhook_state(name: &WebhookName) -> String {
    format!("hook:{name}:state")
}

/// One delivery to a subscription: the event of audit number `seq`.
pub fn webhook_delivery(name: &WebhookName, seq: u64) -> String {
    format!("hook:{name}:d:{seq}")
}

/// A signed message an integration sent, kept while a replay would still verify.
pub fn seen_message(integration: &WebhookName, id: &str) -> String {
    format!("seen:{integration}:{id}")
}

/// Where a subscription's Slack message about a request is (to update it).
pub fn slack_message(name: &WebhookName, request: &str) -> String {
    format!("hook:{name}:slack:{request}")
}

/// The audit trail's head: its last event.
pub const AUDIT_HEAD: &str = "audit:head";
/// The latest signed audit checkpoint.
pub const AUDIT_CHECKPOINT: &str = "audit:checkpoint";

/// The checkpoint signed at event `seq`: written once, never replaced (the append-only record
/// behind `audit:checkpoint`).
pub fn audit_checkpoint_at(seq: u64) -> String {
    format!("audit:cp:{seq}")
}

/// Audit event number `seq`.
pub fn audit_event(seq: u64) -> String {
    format!("audit:e:{seq}")
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    #[test]
    fn minute_stamps_are_chronos_format() {
        for at in [Utc::now(), "2026-01-02T03:04:59Z".parse().unwrap(), "0999-12-31T23:59:00Z".parse().unwrap()] {
            assert_eq!(minute_stamp(at), at.format("%Y%m%d%H%M").to_string());
        }
    }

    #[test]
    fn every_key_suits_cosmos_db_even_for_the_longest_ids() {
        let policy = PolicyName::parse(&"p".repeat(63)).unwrap();
        let principal = Principal::parse(&format!("{}@example.com", "a".repeat(116))).unwrap();
        let request = RequestId::parse(&"r".repeat(40)).unwrap();
        let keys = [
            self::policy(&policy),
            self::request(&request),
            legacy_requests_by(&principal),
            format!("{}:{}", legacy_requests_by(&principal), u64::MAX),
            due_count(Utc::now()),
            auth_failures(Utc::now()),
            tally(Utc::now(), "block", "ffff:ffff:ffff:ffff::"),
            tally(Utc::now(), "by", principal.as_str()),
            tally_slot(Utc::now(), i64::MAX),
            TALLY_CURSOR.into(),
            due_slot(Utc::now(), i64::MAX),
            pending(&policy),
            drift(&policy),
            SWEEP_STATUS.into(),
            swap_probe(u64::MAX),
            RECONCILE_NEXT.into(),
            open_of(&policy, &principal),
            live(&policy),
            audit_event(u64::MAX),
            audit_checkpoint_at(u64::MAX),
            POLICIES.into(),
            LEGACY_RECENT_REQUESTS.into(),
            ARM_WORK.into(),
            SWEEP_CURSOR.into(),
            ARM_TOKEN.into(),
            JWKS.into(),
            AUDIT_HEAD.into(),
            AUDIT_CHECKPOINT.into(),
        ];
        for key in keys {
            assert!(key.len() <= 255 && !key.contains(['/', '\\', '?', '#', '\'', '"']), "{key}");
        }
    }
}
