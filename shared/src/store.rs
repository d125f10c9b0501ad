//! The key-value port: raw get/set/delete, and versioned JSON documents on top of it.
//!
//! Spin's `key-value@2.0.0` has no transactions; documents carry a `version`, and a writer
//! replaces the exact bytes it read through [`KvStore::compare_and_swap`] (on Spin,
//! `wasi:keyvalue/atomics`), so a lost race shows up as [`StoreError::Conflict`] instead of a
//! silent overwrite.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The raw store.
pub trait KvStore {
    /// The value at `key`, if any.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes `value` at `key`.
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Removes `key`; absent keys are fine.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Writes `value` at `key` only if it still holds `expected` (`None`: the key is absent),
    /// as one atomic step; answers whether it wrote.
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError>;
    /// Adds `delta` to the counter at `key` (absent: 0) as one atomic step and answers the sum;
    /// `delta` 0 reads a counter. Keys touched by `increment` hold nothing but counters (each
    /// backend stores them its own way).
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError>;

    /// The values at `keys`, in order, in as few round trips as the backend allows
    /// (`wasi:keyvalue/batch.get-many` on Spin).
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(key)).collect()
    }

    /// Writes several values, in as few round trips as the backend allows. Not atomic: a
    /// failure may leave some written.
    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        entries.iter().try_for_each(|(key, value)| self.set(key, value))
    }

    /// Removes several keys, in as few round trips as the backend allows.
    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        keys.iter().try_for_each(|key| self.delete(key))
    }

    /// Drops whatever a cache in front of the store remembers of `key` (a lost race showed it
    /// stale). Wrappers forward it; stores without a cache ignore it.
    fn forget(&self, _key: &str) {}
}

/// A store chosen at run time (Spin's key-value store or Redis) behind one type.
impl<S: KvStore + ?Sized> KvStore for Box<S> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        (**self).set(key, value)
    }
    fn delete(&self, key: &str) -> Result<(), StoreError> {
        (**self).delete(key)
    }
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        (**self).compare_and_swap(key, expected, value)
    }
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        (**self).increment(key, delta)
    }
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        (**self).get_many(keys)
    }
    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        (**self).set_many(entries)
    }
    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        (**self).delete_many(keys)
    }
    fn forget(&self, key: &str) {
        (**self).forget(key)
    }
}

/// A store that remembers, for one invocation, what it last read or wrote at each key, so a
/// document read once costs one round trip however often the invocation looks at it, and a
/// read-modify-write costs only its swap. Every write goes through; a swap that fails (or a
/// conflict the caller reports with [`KvStore::forget`]) drops the key, so the next read is
/// fresh. Counters are never cached.
///
/// What it answers may be older than the store by the length of the invocation; every
/// decision that matters ends in a compare-and-swap, which sees the store as it is.
pub struct Cached<S> {
    inner: S,
    values: RefCell<HashMap<String, Option<Vec<u8>>>>,
}

impl<S: KvStore> Cached<S> {
    /// Wraps a store with an empty cache.
    pub fn new(inner: S) -> Self {
        Self { inner, values: RefCell::default() }
    }

    fn remember(&self, key: &str, value: Option<&[u8]>) {
        self.values.borrow_mut().insert(key.to_owned(), value.map(<[u8]>::to_vec));
    }
}

impl<S: KvStore> KvStore for Cached<S> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.values.borrow().get(key) {
            return Ok(value.clone());
        }
        let value = self.inner.get(key)?;
        self.remember(key, value.as_deref());
        Ok(value)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.forget(key);
        self.inner.set(key, value)?;
        self.remember(key, Some(value));
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.forget(key);
        self.inner.delete(key)?;
        self.remember(key, None);
        Ok(())
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        self.forget(key);
        let swapped = self.inner.compare_and_swap(key, expected, value)?;
        if swapped {
            self.remember(key, Some(value));
        }
        Ok(swapped)
    }

    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.inner.increment(key, delta)
    }

    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let mut missing: Vec<String> = Vec::new();
        for key in keys {
            if !self.values.borrow().contains_key(key) && !missing.contains(key) {
                missing.push(key.clone());
            }
        }
        if !missing.is_empty() {
            for (key, value) in missing.iter().zip(self.inner.get_many(&missing)?) {
                self.remember(key, value.as_deref());
            }
        }
        let values = self.values.borrow();
        Ok(keys.iter().map(|key| values.get(key).cloned().flatten()).collect())
    }

    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        entries.iter().for_each(|(key, _)| self.forget(key));
        self.inner.set_many(entries)?;
        entries.iter().for_each(|(key, value)| self.remember(key, Some(value)));
        Ok(())
    }

    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        keys.iter().for_each(|key| self.forget(key));
        self.inner.delete_many(keys)?;
        keys.iter().for_each(|key| self.remember(key, None));
        Ok(())
    }

    fn forget(&self, key: &str) {
        self.values.borrow_mut().remove(key);
        self.inner.forget(key);
    }
}

