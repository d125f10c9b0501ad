//! Rate limits, and how failed logins reach the audit trail under a flood.
//!
//! Every limit is a bucket of `n` calls a minute, filled again at each minute boundary (UTC).
//! A bucket is an atomic counter in the store, one per subject and minute, so every instance
//! shares it and no call waits on another: under a flood a compare-and-swap turns into
//! contention, an `increment` does not. Each counter is entered in its minute's tally index
//! when it is created, and the sweep deletes a minute's tallies once the minute is over.
//!
//! Failed logins are counted per address and minute, and only the 1st, 10th, 100th... of an
//! address's minute becomes an audit event (carrying the count). Past
//! [`EVENTS_BEFORE_AGGREGATING`] failures in a minute from all addresses together, only the
//! 1,000th, 10,000th... of all of them is recorded. So a flood, from one address or many, grows
//! the trail by at most about a hundred events a minute, and cannot crowd out the events every
//! change must write first (the sweep's closes above all).

use std::net::IpAddr;

use chrono::{DateTime, TimeDelta, Timelike, Utc};

use crate::config::RateLimits;
use crate::domain::Principal;
use crate::keys;
use crate::store::{KvStore, StoreError};

/// Failed logins in a minute (all addresses) past which they are recorded in aggregate only.
pub const EVENTS_BEFORE_AGGREGATING: i64 = 100;

/// A minute's tallies are deleted once it is this far behind.
const TALLY_SETTLE: TimeDelta = TimeDelta::minutes(2);
/// At most this many tally keys are deleted by one sweep (the rest wait for the next).
const TALLY_DELETES_PER_SWEEP: usize = 2000;
/// At most this many minutes are looked at by one sweep.
const TALLY_MINUTES_PER_SWEEP: i64 = 240;

/// The rate limits of one call at `now`.
pub struct Throttle<'a> {
    kv: &'a dyn KvStore,
    now: DateTime<Utc>,
    limits: RateLimits,
}

