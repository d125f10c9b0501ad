//! The portcullis test host: a Spin-compatible host on wasmtime that runs the real
//! components from `spin.toml`, and a local Azure Resource Manager emulator.
//!
//! - [`host`]: routing, the key-value store, variables, outbound HTTP, cron.
//! - [`emulator`]: ARM's token endpoint and NSG security-rule API on loopback.
//! - [`local`]: the two wired together with demo settings (the README's first command).
//! - [`receiver`]: a webhook receiver that records and checks deliveries.
//! - [`redis_server`]: a throwaway `redis-server` for the outbound-Redis store.

pub mod emulator;
pub mod host;
pub mod local;
pub mod receiver;
pub mod redis_server;

/// Where the build script put the components' `.wasm` files.
pub const GUEST_DIR: &str = env!("PORTCULLIS_GUEST_DIR");

/// The workspace's `spin.toml`.
pub fn manifest_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../spin.toml")
}