/// A store failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Someone else wrote the document since it was read.
    #[error("'{key}' was changed by someone else")]
    Conflict {
        /// The contested key.
        key: String,
    },
    /// A stored value is not what it should be.
    #[error("'{key}' holds an unreadable document: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend failed.
    #[error("key-value store failed: {0}")]
    Backend(String),
    /// The backend cannot be trusted with portcullis's state (its swaps lie); nothing is
    /// written until the deployment changes it.
    #[error("{0}")]
    Unsupported(&'static str),
}

/// A document with the version it was read at.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    /// The document.
    pub value: T,
    /// Its version; pass it back to [`save`].
    pub version: u64,
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u64,
    doc: T,
}

/// Reads a versioned document.
pub fn load<T: DeserializeOwned>(kv: &dyn KvStore, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
    let Some(bytes) = kv.get(key)? else { return Ok(None) };
    decode(key, &bytes).map(Some)
}

/// A versioned document from the bytes stored at `key` (read in a batch).
pub fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<Versioned<T>, StoreError> {
    let envelope: Envelope<T> = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })?;
    Ok(Versioned { value: envelope.doc, version: envelope.version })
}

/// Writes a document if it is still at `expected` (`None`: it must not exist yet) and returns
/// the new version.
pub fn save<T: Serialize>(kv: &dyn KvStore, key: &str, value: &T, expected: Option<u64>) -> Result<u64, StoreError> {
    let stored = kv.get(key)?;
    let current = match &stored {
        None => None,
        Some(bytes) => {
            let envelope: Envelope<serde::de::IgnoredAny> = serde_json::from_slice(bytes)
                .map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })?;
            Some(envelope.version)
        }
    };
    let conflict = || {
        // What was read may be a cache's: the next read must see the store.
        kv.forget(key);
        StoreError::Conflict { key: key.to_owned() }
    };
    if current != expected {
        return Err(conflict());
    }
    let version = expected.map_or(1, |v| v + 1);
    let bytes =
        serde_json::to_vec(&Envelope { version, doc: value }).map_err(|e| StoreError::Backend(e.to_string()))?;
    // The bytes just read, not only the version: a writer that raced us between the read and
    // this call makes the swap fail.
    if kv.compare_and_swap(key, stored.as_deref(), &bytes)? { Ok(version) } else { Err(conflict()) }
}

/// The stored form of the first version of a document whose key nobody else can know yet (a
/// fresh random id), to write with a plain `set`: all a swap over an absent key is on Spin's
/// SQLite store anyway.
pub fn encode_new<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(&Envelope { version: 1, doc: value }).map_err(|e| StoreError::Backend(e.to_string()))
}

/// Attempts at a read-modify-write before a conflict is reported.
const UPDATE_ATTEMPTS: usize = 8;