/// A failed login, counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailedLogin {
    /// Failed logins from this address this minute, this one included (0: unknown).
    pub from_address: i64,
    /// Failed logins from all addresses this minute (0: unknown).
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

    /// Whether `address` is over its failed-login limit this minute. A store that cannot be
    /// read lets the call through to authentication, which still decides.
    pub fn is_blocked(&self, address: Option<IpAddr>) -> bool {
        if self.limits.failed_logins_per_address.is_none() {
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
    /// address when it reaches its limit, and says whether to record it. A counter that cannot
    /// be written records the failure anyway: the first of a flood is never lost.
    pub fn failed_login(&self, address: Option<IpAddr>) -> FailedLogin {
        let subject = address_subject(address);
        let from_address = self.count(&keys::tally(self.now, "fail", &subject)).unwrap_or(0);
        let all = self.kv.increment(&keys::auth_failures(self.now), 1).unwrap_or(0);
        if let Some(limit) = self.limits.failed_logins_per_address
            && from_address >= i64::from(limit)
        {
            let block = keys::tally(self.now, "block", &subject);
            let blocked = self
                .kv
                .set(&block, b"1")
                .and_then(|()| if from_address == i64::from(limit) { self.register(&block) } else { Ok(()) });
            if let Err(error) = blocked {
                eprintln!("rate limits: blocking {subject}: {error}");
            }
        }
        let record = match (from_address, all) {
            (0, _) | (_, 0) => true,
            (_, all) if all > EVENTS_BEFORE_AGGREGATING => is_power_of_ten(all),
            (from_address, _) => is_power_of_ten(from_address),
        };
        FailedLogin { from_address, all, record }
    }

    /// Counts a change by `principal` from `address`; refused when either is over its limit.
    /// A store that cannot count lets the change through (it is authenticated and authorized
    /// all the same).
    pub fn change(&self, principal: &Principal, address: Option<IpAddr>) -> Result<(), Limited> {
        let limits = [
            ("principal", "by", principal.to_string(), self.limits.changes_per_principal),
            ("address", "from", address_subject(address), self.limits.changes_per_address),
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
        for _ in 0..3 {
            let slot = self.kv.increment(&keys::tally_count(self.now), 1)?;
            if self.kv.compare_and_swap(&keys::tally_slot(self.now, slot), None, key.as_bytes())? {
                return Ok(());
            }
        }
        Err(StoreError::Conflict { key: keys::tally_count(self.now) })
    }
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

/// Deletes the tallies of the minutes that are over, from where the last sweep stopped, at
/// most [`TALLY_DELETES_PER_SWEEP`] keys at a time. Answers how many keys it deleted.
pub fn clear_tallies(kv: &dyn KvStore, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let last = minute_floor(now) - TALLY_SETTLE;
    let cursor: Option<DateTime<Utc>> =
        kv.get(keys::TALLY_CURSOR)?.and_then(|bytes| serde_json::from_slice(&bytes).ok());
    // Before the first sweep: start an hour back (tallies older than the deployment are few).
    let mut minute =
        cursor.unwrap_or(last - TimeDelta::hours(1)).max(last - TimeDelta::minutes(TALLY_MINUTES_PER_SWEEP));
    let mut budget = TALLY_DELETES_PER_SWEEP;
    let mut deleted = 0;
    while minute <= last {
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
    let mut slot = kv.increment(&keys::tally_count(minute), 0)?;
    let mut deleted = 0;
    while slot > 0 {
        if *budget == 0 {
            return Ok((false, deleted));
        }
        let slot_key = keys::tally_slot(minute, slot);
        if let Some(name) = kv.get(&slot_key)?.and_then(|bytes| String::from_utf8(bytes).ok())
            && name.starts_with("tally:")
        {
            kv.delete(&name)?;
            deleted += 1;
        }
        kv.delete(&slot_key)?;
        *budget -= 1;
        // Each sweep takes the next slot from the counter, so two sweeps at once share the work.
        slot = kv.increment(&keys::tally_count(minute), -1)?;
    }
    kv.delete(&keys::tally_count(minute))?;
    Ok((true, deleted))
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
            .map(|_| throttle.failed_login(ip("203.0.113.7")))
            .filter(|f| f.record)
            .map(|f| f.all)
            .collect();
        assert_eq!(recorded, [1, 10, 100, 1000, 10_000, 100_000]);
        let next_minute = Throttle::new(&kv, at(1), RateLimits::default());
        assert!(next_minute.failed_login(ip("203.0.113.7")).record, "a new minute starts again");
    }

    #[test]
    fn a_flood_from_many_addresses_is_recorded_per_address_until_it_is_aggregated() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), RateLimits::default());
        let recorded = (0..50_000u32)
            .map(|n| throttle.failed_login(Some(IpAddr::from(n.to_be_bytes()))))
            .filter(|f| f.record)
            .count();
        // One event for each of the first hundred addresses, then 1,000 and 10,000 in all.
        assert_eq!(recorded, 100 + 2);
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
        // Each minute: 30 addresses' failures, alice's changes, and 3 addresses' before her limit.
        assert_eq!(deleted, 3 * (30 + 1 + 3));
        Throttle::new(&kv, at(4), LIMITS).failed_login(ip("203.0.113.7"));
        clear_tallies(&kv, at(5)).unwrap();
        assert!(tallies(&kv) > 0, "the current minute's are kept");
    }

    #[test]
    fn a_large_minute_is_cleared_over_several_sweeps() {
        let kv = MemStore::default();
        let throttle = Throttle::new(&kv, at(0), RateLimits::default());
        for n in 0..3000u32 {
            throttle.failed_login(Some(IpAddr::from(n.to_be_bytes())));
        }
        assert_eq!(clear_tallies(&kv, at(3)).unwrap(), TALLY_DELETES_PER_SWEEP);
        assert_eq!(clear_tallies(&kv, at(4)).unwrap(), 3000 - TALLY_DELETES_PER_SWEEP);
        assert!(kv.keys().iter().all(|k| !k.starts_with("tally:20")), "{:?}", kv.keys());
    }
}
