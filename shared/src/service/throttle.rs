//! Rate limits, and how failed logins reach the audit trail under a flood.
//!
//! Every limit is a bucket of `n` calls a minute, filled again at each minute boundary (UTC).
//! A bucket is an atomic counter in the store, one per subject and minute, so every instance
//! shares it and no call waits on another: under a flood a compare-and-swap turns into
//! contention, an `increment` does not. Each counter is entered in its minute's tally index
//! when it is created, and the sweep deletes a minute's tallies once the minute is over.
//!
//! Failed logins are counted per address and minute, and only the 1st, 10th and 100th of an
//! address's minute becomes an audit event (carrying the count), while the minute has seen at
//! most [`EVENTS_BEFORE_AGGREGATING`] failures from all addresses together; past 100, the
//! 1,000th, 10,000th... of all of them is recorded too. So a flood, from one address or many,
//! grows the trail by at most about two hundred events a minute, and cannot crowd out the
//! events every change must write first (the sweep's closes above all). (The two counters
//! move apart under concurrency; the margin keeps an address's 100th from falling between.)

use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Timelike, Utc};

use crate::config::RateLimits;
use crate::domain::Principal;
use crate::keys;
use crate::store::{KvStore, StoreError};

/// Failed logins in a minute (all addresses) past which they are recorded in aggregate only.
pub const EVENTS_BEFORE_AGGREGATING: i64 = 200;
/// Failed logins in a minute (all addresses) past which no more per-address counters are
/// made: a flood from more addresses than that is counted in aggregate only, so it cannot
/// fill the store with counters faster than the sweep deletes them.
const ADDRESSES_COUNTED_UNTIL: i64 = 20_000;

/// A minute's tallies are deleted once it is this far behind.
const TALLY_SETTLE: TimeDelta = TimeDelta::minutes(2);
/// At most this many tally keys are deleted by one sweep (the rest wait for the next).
const TALLY_DELETES_PER_SWEEP: usize = 2000;
/// At most this much time is spent deleting by one sweep.
const TALLY_TIME_PER_SWEEP: std::time::Duration = std::time::Duration::from_secs(10);

/// The rate limits of one call at `now`.
pub struct Throttle<'a> {
    kv: &'a dyn KvStore,
    now: DateTime<Utc>,
    limits: RateLimits,
}

/// A failed login, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailedLogin {
    /// Failed logins from this address this minute, this one included (`None`: the address
    /// is unknown, or the flood is counted in aggregate only).
    pub from_address: Option<i64>,
    /// Failed logins from all addresses this minute.
    pub all: i64,
    /// Whether this one is to become an audit event.
    pub record: bool,
}

/// A change refused for being over a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// Whose limit: `principal` or `address`.
    pub scope: &'static str,
    /// How many calls past the limit this one is (1 for the first refused).
    pub over: i64,
    /// Seconds until the bucket is full again.
    pub retry_after: u32,
}

impl Limited {
    /// Whether this refusal is to become an audit event (the 1st, 10th, 100th... of a minute).
    pub fn to_record(&self) -> bool {
        is_power_of_ten(self.over)
    }
}

impl<'a> Throttle<'a> {
    /// The limits of a call at `now`, counted in `kv`.
    pub fn new(kv: &'a dyn KvStore, now: DateTime<Utc>, limits: RateLimits) -> Self {
        Self { kv, now, limits }
    }

    /// Seconds until the buckets fill again (the next minute boundary), at least 1.
    pub fn retry_after(&self) -> u32 {
        60 - self.now.second().min(59)
    }

    /// Whether `address` is over its failed-login limit this minute. An unknown address is
    /// never blocked (callers the host cannot tell apart would lock each other out), and a
    /// store that cannot be read lets the call through to authentication, which still decides.
    pub fn is_blocked(&self, address: Option<IpAddr>) -> bool {
        if self.limits.failed_logins_per_address.is_none() || address.is_none() {
            return false;
        }
        match self.kv.get(&keys::tally(self.now, "block", &address_subject(address))) {
            Ok(marker) => marker.is_some(),
            Err(error) => {
                eprintln!("rate limits: reading the block of {}: {error}", address_subject(address));
                false
            }
        }
    }

