//! The key-value store behind `fermyon:spin/key-value@2.0.0` and `wasi:keyvalue@0.2.0-draft2`,
//! on SQLite with Spin's own table layout, so a state directory written here is what Spin's
//! default store would hold.
//!
//! It behaves as Spin's SQLite backend does, so the tests see what production sees: a
//! compare-and-swap over a key that was read as absent is an upsert (it always succeeds,
//! even over a key another writer created meanwhile). [`KvBackend::strict_swaps`] makes it
//! a real create-if-absent instead, as Redis through Lua and Cosmos DB are. Increments are
//! atomic. A share of operations can be made to fail ([`StoreFaults`]), as a real backend's
//! timeouts and throttling do.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

/// The store behind every component's `default` label.
pub struct KvBackend {
    db: Mutex<Connection>,
    strict: AtomicBool,
    spin_redis_swaps: AtomicBool,
    faults: Mutex<StoreFaults>,
    rng: AtomicU64,
    injected: [AtomicU64; 4],
    operations: [AtomicU64; 6],
    /// When tracing, every operation's kind and key, in order.
    trace: Mutex<Option<Vec<(&'static str, String)>>>,
    /// Bytes read and written by the operations.
    bytes: [AtomicU64; 2],
    /// A network store's round trip, added to every operation (microseconds).
    delay_micros: AtomicU64,
}

/// Which share of the guests' store operations fail with a backend error (0.0 to 1.0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreFaults {
    /// Reads (`get`, `exists`, a swap's first read).
    pub reads: f64,
    /// Writes (`set`, `delete`, `increment`).
    pub writes: f64,
    /// Swaps.
    pub swaps: f64,
    /// Swaps that land and are then reported as `cas-failed`, as Spin's Cosmos DB backend
    /// reports a throttled or timed-out write that went through.
    pub landed_swaps_reported_failed: f64,
}

/// A kind of store operation, for fault injection.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A read.
    Read,
    /// A write.
    Write,
    /// A compare-and-swap.
    Swap,
    /// A compare-and-swap that landed, to be reported as failed anyway.
    LandedSwap,
}

