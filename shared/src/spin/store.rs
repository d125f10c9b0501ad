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

    #[cfg(feature = "atomics")]
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        use spin_sdk::wit::wasi::keyvalue::{atomics, store};
        let backend = |e: store::Error| StoreError::Backend(format!("{e:?}"));
        let bucket = match self.bucket.get() {
            Some(bucket) => bucket,
            None => {
                let bucket = store::open(STORE_LABEL).map_err(backend)?;
                self.bucket.get_or_init(|| bucket)
            }
        };
        let cas = atomics::Cas::new(bucket, key).map_err(backend)?;
        if cas.current().map_err(backend)?.as_deref() != expected {
            return Ok(false);
        }
        match atomics::swap(cas, value) {
            Ok(()) => Ok(true),
            Err(atomics::CasError::CasFailed(_)) => Ok(false),
            Err(atomics::CasError::StoreError(e)) => Err(backend(e)),
        }
    }

    /// Without atomics (hosts that offer none, such as Akamai Functions) the check and the
    /// write are two calls: safe for one instance at a time, racy across several.
    #[cfg(not(feature = "atomics"))]
    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        if self.get(key)?.as_deref() != expected {
            return Ok(false);
        }
        self.set(key, value).map(|()| true)
    }
}