    /// Counts a failed login (or one refused for being blocked) from `address`, blocks the
    /// address when it reaches its limit, and says whether to record it. Counters that cannot
    /// be written are logged and the failure is not recorded: under a flood that is when
    /// recording every one would do the most harm.
    pub fn failed_login(&self, address: Option<IpAddr>) -> Option<FailedLogin> {
        let all = match self.count(&keys::auth_failures(self.now)) {
            Ok(all) => all,
            Err(error) => {
                eprintln!("rate limits: counting failed logins: {error}");
                return None;
            }
        };
        let from_address = match address {
            Some(_) if all <= ADDRESSES_COUNTED_UNTIL => {
                let subject = address_subject(address);
                match self.count(&keys::tally(self.now, "fail", &subject)) {
                    Ok(count) => Some(count),
                    Err(error) => {
                        eprintln!("rate limits: counting failed logins from {subject}: {error}");
                        None
                    }
                }
            }
            _ => None,
        };
        if let (Some(limit), Some(count)) = (self.limits.failed_logins_per_address, from_address)
            && count == i64::from(limit)
        {
            let block = keys::tally(self.now, "block", &address_subject(address));
            if let Err(error) = self.kv.set(&block, b"1").and_then(|()| self.register(&block)) {
                eprintln!("rate limits: blocking {}: {error}", address_subject(address));
            }
        }
        let for_address = from_address
            .is_some_and(|count| count <= 100 && all <= EVENTS_BEFORE_AGGREGATING && is_power_of_ten(count));
        let record = for_address || (all > 100 && is_power_of_ten(all));
        Some(FailedLogin { from_address, all, record })
    }

    /// Counts a change by `principal` from `address`; refused when either is over its limit.
    /// A store that cannot count lets the change through (it is authenticated and authorized
    /// all the same).
    pub fn change(&self, principal: &Principal, address: Option<IpAddr>) -> Result<(), Limited> {
        let limits = [
            ("principal", "by", principal.to_string(), self.limits.changes_per_principal),
            // An unknown address has no limit of its own (callers would share one).
            (
                "address",
                "from",
                address_subject(address),
                self.limits.changes_per_address.filter(|_| address.is_some()),
            ),
        ];
        for (scope, kind, subject, limit) in limits {
            let Some(limit) = limit else { continue };
            match self.count(&keys::tally(self.now, kind, &subject)) {
                Ok(count) if count > i64::from(limit) => {
                    return Err(Limited { scope, over: count - i64::from(limit), retry_after: self.retry_after() });
                }
                Ok(_) => {}
                Err(error) => eprintln!("rate limits: counting changes {kind} {subject}: {error}"),
            }
        }
        Ok(())
    }

    /// Adds one to a counter, entering it in the minute's index when this created it.
    fn count(&self, key: &str) -> Result<i64, StoreError> {
        let count = self.kv.increment(key, 1)?;
        if count == 1 {
            self.register(key)?;
        }
        Ok(count)
    }

    /// Enters a key in the tally index of this minute, for the sweep to delete.
    fn register(&self, key: &str) -> Result<(), StoreError> {
        delete_after(self.kv, key, self.now)
    }
}

/// Marks `key` as taken, once: `true` for the first caller only, on every store (an atomic
/// counter: a create-if-absent is an upsert on Spin's SQLite store). The mark is deleted
/// once the minute of `forget_at` is over.
pub fn mark_once(kv: &dyn KvStore, key: &str, forget_at: DateTime<Utc>) -> Result<bool, StoreError> {
    let first = kv.increment(key, 1)? == 1;
    if first && let Err(error) = delete_after(kv, key, forget_at) {
        eprintln!("{key} will not be forgotten: {error}");
    }
    Ok(first)
}

/// Enters `key` in the tally index of the minute of `at`: the sweep deletes it once that
/// minute is over. For the short-lived keys of rate limits and replay protection.
pub fn delete_after(kv: &dyn KvStore, key: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
    for _ in 0..3 {
        let slot = kv.increment(&keys::tally_count(at), 1)?;
        if kv.compare_and_swap(&keys::tally_slot(at, slot), None, key.as_bytes())? {
            return Ok(());
        }
    }
    Err(StoreError::Conflict { key: keys::tally_count(at) })
}

