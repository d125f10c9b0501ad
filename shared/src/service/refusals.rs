//! Failed logins under a flood. Each one is counted in a per-minute counter, and only the
//! 1st, 10th, 100th, 1000th... of a minute becomes an audit event (carrying the count), so a
//! flood of bad credentials grows the trail by a handful of events a minute, however large,
//! and cannot crowd out the events every change must write first (the sweep's closes above
//! all). The counter of a minute is deleted when the sweep completes that minute.

use chrono::{DateTime, Utc};

use crate::keys;
use crate::store::KvStore;

/// Counts a failed login at `now`; answers the count when this one is to be recorded. A
/// counter that cannot be written records the failure anyway (never lose the first one).
pub fn failure_to_record(kv: &dyn KvStore, now: DateTime<Utc>) -> Option<i64> {
    match kv.increment(&keys::auth_failures(now), 1) {
        Ok(count) => is_power_of_ten(count).then_some(count),
        Err(_) => Some(0),
    }
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

    #[test]
    fn a_flood_of_failures_is_recorded_a_handful_of_times_a_minute() {
        let kv = MemStore::default();
        let recorded: Vec<i64> = (0..100_000).filter_map(|_| failure_to_record(&kv, at(0))).collect();
        assert_eq!(recorded, [1, 10, 100, 1000, 10_000, 100_000]);
        assert_eq!(failure_to_record(&kv, at(1)), Some(1), "a new minute starts again");
    }
}
