//! `fermyon:spin/key-value@2.0.0` on SQLite, with Spin's own table layout, so a state
//! directory written here is what Spin's default store would hold.

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

    /// Every key of a store, sorted.
    pub fn keys(&self, store: &str) -> Result<Vec<String>> {
        let db = self.db.lock().unwrap();
        let mut statement = db.prepare("SELECT key FROM spin_key_value WHERE store = ?1 ORDER BY key")?;
        let keys = statement.query_map(params![store], |row| row.get(0))?.collect::<rusqlite::Result<_>>()?;
        Ok(keys)
    }
}