/// Who an address is for rate limits: an IPv4 address, an IPv6 caller's /64 (one host
/// usually holds a whole /64), or `unknown`.
pub fn address_subject(address: Option<IpAddr>) -> String {
    match address {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => {
            let s = v6.segments();
            std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0).to_string()
        }
        None => "unknown".into(),
    }
}

/// Deletes the tallies of the minutes that are over, from where the last sweep stopped (however
/// far back: a minute skipped would never be deleted), at most [`TALLY_DELETES_PER_SWEEP`]
/// keys and [`TALLY_TIME_PER_SWEEP`] at a time. Answers how many keys it deleted.
pub fn clear_tallies(kv: &dyn KvStore, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let started = std::time::Instant::now();
    let last = minute_floor(now) - TALLY_SETTLE;
    let cursor: Option<DateTime<Utc>> =
        kv.get(keys::TALLY_CURSOR)?.and_then(|bytes| serde_json::from_slice(&bytes).ok());
    // Before the first sweep: start an hour back (tallies older than the deployment are few).
    let mut minute = cursor.unwrap_or(last - TimeDelta::hours(1));
    let mut budget = TALLY_DELETES_PER_SWEEP;
    let mut deleted = 0;
    while minute <= last && started.elapsed() < TALLY_TIME_PER_SWEEP {
        let (done, count) = clear_minute(kv, minute, &mut budget)?;
        deleted += count;
        if !done {
            break;
        }
        minute += TimeDelta::minutes(1);
    }
    // One sweep's cursor is as good as another's: a plain write.
    kv.set(keys::TALLY_CURSOR, &serde_json::to_vec(&minute).expect("a time serializes"))?;
    Ok(deleted)
}

/// Deletes one minute's tallies from the top of its index down, within `budget`; answers
/// whether the minute is clear, and how many keys went.
fn clear_minute(kv: &dyn KvStore, minute: DateTime<Utc>, budget: &mut usize) -> Result<(bool, usize), StoreError> {
    // Counters are read through `increment`, never `get` (see the sweep's due index).
    let count_key = keys::tally_count(minute);
    let mut slot = kv.increment(&count_key, 0)?;
    let mut deleted = 0;
    loop {
        while slot > 0 {
            if *budget == 0 {
                return Ok((false, deleted));
            }
            let slot_key = keys::tally_slot(minute, slot);
            if let Some(name) = kv.get(&slot_key)?.and_then(|bytes| String::from_utf8(bytes).ok())
                && is_tally_of(&name, minute)
            {
                kv.delete(&name)?;
                deleted += 1;
            }
            kv.delete(&slot_key)?;
            *budget -= 1;
            // Each sweep takes the next slot from the counter, so two sweeps at once share it.
            slot = kv.increment(&count_key, -1)?;
        }
        // A writer whose clock lags may have taken a slot since: look once more.
        slot = kv.increment(&count_key, 0)?;
        if slot <= 0 {
            break;
        }
    }
    kv.delete(&count_key)?;
    Ok((true, deleted))
}

/// Whether `name` is a key the tally index of `minute` may list: a rate-limit counter or
/// block of that minute, its count of failed logins, or a message id kept against replays. A slot pointing anywhere else
/// (a damaged store) deletes nothing.
fn is_tally_of(name: &str, minute: DateTime<Utc>) -> bool {
    let stamp = keys::minute_stamp(minute);
    if name == keys::auth_failures(minute) || name.starts_with("seen:") {
        return true;
    }
    let Some(rest) = name.strip_prefix("tally:").and_then(|r| r.strip_prefix(stamp.as_str())) else { return false };
    ["fail", "by", "from", "block"]
        .iter()
        .any(|kind| rest.strip_prefix(':').is_some_and(|r| r.starts_with(&format!("{kind}:"))))
}

fn minute_floor(at: DateTime<Utc>) -> DateTime<Utc> {
    at.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap_or(at)
}

