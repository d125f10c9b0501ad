//! The whole service on one machine: the host running the components, with the ARM
//! emulator in the same process and demo credentials. The README's first command.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use sha2::{Digest, Sha256};

use crate::emulator::{self, Emulator};
use crate::host::runtime_config::{KeyValueConfig, RuntimeConfig};
use crate::host::{Host, HostOptions};

/// A demo API key and who it stands for.
pub struct DemoKey {
    /// The key itself.
    pub key: &'static str,
    /// The principal.
    pub principal: &'static str,
    /// Its groups.
    pub groups: &'static [&'static str],
    /// Its roles.
    pub roles: &'static [&'static str],
}

/// The demo keys printed at start-up.
pub const DEMO_KEYS: [DemoKey; 3] = [
    DemoKey { key: "demo-admin", principal: "admin", groups: &[], roles: &["admin", "auditor"] },
    DemoKey { key: "demo-alice", principal: "alice", groups: &["devs"], roles: &["requester"] },
    DemoKey { key: "demo-bob", principal: "bob", groups: &["ops"], roles: &["approver"] },
];

/// The demo sweep secret.
pub const DEMO_SWEEP_SECRET: &str = "demo-sweep-secret";

/// The `api_keys` variable for a set of keys (hashes only, as in production).
pub fn api_keys_json(keys: &[DemoKey]) -> String {
    let entries: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| serde_json::json!({"sha256": hex::encode(Sha256::digest(k.key.as_bytes())), "principal": k.principal, "groups": k.groups, "roles": k.roles}))
        .collect();
    serde_json::Value::Array(entries).to_string()
}

/// Whether the environment sets a variable (`SPIN_VARIABLE_<NAME>`), which then wins over the
/// demo default.
pub fn from_environment(name: &str) -> bool {
    std::env::var_os(format!("SPIN_VARIABLE_{}", name.to_uppercase())).is_some()
}

/// How to start the local service.
pub struct LocalOptions {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// Where the ARM emulator listens.
    pub emulator_listen: SocketAddr,
    /// Where the key-value store's SQLite file goes.
    pub state_dir: PathBuf,
    /// Whether the cron schedule runs by itself.
    pub run_cron: bool,
    /// Print guest output as it comes.
    pub echo_guest_logs: bool,
    /// Emulator: polls before an operation completes.
    pub polls: u32,
    /// Emulator: advertised `Retry-After` seconds.
    pub retry_after: u64,
    /// Extra or overriding application variables (`{emulator}` is replaced by its URL).
    pub variables: HashMap<String, String>,
    /// Another manifest than the workspace's `spin.toml` (the benchmark adds its floor).
    pub manifest: Option<PathBuf>,
    /// A Spin runtime configuration file (`spin up --runtime-config-file`); without one, or
    /// when it sets no default store, state is SQLite in `state_dir`.
    pub runtime_config: Option<PathBuf>,
}

impl LocalOptions {
    /// On free loopback ports, state in `state_dir`, no cron, quiet guests, and an emulator
    /// that reports each operation in progress once: what tests and benchmarks start from.
    pub fn ephemeral(state_dir: &std::path::Path) -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("an address"),
            emulator_listen: "127.0.0.1:0".parse().expect("an address"),
            state_dir: state_dir.to_owned(),
            run_cron: false,
            echo_guest_logs: false,
            polls: 1,
            retry_after: 0,
            variables: HashMap::new(),
            manifest: None,
            runtime_config: None,
        }
    }
}

/// The running service.
pub struct Local {
    /// The ARM emulator.
    pub emulator: Emulator,
    /// The Spin host.
    pub host: Host,
}

/// Starts the emulator, then the host pointed at it.
pub async fn start(options: LocalOptions) -> Result<Local> {
    std::fs::create_dir_all(&options.state_dir)?;
    let emulator = Emulator::start(options.emulator_listen, options.polls, options.retry_after).await?;
    // Demo settings, each unless the environment sets it as Spin would read it
    // (`SPIN_VARIABLE_API_KEYS`, ...): someone trying their own keys locally gets them.
    let mut variables: HashMap<String, String> = [
        ("arm_base_url", emulator.url()),
        ("login_base_url", emulator.url()),
        ("arm_tenant_id", emulator::TENANT.to_owned()),
        ("arm_client_id", emulator::CLIENT_ID.to_owned()),
        ("arm_client_secret", emulator::CLIENT_SECRET.to_owned()),
        ("api_keys", api_keys_json(&DEMO_KEYS)),
        ("sweep_secret", DEMO_SWEEP_SECRET.to_owned()),
    ]
    .into_iter()
    .filter(|(name, _)| !from_environment(name))
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    // Overrides may point at the emulator before its port is known: `{emulator}` stands for its URL.
    variables.extend(options.variables.into_iter().map(|(k, v)| (k, v.replace("{emulator}", &emulator.url()))));
    let runtime_config = options.runtime_config.as_deref().map(RuntimeConfig::load).transpose()?;
    for ignored in runtime_config.iter().flat_map(|c| &c.ignored) {
        eprintln!("runtime config: '{ignored}' is ignored by this host");
    }
    let store = runtime_config
        .and_then(|c| c.default_store)
        .unwrap_or_else(|| KeyValueConfig::Sqlite(Some(options.state_dir.join("kv.sqlite"))));
    let host = Host::start(HostOptions {
        manifest: options.manifest.unwrap_or_else(crate::manifest_path),
        guest_dir: Some(PathBuf::from(crate::GUEST_DIR)),
        store,
        variables,
        listen: options.listen,
        run_cron: options.run_cron,
        echo_guest_logs: options.echo_guest_logs,
    })
    .await?;
    Ok(Local { emulator, host })
}
