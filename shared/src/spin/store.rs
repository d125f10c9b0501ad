//! The key-value port on Spin.

use spin_sdk::key_value::Store;

use crate::store::{KvStore, StoreError};

/// The label of the store every component uses.
const STORE_LABEL: &str = "default";

/// The Spin key-value store: `fermyon:spin/key-value` for reads and writes, and
/// `wasi:keyvalue/atomics` on the same store for compare-and-swap.
pub struct SpinStore {
    store: Store,
    #[cfg(feature = "atomics")]
    bucket: std::cell::OnceCell<spin_sdk::wit::wasi::keyvalue::store::Bucket>,
}

impl SpinStore {
    /// Opens the default store.
    pub fn open() -> Result<Self, StoreError> {
        let store = Store::open(STORE_LABEL).map_err(|e| StoreError::Backend(format!("opening the store: {e}")))?;
        Ok(Self {
            store,
            #[cfg(feature = "atomics")]
            bucket: std::cell::OnceCell::new(),
        })
    }
}

impl KvStore for SpinStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get(key).map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.store.set(key, value).map_err(|e| StoreError::Backend(e.to_string()))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(key).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// A swap reported as failed counts as not written, and the caller re-reads and decides,
    /// as after any lost race (Spin's Cosmos DB backend reports throttling and timeouts as
    /// `cas-failed`, also when the write landed). But when our value is there, the store may
    /// be Spin's `type = "redis"` key-value backend, which reports every landed swap as failed
    /// and every lost race as success: a race staged on a fresh key tells them apart, and such
    /// a store is refused.
    #[cfg(feature = "atomics")]
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        match self.swap_once(key, expected, value)? {
            Swap::Done => Ok(true),
            Swap::Stale => Ok(false),
            Swap::ReportedFailed => {
                if self.get(key)?.as_deref() == Some(value) && self.swaps_lie()? {
                    return Err(StoreError::Unsupported(BROKEN_SWAPS));
                }
                Ok(false)
            }
        }
    }

    #[cfg(feature = "atomics")]
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        spin_sdk::wit::wasi::keyvalue::atomics::increment(self.bucket()?, key, delta).map_err(backend)
    }

    /// One round trip through `wasi:keyvalue/batch` (offered with atomics, Spin 3+).
    #[cfg(feature = "atomics")]
    fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let found = spin_sdk::wit::wasi::keyvalue::batch::get_many(self.bucket()?, keys).map_err(backend)?;
        // The answer is keyed; a backend may leave absent keys out, change the order, or
        // answer a key asked twice once.
        let found: std::collections::HashMap<String, Option<Vec<u8>>> = found.into_iter().collect();
        Ok(keys.iter().map(|key| found.get(key).cloned().flatten()).collect())
    }

    #[cfg(feature = "atomics")]
    fn set_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        spin_sdk::wit::wasi::keyvalue::batch::set_many(self.bucket()?, entries).map_err(backend)
    }

    #[cfg(feature = "atomics")]
    fn delete_many(&self, keys: &[String]) -> Result<(), StoreError> {
        spin_sdk::wit::wasi::keyvalue::batch::delete_many(self.bucket()?, keys).map_err(backend)
    }

    /// Without atomics (hosts that offer none, such as Akamai Functions) the check and the
    /// write are two calls, and Spin runs invocations concurrently even on one instance: two
    /// writers can both pass the check and one update is lost. Not safe for production.
    #[cfg(not(feature = "atomics"))]
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        if self.get(key)?.as_deref() != expected {
            return Ok(false);
        }
        self.set(key, value).map(|()| true)
    }

    /// Without atomics: a read and a write, as racy as the swap above. The counter is kept as
    /// decimal text.
    #[cfg(not(feature = "atomics"))]
    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        let current = match self.get(key)? {
            None => 0,
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| t.parse::<i64>().ok())
                .ok_or_else(|| StoreError::Corrupt { key: key.to_owned(), reason: "not a counter".into() })?,
        };
        let sum = current + delta;
        if delta != 0 {
            self.set(key, sum.to_string().as_bytes())?;
        }
        Ok(sum)
    }
}

/// Why the components refuse a store whose swaps cannot be trusted.
#[cfg(feature = "atomics")]
const BROKEN_SWAPS: &str = "the key-value store reports compare-and-swaps that lost their race as \
    successful (and those that landed as failed), as Spin's `type = \"redis\"` key-value backend does: \
    portcullis refuses to run on it. Use store = \"redis\" with redis_url (outbound Redis), Azure Cosmos DB, or SQLite on one instance";

/// What one swap attempt found.
#[cfg(feature = "atomics")]
enum Swap {
    Done,
    /// The key held something else.
    Stale,
    /// The host said `cas-failed` after the comparison passed.
    ReportedFailed,
}

#[cfg(feature = "atomics")]
impl SpinStore {
    /// Whether the store reports a swap that lost its race as a success, as Spin's `type =
    /// "redis"` backend does: a fresh key is written, a swap is prepared on it, the key is
    /// written again behind the swap's back, and the swap must fail. A store that reports
    /// errors as failures (Cosmos DB throttling) cannot pass for a liar this way.
    fn swaps_lie(&self) -> Result<bool, StoreError> {
        use spin_sdk::wit::wasi::keyvalue::atomics;
        let nonce = u64::from_le_bytes(wasi::random::random::get_random_bytes(8).try_into().unwrap_or_default());
        let probe = crate::keys::swap_probe(nonce);
        self.set(&probe, b"before")?;
        let cas = atomics::Cas::new(self.bucket()?, &probe).map_err(backend)?;
        cas.current().map_err(backend)?;
        self.set(&probe, b"meanwhile")?;
        let lied = atomics::swap(cas, b"after").is_ok();
        let _ = self.delete(&probe);
        Ok(lied)
    }

    fn swap_once(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<Swap, StoreError> {
        use spin_sdk::wit::wasi::keyvalue::atomics;
        let cas = atomics::Cas::new(self.bucket()?, key).map_err(backend)?;
        if cas.current().map_err(backend)?.as_deref() != expected {
            return Ok(Swap::Stale);
        }
        match atomics::swap(cas, value) {
            Ok(()) => Ok(Swap::Done),
            Err(atomics::CasError::CasFailed(_)) => Ok(Swap::ReportedFailed),
            Err(atomics::CasError::StoreError(e)) => Err(backend(e)),
        }
    }
}

#[cfg(feature = "atomics")]
fn backend(e: spin_sdk::wit::wasi::keyvalue::store::Error) -> StoreError {
    StoreError::Backend(format!("{e:?}"))
}

#[cfg(feature = "atomics")]
impl SpinStore {
    /// The `wasi:keyvalue` bucket of the same store, opened on first use.
    fn bucket(&self) -> Result<&spin_sdk::wit::wasi::keyvalue::store::Bucket, StoreError> {
        if let Some(bucket) = self.bucket.get() {
            return Ok(bucket);
        }
        let bucket = spin_sdk::wit::wasi::keyvalue::store::open(STORE_LABEL).map_err(backend)?;
        Ok(self.bucket.get_or_init(|| bucket))
    }
}