/// Reads, changes and writes a document, retrying when another writer got there first.
/// `change` sees `None` when the document does not exist; returning `None` writes nothing.
pub fn update<T, F>(kv: &dyn KvStore, key: &str, mut change: F) -> Result<Option<T>, StoreError>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Option<T>,
{
    for _ in 0..UPDATE_ATTEMPTS {
        let current = load::<T>(kv, key)?;
        let version = current.as_ref().map(|c| c.version);
        let Some(next) = change(current.map(|c| c.value)) else { return Ok(None) };
        match save(kv, key, &next, version) {
            Ok(_) => return Ok(Some(next)),
            Err(StoreError::Conflict { .. }) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict { key: key.to_owned() })
}

/// Adds an id to an index list (once), keeping at most `cap` of the newest. A list that
/// seems to hold the id already is read again from the store before that is believed: a
/// cached copy may predate its removal, and "listed" is a promise (the sweep finds the id).
pub fn add_to_list(kv: &dyn KvStore, key: &str, id: &str, cap: usize) -> Result<(), StoreError> {
    let add = |list: Option<Vec<String>>| {
        let mut list = list.unwrap_or_default();
        if list.iter().any(|x| x == id) {
            return None;
        }
        list.push(id.to_owned());
        if list.len() > cap {
            list.drain(..list.len() - cap);
        }
        Some(list)
    };
    if update::<Vec<String>, _>(kv, key, add)?.is_none() {
        kv.forget(key);
        update::<Vec<String>, _>(kv, key, add)?;
    }
    Ok(())
}

/// Reads a versioned document from the store itself, past any cache: for decisions a long
/// invocation (the sweep) makes about documents others may have changed since it first read
/// them.
pub fn load_fresh<T: DeserializeOwned>(kv: &dyn KvStore, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
    kv.forget(key);
    load(kv, key)
}

/// Removes an id from an index list. An emptied list stays, as `[]`: deleting the key would
/// erase an id another writer added in between (a delete cannot be conditional), and a list
/// that always exists never meets a backend's non-atomic create (see [`create_list`]).
pub fn remove_from_list(kv: &dyn KvStore, key: &str, id: &str) -> Result<(), StoreError> {
    update::<Vec<String>, _>(kv, key, |list| {
        let mut list = list?;
        let before = list.len();
        list.retain(|x| x != id);
        (list.len() != before).then_some(list)
    })
    .map(drop)
}

/// Creates an empty index list unless it exists. Spin's SQLite store makes a swap over an
/// absent key an upsert, so two first writers of one list would both win and one id would be
/// lost; lists that matter are therefore created empty before anything can be added to them
/// (when their policy is created), and are never deleted.
pub fn create_list(kv: &dyn KvStore, key: &str) -> Result<(), StoreError> {
    if kv.get(key)?.is_none() {
        match save::<Vec<String>>(kv, key, &Vec::new(), None) {
            Ok(_) | Err(StoreError::Conflict { .. }) => {}
            Err(other) => return Err(other),
        }
    }
    Ok(())
}

/// Reads an index list (empty when absent).
pub fn read_list(kv: &dyn KvStore, key: &str) -> Result<Vec<String>, StoreError> {
    Ok(load::<Vec<String>>(kv, key)?.map(|v| v.value).unwrap_or_default())
}

/// A bounded index of ids, newest last, with a key per entry: `<name>:n` counts the entries
/// ever added (the store's atomic counter) and entry `k` lives at `<name>:<k mod cap>`, so an
/// addition costs an increment and one write whatever the index's size, and never races
/// another. The entry keeps its number: a slot whose writer died between the two steps shows
/// an older number and is skipped. For listings only: a slot a backend hands out twice
/// (Cosmos DB's increment can) loses one entry from the listing, nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ring {
    name: String,
    cap: u64,
}

impl Ring {
    /// The index stored under `name`, keeping the newest `cap` entries.
    pub fn new(name: String, cap: u64) -> Self {
        Self { name, cap: cap.max(1) }
    }

    fn counter(&self) -> String {
        format!("{}:n", self.name)
    }

    fn slot(&self, entry: u64) -> String {
        format!("{}:{}", self.name, entry % self.cap)
    }

    /// Takes the next entry for `id`: answers the write that stores it, for the caller to
    /// make (with others, in one batch).
    pub fn reserve(&self, kv: &dyn KvStore, id: &str) -> Result<(String, Vec<u8>), StoreError> {
        let entry = u64::try_from(kv.increment(&self.counter(), 1)?).unwrap_or_default();
        Ok((self.slot(entry), format!("{entry} {id}").into_bytes()))
    }

    /// Up to `take` ids, newest first, after skipping the `skip` newest (one batch read).
    pub fn newest(&self, kv: &dyn KvStore, skip: u64, take: u64) -> Result<Vec<String>, StoreError> {
        let count = u64::try_from(kv.increment(&self.counter(), 0)?).unwrap_or_default();
        let numbers: Vec<u64> =
            (1..=count).rev().skip(skip as usize).take(take.min(self.cap.saturating_sub(skip)) as usize).collect();
        if numbers.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = numbers.iter().map(|n| self.slot(*n)).collect();
        let values = kv.get_many(&keys)?;
        Ok(numbers
            .iter()
            .zip(values)
            .filter_map(|(number, value)| {
                let text = String::from_utf8(value?).ok()?;
                let (entry, id) = text.split_once(' ')?;
                (entry.parse::<u64>().ok()? == *number).then(|| id.to_owned())
            })
            .collect())
    }
}

/// An in-memory store, for tests and tools; `fail_writes` makes every write fail.
#[derive(Default)]
pub struct MemStore {
    map: RefCell<BTreeMap<String, Vec<u8>>>,
    counters: RefCell<BTreeMap<String, i64>>,
    /// When set, `set` and `delete` fail with a backend error.
    pub fail_writes: std::cell::Cell<bool>,
}

impl MemStore {
    /// All keys, counters among them, for assertions.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.map.borrow().keys().cloned().collect();
        keys.extend(self.counters.borrow().keys().cloned());
        keys
    }
}

