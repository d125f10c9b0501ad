//! The key-value store behind `fermyon:spin/key-value@2.0.0` and `wasi:keyvalue@0.2.0-draft2`,
//! on SQLite with Spin's own table layout, so a state directory written here is what Spin's
//! default store would hold. Compare-and-swap and increment are atomic, absent keys included
//! (stricter than Spin's SQLite backend, which upserts when a swapped key was absent).

use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};

/// The store behind every component's `default` label.
pub struct KvBackend {
    db: Mutex<Connection>,
}

impl KvBackend {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS spin_key_value (store TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (store, key));",
        )?;
        Ok(Self { db: Mutex::new(db) })
    }

    /// A value.
    pub fn get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db.lock().unwrap();
        Ok(db
            .query_row("SELECT value FROM spin_key_value WHERE store = ?1 AND key = ?2", params![store, key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// Writes a value.
    pub fn set(&self, store: &str, key: &str, value: &[u8]) -> Result<()> {
        let db = self.db.lock().unwrap();
        db.execute(
            "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3) ON CONFLICT (store, key) DO UPDATE SET value = excluded.value",
            params![store, key, value],
        )?;
        Ok(())
    }

    /// Removes a key.
    pub fn delete(&self, store: &str, key: &str) -> Result<()> {
        self.db
            .lock()
            .unwrap()
            .execute("DELETE FROM spin_key_value WHERE store = ?1 AND key = ?2", params![store, key])?;
        Ok(())
    }

    /// Writes `value` only if the key holds `expected` (`None`: absent); answers whether it did.
    pub fn compare_and_swap(&self, store: &str, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool> {
        let db = self.db.lock().unwrap();
        let changed = match expected {
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
    fn compare_and_swap_and_increment_are_conditional_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let kv = KvBackend::open(&dir.path().join("kv.db")).unwrap();
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
