//! `wasi:keyvalue@0.2.0-draft2` (store, atomics, batch), the interfaces Spin 3+ offers next to
//! its own key-value API, over the same store: the components use its compare-and-swap.

use wasmtime::component::{HasSelf, Linker, Resource};

use super::{GuestState, KvHandle, MAX_SWAPS_PER_INVOCATION};
use crate::host::kv::Op;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit/keyvalue",
        world: "wasi:keyvalue/imports",
        with: {
            "wasi:keyvalue/store.bucket": crate::host::runtime::KvHandle,
            "wasi:keyvalue/atomics.cas": super::CasHandle,
        },
    });
}

use bindings::wasi::keyvalue::{atomics, batch, store};

/// A compare-and-swap in progress: the key and the value it was read at.
pub struct CasHandle {
    label: String,
    key: String,
    current: Option<Vec<u8>>,
}

/// Adds the three interfaces to a linker.
pub fn add_to_linker(linker: &mut Linker<GuestState>) -> anyhow::Result<()> {
    store::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    atomics::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    batch::add_to_linker::<_, HasSelf<_>>(linker, |state| state)?;
    Ok(())
}

fn other(error: impl std::fmt::Display) -> store::Error {
    store::Error::Other(error.to_string())
}

impl GuestState {
    /// Counts a compare-and-swap handle, refusing past Spin's table size as Spin does.
    fn open_swap(&mut self) -> Result<(), store::Error> {
        if self.swaps_opened >= MAX_SWAPS_PER_INVOCATION {
            return Err(other("too many compare_and_swaps opened"));
        }
        self.swaps_opened += 1;
        Ok(())
    }

    fn bucket_label(&self, bucket: &Resource<KvHandle>) -> Result<String, store::Error> {
        Ok(self.table.get(bucket).map_err(other)?.label.clone())
    }
}

impl store::Host for GuestState {
    fn open(&mut self, identifier: String) -> Result<Resource<KvHandle>, store::Error> {
        if !self.stores.contains(&identifier) {
            return Err(store::Error::AccessDenied);
        }
        if identifier != "default" {
            return Err(store::Error::NoSuchStore);
        }
        self.table.push(KvHandle { label: identifier }).map_err(other)
    }
}

impl store::HostBucket for GuestState {
    fn get(&mut self, bucket: Resource<KvHandle>, key: String) -> Result<Option<Vec<u8>>, store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Read).map_err(other)?;
        self.kv.get(&label, &key).map_err(other)
    }

    fn set(&mut self, bucket: Resource<KvHandle>, key: String, value: Vec<u8>) -> Result<(), store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Write).map_err(other)?;
        self.kv.set(&label, &key, &value).map_err(other)
    }

    fn delete(&mut self, bucket: Resource<KvHandle>, key: String) -> Result<(), store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Write).map_err(other)?;
        self.kv.delete(&label, &key).map_err(other)
    }

    fn exists(&mut self, bucket: Resource<KvHandle>, key: String) -> Result<bool, store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.get(&label, &key).map(|v| v.is_some()).map_err(other)
    }

    fn list_keys(
        &mut self,
        bucket: Resource<KvHandle>,
        cursor: Option<String>,
    ) -> Result<store::KeyResponse, store::Error> {
        if cursor.is_some() {
            return Err(other("this store lists every key at once; there is no next page"));
        }
        let label = self.bucket_label(&bucket)?;
        Ok(store::KeyResponse { keys: self.kv.keys(&label).map_err(other)?, cursor: None })
    }

    fn drop(&mut self, bucket: Resource<KvHandle>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for GuestState {
    fn increment(&mut self, bucket: Resource<KvHandle>, key: String, delta: i64) -> Result<i64, store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Write).map_err(other)?;
        self.kv.increment(&label, &key, delta).map_err(other)
    }

    fn swap(&mut self, cas: Resource<CasHandle>, value: Vec<u8>) -> Result<(), atomics::CasError> {
        let handle = self.table.delete(cas).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        self.kv.fault(Op::Swap).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        let swapped = self
            .kv
            .compare_and_swap(&handle.label, &handle.key, handle.current.as_deref(), &value)
            .map_err(|e| atomics::CasError::StoreError(other(e)))?;
        let reported =
            if self.kv.has_spin_redis_swaps() { !swapped } else { swapped && self.kv.fault(Op::LandedSwap).is_ok() };
        if reported {
            return Ok(());
        }
        // Hand the guest a fresh read, so it can retry from the value that won: another handle.
        self.open_swap().map_err(atomics::CasError::StoreError)?;
        let current = self.kv.get(&handle.label, &handle.key).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        let retry =
            self.table.push(CasHandle { current, ..handle }).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        Err(atomics::CasError::CasFailed(retry))
    }
}

impl atomics::HostCas for GuestState {
    fn new(&mut self, bucket: Resource<KvHandle>, key: String) -> Result<Resource<CasHandle>, store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.open_swap()?;
        self.kv.fault(Op::Read).map_err(other)?;
        let current = self.kv.get(&label, &key).map_err(other)?;
        self.table.push(CasHandle { label, key, current }).map_err(other)
    }

    fn current(&mut self, cas: Resource<CasHandle>) -> Result<Option<Vec<u8>>, store::Error> {
        Ok(self.table.get(&cas).map_err(other)?.current.clone())
    }

    fn drop(&mut self, cas: Resource<CasHandle>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl batch::Host for GuestState {
    fn get_many(
        &mut self,
        bucket: Resource<KvHandle>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Read).map_err(other)?;
        let values = self.kv.get_many(&label, &keys).map_err(other)?;
        Ok(keys.into_iter().zip(values).collect())
    }

    fn set_many(&mut self, bucket: Resource<KvHandle>, entries: Vec<(String, Vec<u8>)>) -> Result<(), store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Write).map_err(other)?;
        self.kv.set_many(&label, &entries).map_err(other)
    }

    fn delete_many(&mut self, bucket: Resource<KvHandle>, keys: Vec<String>) -> Result<(), store::Error> {
        let label = self.bucket_label(&bucket)?;
        self.kv.fault(Op::Write).map_err(other)?;
        self.kv.delete_many(&label, &keys).map_err(other)
    }
}