fn is_power_of_ten(mut n: i64) -> bool {
    if n < 1 {
        return false;
    }
    while n % 10 == 0 {
        n /= 10;
    }
    n == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use crate::testing::at;

    const LIMITS: RateLimits =
        RateLimits { changes_per_principal: Some(3), changes_per_address: Some(5), failed_logins_per_address: Some(4) };

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn alice() -> Principal {
        Principal::parse("alice").unwrap()
    }

    #[test]
    fn a_flood_of_failures_from_one_address_is_recorded_a_handful_of_times_a_minute() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), RateLimits::default());
        let recorded: Vec<i64> = (0..100_000)
            .map(|_| throttle.failed_login(ip("203.0.113.7")).unwrap())
            .filter(|f| f.record)
            .map(|f| f.all)
            .collect();
        assert_eq!(recorded, [1, 10, 100, 1000, 10_000, 100_000]);
        let next_minute = Throttle::new(&kv, at(1), RateLimits::default());
        assert!(next_minute.failed_login(ip("203.0.113.7")).unwrap().record, "a new minute starts again");
    }

    #[test]
    fn a_flood_from_many_addresses_is_recorded_per_address_until_it_is_aggregated() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), RateLimits::default());
        let recorded = (0..50_000u32)
            .map(|n| throttle.failed_login(Some(IpAddr::from(n.to_be_bytes()))).unwrap())
            .filter(|f| f.record)
            .count();
        // One event for each of the first two hundred addresses, then 1,000 and 10,000 in all.
        assert_eq!(recorded, 200 + 2);
    }

    #[test]
    fn an_address_is_blocked_once_it_reaches_its_failed_login_limit_until_the_minute_ends() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), LIMITS);
        for _ in 0..3 {
            throttle.failed_login(ip("203.0.113.7"));
            assert!(!throttle.is_blocked(ip("203.0.113.7")));
        }
        throttle.failed_login(ip("203.0.113.7"));
        assert!(throttle.is_blocked(ip("203.0.113.7")));
        assert!(!throttle.is_blocked(ip("198.51.100.1")), "another address is not");
        assert!(!Throttle::new(&kv, at(1), LIMITS).is_blocked(ip("203.0.113.7")), "the next minute starts afresh");
        assert!(!Throttle::new(&kv, at(0), RateLimits::default()).is_blocked(ip("203.0.113.7")), "the off switch");
    }

    #[test]
    fn changes_are_limited_per_principal_and_per_address() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0) + TimeDelta::seconds(15), LIMITS);
        for _ in 0..3 {
            assert_eq!(throttle.change(&alice(), ip("203.0.113.7")), Ok(()));
        }
        let refused = throttle.change(&alice(), ip("203.0.113.7")).unwrap_err();
        assert_eq!((refused.scope, refused.over, refused.retry_after), ("principal", 1, 45));
        let bob = Principal::parse("bob").unwrap();
        assert_eq!(throttle.change(&bob, ip("203.0.113.7")), Ok(()));
        assert_eq!(throttle.change(&bob, ip("203.0.113.7")), Ok(()));
        assert_eq!(throttle.change(&bob, ip("203.0.113.7")).unwrap_err().scope, "address");
        assert_eq!(Throttle::new(&kv, at(1), LIMITS).change(&alice(), ip("203.0.113.7")), Ok(()));
        let off = Throttle::new(&kv, at(0), RateLimits::default());
        assert!((0..100).all(|_| off.change(&alice(), ip("203.0.113.7")).is_ok()), "the off switch");
    }

    #[test]
    fn an_ipv6_caller_is_limited_by_its_slash_64() {
        assert_eq!(address_subject(ip("2001:db8:1:2:aaaa::1")), address_subject(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(address_subject(ip("2001:db8:1:2::1")), address_subject(ip("2001:db8:1:3::1")));
        assert_eq!(address_subject(None), "unknown");
    }

    #[test]
    fn the_sweep_deletes_every_tally_of_a_minute_that_is_over_and_nothing_newer() {
        let kv = MemStore::default();
        for minute in 0..3 {
            let throttle = Throttle::new(&kv, at(minute), LIMITS);
            for n in 0..30u32 {
                throttle.failed_login(Some(IpAddr::from(n.to_be_bytes())));
                let _ = throttle.change(&alice(), Some(IpAddr::from(n.to_be_bytes())));
            }
        }
        let tallies = |kv: &MemStore| kv.keys().into_iter().filter(|k| k.starts_with("tally:20")).count();
        assert!(tallies(&kv) > 3 * 60);
        // At minute 4, minutes 0..=2 are over and settled.
        let deleted = clear_tallies(&kv, at(4)).unwrap();
        assert_eq!(tallies(&kv), 0, "left: {:?}", kv.keys());
        // Each minute: 30 addresses' failures, alice's changes, 3 addresses' before her limit,
        // and the minute's count of failed logins.
        assert_eq!(deleted, 3 * (30 + 1 + 3 + 1));
        assert!(!kv.keys().iter().any(|k| k.starts_with("authfail:")), "{:?}", kv.keys());
        Throttle::new(&kv, at(4), LIMITS).failed_login(ip("203.0.113.7"));
        clear_tallies(&kv, at(5)).unwrap();
        assert!(tallies(&kv) > 0, "the current minute's are kept");
    }

    #[test]
    fn an_unknown_address_is_never_blocked_and_has_no_address_limit() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), LIMITS);
        for _ in 0..10 {
            assert_eq!(throttle.failed_login(None).unwrap().from_address, None);
        }
        assert!(!throttle.is_blocked(None));
        let bob = Principal::parse("bob").unwrap();
        let carol = Principal::parse("carol").unwrap();
        assert!([&alice(), &bob, &carol].iter().all(|who| (0..3).all(|_| throttle.change(who, None).is_ok())));
    }

    #[test]
    fn a_store_that_cannot_count_records_nothing_and_blocks_nothing() {
        let kv = MemStore::default();
        kv.fail_writes.set(true);
        let throttle = Throttle::new(&kv, at(0), LIMITS);
        assert!((0..10).all(|_| throttle.failed_login(ip("203.0.113.7")).is_none()));
        assert!(!throttle.is_blocked(ip("203.0.113.7")));
        assert_eq!(throttle.change(&alice(), ip("203.0.113.7")), Ok(()), "fails open: the caller is authenticated");
    }

    #[test]
    fn a_slot_naming_a_key_outside_its_minutes_tallies_deletes_nothing() {
        let kv = MemStore::default();
        for (slot, name) in ["policy:demo-vm", "tally:cursor", "tally:202601011201:fail:x", "authfail:202601011201"]
            .into_iter()
            .enumerate()
        {
            kv.set(name, b"keep").unwrap();
            kv.increment(&keys::tally_count(at(0)), 1).unwrap();
            kv.set(&keys::tally_slot(at(0), slot as i64 + 1), name.as_bytes()).unwrap();
        }
        clear_tallies(&kv, at(3)).unwrap();
        for name in ["policy:demo-vm", "tally:202601011201:fail:x", "authfail:202601011201"] {
            assert_eq!(kv.get(name).unwrap().as_deref(), Some(b"keep".as_slice()), "{name}");
        }
        assert!(is_tally_of("tally:202601011200:block:203.0.113.7", at(0)));
        assert!(!is_tally_of("tally:202601011200:n", at(0)) && !is_tally_of("tally:202601011200:7", at(0)));
    }

    #[test]
    fn minutes_far_behind_the_cursor_are_still_cleared() {
        let kv = MemStore::default();
        Throttle::new(&kv, at(0), LIMITS).failed_login(ip("203.0.113.7"));
        clear_tallies(&kv, at(-1)).unwrap();
        // No sweep for a day: the minute is still deleted, not skipped.
        clear_tallies(&kv, at(24 * 60)).unwrap();
        assert!(kv.keys().iter().all(|k| !k.starts_with("tally:20") && !k.starts_with("authfail:")), "{:?}", kv.keys());
    }

    #[test]
    fn a_large_minute_is_cleared_over_several_sweeps() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), RateLimits::default());
        for n in 0..3000u32 {
            throttle.failed_login(Some(IpAddr::from(n.to_be_bytes())));
        }
        // 3,000 addresses' counters and the minute's count of failed logins.
        assert_eq!(clear_tallies(&kv, at(3)).unwrap(), TALLY_DELETES_PER_SWEEP);
        assert_eq!(clear_tallies(&kv, at(4)).unwrap(), 3001 - TALLY_DELETES_PER_SWEEP);
        assert!(kv.keys().iter().all(|k| !k.starts_with("tally:20")), "{:?}", kv.keys());
    }
}