impl KvStore for MemStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        if self.fail_writes.get() {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        self.map.borrow_mut().insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.fail_writes.get() {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        self.map.borrow_mut().remove(key);
        // A counter is a key like any other to delete (as in Spin's stores).
        self.counters.borrow_mut().remove(key);
        Ok(())
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        if self.fail_writes.get() {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let mut map = self.map.borrow_mut();
        if map.get(key).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        map.insert(key.to_owned(), value.to_vec());
        Ok(true)
    }

    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        if self.fail_writes.get() && delta != 0 {
            return Err(StoreError::Backend("injected write failure".into()));
        }
        let mut counters = self.counters.borrow_mut();
        let counter = counters.entry(key.to_owned()).or_default();
        *counter += delta;
        Ok(*counter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_version_is_a_conflict_and_writes_nothing() {
        let kv = MemStore::default();
        assert_eq!(save(&kv, "k", &"a", None), Ok(1));
        assert_eq!(save(&kv, "k", &"b", None), Err(StoreError::Conflict { key: "k".into() }));
        assert_eq!(save(&kv, "k", &"c", Some(1)), Ok(2));
        assert_eq!(save(&kv, "k", &"d", Some(1)), Err(StoreError::Conflict { key: "k".into() }));
        assert_eq!(load::<String>(&kv, "k").unwrap().unwrap(), Versioned { value: "c".into(), version: 2 });
    }

    #[test]
    fn compare_and_swap_writes_only_over_the_expected_value() {
        let kv = MemStore::default();
        assert_eq!(kv.compare_and_swap("k", Some(b"x"), b"a"), Ok(false), "absent is not 'x'");
        assert_eq!(kv.compare_and_swap("k", None, b"a"), Ok(true));
        assert_eq!(kv.compare_and_swap("k", None, b"b"), Ok(false), "present is not absent");
        assert_eq!(kv.compare_and_swap("k", Some(b"a"), b"c"), Ok(true));
        assert_eq!(kv.get("k"), Ok(Some(b"c".to_vec())));
    }

    #[test]
    fn lists_add_once_cap_and_stay_when_emptied() {
        let kv = MemStore::default();
        for id in ["a", "b", "a", "c"] {
            add_to_list(&kv, "l", id, 2).unwrap();
        }
        assert_eq!(read_list(&kv, "l").unwrap(), ["b", "c"]);
        remove_from_list(&kv, "l", "b").unwrap();
        remove_from_list(&kv, "l", "c").unwrap();
        assert_eq!(kv.keys(), ["l"], "an emptied list is kept, never deleted");
        assert!(read_list(&kv, "l").unwrap().is_empty());
    }

    #[test]
    fn an_id_added_while_another_is_removed_is_kept() {
        // The old remove saved `[]` and then deleted the key without a condition: an id added
        // between the two was erased. A rival adds "b" right before the remove's swap.
        let kv = crate::testing::HookedStore::default();
        add_to_list(&kv, "l", "a", usize::MAX).unwrap();
        let mut once = true;
        kv.before_swap(move |mem, _| {
            if std::mem::take(&mut once) {
                add_to_list(mem, "l", "b", usize::MAX)?;
            }
            Ok(())
        });
        remove_from_list(&kv, "l", "a").unwrap();
        kv.clear_hook();
        assert_eq!(read_list(&kv, "l").unwrap(), ["b"]);
    }

    #[test]
    fn creating_a_list_never_overwrites_one_that_exists() {
        let kv = MemStore::default();
        add_to_list(&kv, "l", "a", usize::MAX).unwrap();
        create_list(&kv, "l").unwrap();
        create_list(&kv, "m").unwrap();
        assert_eq!(read_list(&kv, "l").unwrap(), ["a"]);
        assert!(kv.get("m").unwrap().is_some());
    }

    /// A store that counts the round trips it serves.
    #[derive(Default)]
    struct Counting {
        mem: MemStore,
        calls: std::cell::Cell<usize>,
    }

    impl KvStore for Counting {
        fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.mem.get(key)
        }
        fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.mem.set(key, value)
        }
        fn delete(&self, key: &str) -> Result<(), StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.mem.delete(key)
        }
        fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.mem.compare_and_swap(key, expected, value)
        }
        fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
            self.calls.set(self.calls.get() + 1);
            self.mem.increment(key, delta)
        }
        fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
            self.calls.set(self.calls.get() + 1);
            keys.iter().map(|key| self.mem.get(key)).collect()
        }
    }

    #[test]
    fn the_cache_reads_a_key_once_and_a_save_costs_only_its_swap() {
        let cached = Cached::new(Counting::default());
        save(&cached, "doc", &"a", None).unwrap();
        let trips = cached.inner.calls.get();
        assert_eq!(load::<String>(&cached, "doc").unwrap().unwrap().value, "a");
        assert_eq!(save(&cached, "doc", &"b", Some(1)), Ok(2));
        assert_eq!(cached.inner.calls.get() - trips, 1, "the read and the swap's own check came from the cache");
        // One batch fills the cache for several keys, absent ones too.
        cached.inner.mem.set("x", b"1").unwrap();
        assert_eq!(cached.get_many(&["x".into(), "y".into(), "doc".into()]).unwrap()[0], Some(b"1".to_vec()));
        let trips = cached.inner.calls.get();
        assert_eq!((cached.get("x").unwrap(), cached.get("y").unwrap()), (Some(b"1".to_vec()), None));
        assert_eq!(cached.inner.calls.get(), trips);
        // A key asked twice is read once and answered twice.
        cached.inner.mem.set("z", b"2").unwrap();
        let twice = cached.get_many(&["z".into(), "z".into()]).unwrap();
        assert_eq!(twice, [Some(b"2".to_vec()), Some(b"2".to_vec())]);
    }

    #[test]
    fn a_lost_race_makes_the_cache_read_the_store_again() {
        let cached = Cached::new(Counting::default());
        save(&cached, "doc", &"mine", None).unwrap();
        // Another instance writes behind the cache's back.
        save(&cached.inner.mem, "doc", &"theirs", Some(1)).unwrap();
        assert_eq!(load::<String>(&cached, "doc").unwrap().unwrap().value, "mine", "stale, until a swap says so");
        assert_eq!(save(&cached, "doc", &"again", Some(1)), Err(StoreError::Conflict { key: "doc".into() }));
        assert_eq!(load::<String>(&cached, "doc").unwrap().unwrap().value, "theirs", "read afresh");
        // update() retries through the cache and wins on the fresh read.
        update::<String, _>(&cached, "doc", |_| Some("merged".into())).unwrap();
        assert_eq!(
            load::<String>(&cached.inner.mem, "doc").unwrap().unwrap(),
            Versioned { value: "merged".into(), version: 3 }
        );
        // A raw swap that fails forgets too.
        cached.inner.mem.set("raw", b"theirs").unwrap();
        cached.set("raw", b"mine").unwrap();
        cached.inner.mem.set("raw", b"newer").unwrap();
        assert_eq!(cached.compare_and_swap("raw", Some(b"mine"), b"x"), Ok(false));
        assert_eq!(cached.get("raw").unwrap(), Some(b"newer".to_vec()));
    }

    #[test]
    fn an_id_the_cache_believes_listed_is_listed_again_when_the_store_lost_it() {
        // The sweep (another instance) drops the id after this invocation cached the list:
        // "add" must not trust the cached copy, or the id is left unlisted.
        let cached = Cached::new(Counting::default());
        add_to_list(&cached, "work", "x", usize::MAX).unwrap();
        remove_from_list(&cached.inner.mem, "work", "x").unwrap();
        add_to_list(&cached, "work", "x", usize::MAX).unwrap();
        assert_eq!(read_list(&cached.inner.mem, "work").unwrap(), ["x"]);
    }

    #[test]
    fn a_ring_lists_the_newest_entries_first_and_keeps_only_its_cap() {
        let kv = MemStore::default();
        let ring = Ring::new("idx:r".into(), 3);
        for id in ["a", "b", "c", "d"] {
            let (key, value) = ring.reserve(&kv, id).unwrap();
            kv.set(&key, &value).unwrap();
        }
        assert_eq!(ring.newest(&kv, 0, 10).unwrap(), ["d", "c", "b"]);
        assert_eq!(ring.newest(&kv, 1, 1).unwrap(), ["c"]);
        assert!(ring.newest(&kv, 3, 10).unwrap().is_empty(), "nothing beyond the cap");
        // A writer that took an entry and died before writing it leaves the slot's older
        // entry, which is not listed in its place.
        ring.reserve(&kv, "e").unwrap();
        assert_eq!(ring.newest(&kv, 0, 10).unwrap(), ["d", "c"]);
        assert_eq!(kv.keys().len(), 4, "a counter and three slots, whatever the number of entries");
    }

    #[test]
    fn corrupt_documents_are_reported_with_their_key() {
        let kv = MemStore::default();
        kv.set("req:x", b"{not json").unwrap();
        assert!(matches!(load::<String>(&kv, "req:x"), Err(StoreError::Corrupt { key, .. }) if key == "req:x"));
    }
}
