//! A Spin-compatible host on wasmtime: reads `spin.toml`, serves HTTP routes, runs cron
//! schedules, and provides the key-value store, variables and outbound HTTP to the guests.

pub mod cron;
pub mod kv;
pub mod manifest;
pub mod router;
pub mod runtime;
pub mod runtime_config;
pub mod server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;

pub use runtime::GuestLog;

/// How to start a host.
pub struct HostOptions {
    /// The Spin manifest.
    pub manifest: PathBuf,
    /// Where the built `.wasm` files are (the build script's output), or `None` for the
    /// manifest's `source` paths.
    pub guest_dir: Option<PathBuf>,
    /// The key-value store (a runtime configuration's `default` store).
    pub store: runtime_config::KeyValueConfig,
    /// Application variable values (win over `SPIN_VARIABLE_*` and defaults).
    pub variables: HashMap<String, String>,
    /// Listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// Whether cron schedules run by themselves (tests tick explicitly instead).
    pub run_cron: bool,
    /// Print guest output as it comes.
    pub echo_guest_logs: bool,
}

/// A running host; stops when dropped.
pub struct Host {
    /// Where it listens.
    pub addr: SocketAddr,
    app: Arc<server::App>,
    cron_components: Vec<String>,
    tasks: Vec<JoinHandle<()>>,
}

impl Host {
    /// Loads the manifest and components and starts serving.
    pub async fn start(options: HostOptions) -> Result<Self> {
        let manifest = manifest::Manifest::load(&options.manifest)?;
        let manifest_dir = options.manifest.parent().context("manifest path has no directory")?.to_owned();
        let kv = Arc::new(match &options.store {
            runtime_config::KeyValueConfig::Sqlite(Some(path)) => kv::KvBackend::open(path)?,
            runtime_config::KeyValueConfig::Sqlite(None) => kv::KvBackend::open(std::path::Path::new(":memory:"))?,
            runtime_config::KeyValueConfig::SpinRedis { .. } => {
                let kv = kv::KvBackend::open(std::path::Path::new(":memory:"))?;
                kv.spin_redis_swaps(true);
                kv
            }
        });
        let log = if options.echo_guest_logs { GuestLog::echoing() } else { GuestLog::default() };
        let runtime = Arc::new(runtime::Runtime::new(
            &manifest,
            &manifest_dir,
            options.guest_dir.as_deref(),
            &options.variables,
            kv,
            log,
        )?);
        let mut router = router::Router::default();
        for trigger in &manifest.trigger.http {
            router.add(&trigger.route, &trigger.component);
        }
        let app = Arc::new(server::App { router, runtime: runtime.clone() });
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("binding {}", options.listen))?;
        let addr = listener.local_addr()?;
        let mut tasks = vec![tokio::spawn(server::serve(listener, app.clone()))];
        let mut cron_components = Vec::new();
        for trigger in &manifest.trigger.cron {
            let job = cron::CronJob::new(&trigger.component, &trigger.cron_expression)?;
            cron_components.push(trigger.component.clone());
            if options.run_cron {
                tasks.push(tokio::spawn(cron::run(job, runtime.clone())));
            }
        }
        Ok(Self { addr, app, cron_components, tasks })
    }

    /// The base URL (`http://127.0.0.1:port`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The guests' clock.
    pub fn clock(&self) -> &runtime::VirtualClock {
        &self.app.runtime.clock
    }

    /// Runs every cron-triggered component once, now, as a tick of its schedule would.
    pub async fn tick(&self) -> Result<()> {
        for component in &self.cron_components {
            self.app.runtime.run_cron(component).await?;
        }
        Ok(())
    }

    /// What the guests printed.
    pub fn guest_logs(&self) -> String {
        self.app.runtime.log.contents()
    }

    /// The key-value store's contents.
    pub fn dump_store(&self) -> Vec<(String, String)> {
        self.app.runtime.dump_store()
    }

    /// Figures over every invocation so far (see [`runtime::InvocationStats::summary`]).
    pub fn stats_summary(&self) -> String {
        self.app.runtime.stats.summary()
    }

    /// The figures themselves.
    pub fn stats(&self) -> &runtime::InvocationStats {
        &self.app.runtime.stats
    }

    /// The key-value store itself, for tests that play an attacker with write access to it.
    pub fn store(&self) -> &kv::KvBackend {
        self.app.runtime.kv()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