impl KvBackend {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS spin_key_value (store TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (store, key));",
        )?;
        Ok(Self {
            db: Mutex::new(db),
            strict: AtomicBool::new(false),
            spin_redis_swaps: AtomicBool::new(false),
            faults: Mutex::default(),
            rng: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
            injected: Default::default(),
            operations: Default::default(),
            trace: Mutex::new(None),
            bytes: Default::default(),
            delay_micros: AtomicU64::new(0),
        })
    }

    /// Operations served so far: gets, sets, deletes, compare-and-swaps, increments, batches
    /// (what a change costs in store round trips; a `get-many`, `set-many` or `delete-many` is
    /// one batch, whatever its number of keys).
    pub fn operations(&self) -> [u64; 6] {
        self.operations.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    /// Starts recording every operation's kind and key (until [`KvBackend::take_trace`]).
    pub fn start_trace(&self) {
        *self.trace.lock().unwrap() = Some(Vec::new());
    }

    /// The operations recorded since [`KvBackend::start_trace`], and stops recording.
    pub fn take_trace(&self) -> Vec<(&'static str, String)> {
        self.trace.lock().unwrap().take().unwrap_or_default()
    }

    /// Bytes read and written so far (values, not keys).
    pub fn bytes(&self) -> [u64; 2] {
        self.bytes.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    /// Adds `delay` to every operation from now on, as a store across a network would (Redis
    /// about 0.5-1 ms a round trip, Cosmos DB 5-10 ms); outbound Redis commands wait as long.
    pub fn set_delay(&self, delay: std::time::Duration) {
        self.delay_micros.store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Waits the simulated network delay, if any (see [`KvBackend::set_delay`]).
    pub fn network_delay(&self) {
        let delay = self.delay_micros.load(Ordering::Relaxed);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_micros(delay));
        }
    }

    fn count(&self, op: usize, key: &str) {
        const KINDS: [&str; 6] = ["get", "set", "delete", "swap", "increment", "batch"];
        self.operations[op].fetch_add(1, Ordering::Relaxed);
        if let Some(trace) = self.trace.lock().unwrap().as_mut() {
            trace.push((KINDS[op], key.to_owned()));
        }
        self.network_delay();
    }

    fn read(&self, n: usize) {
        self.bytes[0].fetch_add(n as u64, Ordering::Relaxed);
    }

    fn written(&self, n: usize) {
        self.bytes[1].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `true`: a swap over an absent key creates it only if still absent (stricter than
    /// Spin's SQLite store, which upserts).
    pub fn strict_swaps(&self, strict: bool) {
        self.strict.store(strict, Ordering::SeqCst);
    }

    /// `true`: swaps behave as Spin's `type = "redis"` key-value backend's do (Spin 3.6 and
    /// 4.0): one that lands reports `cas-failed`, and one that lost a race reports success.
    pub fn spin_redis_swaps(&self, on: bool) {
        self.spin_redis_swaps.store(on, Ordering::SeqCst);
    }

    /// Whether swaps behave as Spin's `type = "redis"` key-value backend's do.
    pub fn has_spin_redis_swaps(&self) -> bool {
        self.spin_redis_swaps.load(Ordering::SeqCst)
    }

    /// Makes a share of the guests' operations fail from now on.
    pub fn inject(&self, faults: StoreFaults) {
        *self.faults.lock().unwrap() = faults;
    }

    /// Fails a guest's operation when the dice say so.
    pub fn fault(&self, op: Op) -> Result<()> {
        let faults = *self.faults.lock().unwrap();
        let rate = match op {
            Op::Read => faults.reads,
            Op::Write => faults.writes,
            Op::Swap => faults.swaps,
            Op::LandedSwap => faults.landed_swaps_reported_failed,
        };
        if rate <= 0.0 {
            return Ok(());
        }
        // xorshift64: deterministic enough, no dependency.
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        if (x % 10_000) as f64 / 10_000.0 < rate {
            self.injected[op as usize].fetch_add(1, Ordering::Relaxed);
            anyhow::bail!("injected store fault ({op:?})");
        }
        Ok(())
    }

    /// Faults injected so far: reads, writes, swaps, landed swaps reported failed.
    pub fn injected(&self) -> [u64; 4] {
        self.injected.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    /// A value.
    pub fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>> {
        self.count(0, key);
        self.fetch(store, key)
    }

    /// Writes a value.
    pub fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<()> {
        self.count(1, key);
        self.write(store, key, value)
    }

    /// Removes a key.
    pub fn delete(&self, store: &str, key: &str) -> Result<()> {
        self.count(2, key);
        self.remove(store, key)
    }

    /// Several values in one round trip (`wasi:keyvalue/batch.get-many`).
    pub fn get_many(&self, store: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        self.count(5, &format!("get-many {}", keys.join(" ")));
        keys.iter().map(|key| self.fetch(store, key)).collect()
    }

    /// Several writes in one round trip (`set-many`); not atomic, as in Spin.
    pub fn set_many(&self, store: &str, entries: &[(String, Vec<u8>)]) -> Result<()> {
        let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
        self.count(5, &format!("set-many {}", keys.join(" ")));
        entries.iter().try_for_each(|(key, value)| self.write(store, key, value))
    }

    /// Several deletes in one round trip (`delete-many`).
    pub fn delete_many(&self, store: &str, keys: &[String]) -> Result<()> {
        self.count(5, &format!("delete-many {}", keys.join(" ")));
        keys.iter().try_for_each(|key| self.remove(store, key))
    }

    fn fetch(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db.lock().unwrap();
        let value: Option<Vec<u8>> = db
            .query_row("SELECT value FROM spin_key_value WHERE store = ?1 AND key = ?2", params![store, key], |row| {
                row.get(0)
            })
            .optional()?;
        self.read(value.as_ref().map_or(0, Vec::len));
        Ok(value)
    }

    fn write(&self, store: &str, key: &str, value: &[u8]) -> Result<()> {
        self.written(value.len());
        let db = self.db.lock().unwrap();
        db.execute(
            "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3) ON CONFLICT (store, key) DO UPDATE SET value = excluded.value",
            params![store, key, value],
        )?;
        Ok(())
    }

    fn remove(&self, store: &str, key: &str) -> Result<()> {
        self.db
            .lock()
            .unwrap()
            .execute("DELETE FROM spin_key_value WHERE store = ?1 AND key = ?2", params![store, key])?;
        Ok(())
    }

    /// Writes `value` only if the key holds `expected`; answers whether it did. With
    /// `expected` `None` (the key was read as absent), Spin's SQLite store writes whatever the
    /// key holds now; with [`KvBackend::strict_swaps`], only if it is still absent.
    pub fn compare_and_swap(&self, store: &str, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool> {
        self.count(3, key);
        self.written(value.len());
        let db = self.db.lock().unwrap();
        let changed = match expected {
            None if !self.strict.load(Ordering::SeqCst) => db.execute(
                "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3) ON CONFLICT (store, key) DO UPDATE SET value = excluded.value",
                params![store, key, value],
            )?,
            None => db.execute(
                "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3) ON CONFLICT (store, key) DO NOTHING",
                params![store, key, value],
            )?,
            Some(expected) => db.execute(
                "UPDATE spin_key_value SET value = ?3 WHERE store = ?1 AND key = ?2 AND value = ?4",
                params![store, key, value, expected],
            )?,
        };
        Ok(changed == 1)
    }

    /// Adds `delta` to the integer at `key` (absent: 0), stored as decimal text; answers the sum.
    pub fn increment(&self, store: &str, key: &str, delta: i64) -> Result<i64> {
        self.count(4, key);
        let mut db = self.db.lock().unwrap();
        let transaction = db.transaction()?;
        let current: Option<Vec<u8>> = transaction
            .query_row("SELECT value FROM spin_key_value WHERE store = ?1 AND key = ?2", params![store, key], |row| {
                row.get(0)
            })
            .optional()?;
        let current: i64 = match current {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.parse().ok())
                .with_context(|| format!("'{key}' does not hold an integer"))?,
        };
        let sum = current.checked_add(delta).context("increment overflows")?;
        transaction.execute(
            "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3) ON CONFLICT (store, key) DO UPDATE SET value = excluded.value",
            params![store, key, sum.to_string().into_bytes()],
        )?;
        transaction.commit()?;
        Ok(sum)
    }

    /// `false`: commits are no longer flushed to disk one by one (SQLite `synchronous =
    /// NORMAL` in WAL mode: a crash of the process loses nothing, a power cut may lose the
    /// last commits). For measuring what the components cost apart from the disk's fsync.
    pub fn flush_each_commit(&self, flush: bool) -> Result<()> {
        let mode = if flush { "FULL" } else { "NORMAL" };
        self.db.lock().unwrap().execute_batch(&format!("PRAGMA synchronous = {mode};"))?;
        Ok(())
    }

    /// Moves what the write-ahead log holds into the database file, so a measurement that
    /// follows a bulk load does not pay for it (SQLite checkpoints on its own schedule).
    pub fn checkpoint(&self) -> Result<()> {
        self.db.lock().unwrap().execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }

    /// Every key of a store, sorted.
    pub fn keys(&self, store: &str) -> Result<Vec<String>> {
        let db = self.db.lock().unwrap();
        let mut statement = db.prepare("SELECT key FROM spin_key_value WHERE store = ?1 ORDER BY key")?;
        let keys = statement.query_map(params![store], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_spins_sqlite_store_a_swap_over_an_absent_key_is_an_upsert() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvBackend::open(&dir.path().join("kv.db")).unwrap();
        assert!(kv.compare_and_swap("default", "k", None, b"a").unwrap());
        assert!(kv.compare_and_swap("default", "k", None, b"b").unwrap(), "a second creator wins too");
        assert_eq!(kv.get("default", "k").unwrap().as_deref(), Some(b"b".as_slice()));
        assert!(!kv.compare_and_swap("default", "k", Some(b"x"), b"c").unwrap(), "present keys really swap");
    }

    #[test]
    fn compare_and_swap_and_increment_are_conditional_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvBackend::open(&dir.path().join("kv.db")).unwrap();
        kv.strict_swaps(true);
        assert!(kv.compare_and_swap("default", "k", None, b"a").unwrap());
        assert!(!kv.compare_and_swap("default", "k", None, b"b").unwrap(), "no upsert over a present key");
        assert!(!kv.compare_and_swap("default", "k", Some(b"x"), b"b").unwrap());
        assert!(kv.compare_and_swap("default", "k", Some(b"a"), b"c").unwrap());
        assert_eq!(kv.get("default", "k").unwrap().as_deref(), Some(b"c".as_slice()));
        assert_eq!(kv.increment("default", "n", 5).unwrap(), 5);
        assert_eq!(kv.increment("default", "n", -2).unwrap(), 3);
        assert!(kv.increment("default", "k", 1).is_err(), "not a number");
    }
}
