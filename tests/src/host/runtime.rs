//! The wasmtime side: the engine, compiled components, a fresh store per invocation, and
//! the Spin interfaces the guests import (key-value, variables) plus WASI and outbound HTTP.

mod spin_redis;
mod wasi_keyvalue;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use wasmtime::component::{Component, HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{HostWallClock, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use super::kv::{KvBackend, Op};
use super::manifest::{Manifest, expand};

mod spin_bindings {
    wasmtime::component::bindgen!({
        path: "wit/spin.wit",
        world: "host",
        with: {
            "fermyon:spin/key-value.store": super::KvHandle,
            "fermyon:spin/redis.connection": super::spin_redis::RedisHandle,
        },
    });
}

mod cron_bindings {
    wasmtime::component::bindgen!({
        path: "../expire-fn/wit",
        world: "spin-cron",
        exports: { default: async },
    });
}

use spin_bindings::fermyon::spin::{key_value, redis as spin_redis_wit, variables};

/// An open key-value store inside a guest.
pub struct KvHandle {
    label: String,
}

/// The guests' wall clock: real time plus an offset tests can move forward.
#[derive(Clone, Default)]
pub struct VirtualClock(Arc<AtomicI64>);

impl VirtualClock {
    /// Moves guest time forward (or back).
    pub fn advance(&self, by: chrono::TimeDelta) {
        self.0.fetch_add(by.num_milliseconds(), Ordering::SeqCst);
    }

    /// Sets guest time to real time plus `offset`.
    pub fn set_offset(&self, offset: chrono::TimeDelta) {
        self.0.store(offset.num_milliseconds(), Ordering::SeqCst);
    }

    /// Guest time now.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::Utc::now() + chrono::TimeDelta::milliseconds(self.0.load(Ordering::SeqCst))
    }
}

impl HostWallClock for VirtualClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        let real = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let offset = self.0.load(Ordering::SeqCst);
        if offset >= 0 {
            real + Duration::from_millis(offset as u64)
        } else {
            real.saturating_sub(Duration::from_millis(offset.unsigned_abs()))
        }
    }
}

/// Where a component may connect: `scheme://host[:port]`, `*` allowed for host and port.
#[derive(Clone, Debug, PartialEq)]
struct AllowedHost {
    scheme: String,
    host: String,
    port: Option<String>,
}

impl AllowedHost {
    fn parse(entry: &str) -> Result<Self> {
        let (scheme, rest) = entry
            .split_once("://")
            .with_context(|| format!("allowed_outbound_hosts entry '{entry}' needs a scheme"))?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            bail!("allowed_outbound_hosts entry '{entry}' must not have a path");
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || rest.starts_with('[') => {
                (host.to_owned(), Some(port.to_owned()))
            }
            _ => (rest.to_owned(), None),
        };
        Ok(Self { scheme: scheme.to_owned(), host, port })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let default_port = match scheme {
            "https" => 443,
            "redis" | "rediss" => 6379,
            _ => 80,
        };
        let scheme_ok = self.scheme == "*" || self.scheme == scheme;
        let host_ok = self.host == "*"
            || self.host.eq_ignore_ascii_case(host)
            || self.host.strip_prefix("*.").is_some_and(|suffix| host.ends_with(&format!(".{suffix}")));
        let port_ok = match &self.port {
            None => port == default_port,
            Some(p) if p == "*" => true,
            Some(p) => p.parse() == Ok(port),
        };
        scheme_ok && host_ok && port_ok
    }
}

/// The outbound hook: refuses destinations not in `allowed_outbound_hosts`.
struct OutboundPolicy {
    allowed: Arc<Vec<AllowedHost>>,
    component: String,
    log: GuestLog,
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        _ = fut;
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_owned();
        let host = uri.host().unwrap_or_default().to_owned();
        let port = uri.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        if !self.allowed.iter().any(|a| a.allows(&scheme, &host, port)) {
            self.log.push(
                &self.component,
                &format!("outbound request to {scheme}://{host}:{port} refused: not in allowed_outbound_hosts"),
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        Box::new(async move {
            use http_body_util::BodyExt;
            let (response, io) = wasmtime_wasi_http::default_send_request(request, options).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

/// Everything guests print, by component, for dumping when a test fails.
#[derive(Clone, Default)]
pub struct GuestLog {
    lines: Arc<Mutex<Vec<String>>>,
    echo: bool,
}

impl GuestLog {
    /// A log that also prints every line as it arrives.
    pub fn echoing() -> Self {
        Self { echo: true, ..Self::default() }
    }

    fn push(&self, component: &str, text: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let line = format!("[{component}] {line}");
            if self.echo {
                eprintln!("{line}");
            }
            self.lines.lock().unwrap().push(line);
        }
    }

    /// A line from the host itself.
    pub fn push_host(&self, text: &str) {
        self.push("host", text);
    }

    /// Everything so far.
    pub fn contents(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// Per-invocation state of a guest.
pub struct GuestState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: OutboundPolicy,
    kv: Arc<KvBackend>,
    stores: Arc<Vec<String>>,
    variables: Arc<HashMap<String, String>>,
    /// Compare-and-swap handles opened by this invocation (Spin's table holds 256 at most).
    swaps_opened: u32,
    /// Outbound Redis commands of this invocation, and how many of them were scripts that can
    /// write (compare-and-swaps).
    redis_commands: u32,
    redis_scripts: u32,
}

/// Figures over every invocation a runtime ran, for reports (the storm prints them).
#[derive(Default)]
pub struct InvocationStats {
    invocations: std::sync::atomic::AtomicU64,
    most_swaps: std::sync::atomic::AtomicU32,
    most_redis_scripts: std::sync::atomic::AtomicU32,
    redis_commands: std::sync::atomic::AtomicU64,
}

impl InvocationStats {
    fn record(&self, state: &GuestState) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        self.most_swaps.fetch_max(state.swaps_opened, Ordering::Relaxed);
        self.most_redis_scripts.fetch_max(state.redis_scripts, Ordering::Relaxed);
        self.redis_commands.fetch_add(u64::from(state.redis_commands), Ordering::Relaxed);
    }

    /// Outbound Redis commands so far (each one round trip).
    pub fn redis_commands(&self) -> u64 {
        self.redis_commands.load(Ordering::Relaxed)
    }

    /// One line: invocations, the most key-value swaps and Redis scripts one invocation made,
    /// and all Redis commands.
    pub fn summary(&self) -> String {
        format!(
            "invocations={} max_kv_swaps_per_invocation={} max_redis_swaps_per_invocation={} redis_commands={}",
            self.invocations.load(Ordering::Relaxed),
            self.most_swaps.load(Ordering::Relaxed),
            self.most_redis_scripts.load(Ordering::Relaxed),
            self.redis_commands.load(Ordering::Relaxed)
        )
    }
}

/// The compare-and-swap handles one invocation may open: Spin's key-value host keeps them in a
/// table of 256 and frees none until the invocation ends.
pub const MAX_SWAPS_PER_INVOCATION: u32 = 256;

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for GuestState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

fn kv_error(error: anyhow::Error) -> key_value::Error {
    key_value::Error::Other(error.to_string())
}

impl key_value::Host for GuestState {}

impl key_value::HostStore for GuestState {
    fn open(&mut self, label: String) -> Result<Resource<KvHandle>, key_value::Error> {
        if !self.stores.contains(&label) {
            return Err(key_value::Error::AccessDenied);
        }
        if label != "default" {
            return Err(key_value::Error::NoSuchStore);
        }
        self.table.push(KvHandle { label }).map_err(|e| key_value::Error::Other(e.to_string()))
    }

    fn get(&mut self, store: Resource<KvHandle>, key: String) -> Result<Option<Vec<u8>>, key_value::Error> {
        let label = &self.table.get(&store).map_err(|e| key_value::Error::Other(e.to_string()))?.label;
        self.kv.fault(Op::Read).map_err(kv_error)?;
        self.kv.get(label, &key).map_err(kv_error)
    }

    fn set(&mut self, store: Resource<KvHandle>, key: String, value: Vec<u8>) -> Result<(), key_value::Error> {
        let label = &self.table.get(&store).map_err(|e| key_value::Error::Other(e.to_string()))?.label;
        self.kv.fault(Op::Write).map_err(kv_error)?;
        self.kv.set(label, &key, &value).map_err(kv_error)
    }

    fn delete(&mut self, store: Resource<KvHandle>, key: String) -> Result<(), key_value::Error> {
        let label = &self.table.get(&store).map_err(|e| key_value::Error::Other(e.to_string()))?.label;
        self.kv.fault(Op::Write).map_err(kv_error)?;
        self.kv.delete(label, &key).map_err(kv_error)
    }

    fn exists(&mut self, store: Resource<KvHandle>, key: String) -> Result<bool, key_value::Error> {
        let label = &self.table.get(&store).map_err(|e| key_value::Error::Other(e.to_string()))?.label;
        self.kv.fault(Op::Read).map_err(kv_error)?;
        self.kv.get(label, &key).map(|v| v.is_some()).map_err(kv_error)
    }

    fn get_keys(&mut self, store: Resource<KvHandle>) -> Result<Vec<String>, key_value::Error> {
        let label = &self.table.get(&store).map_err(|e| key_value::Error::Other(e.to_string()))?.label;
        self.kv.keys(label).map_err(kv_error)
    }

    fn drop(&mut self, store: Resource<KvHandle>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        Ok(())
    }
}

impl variables::Host for GuestState {
    fn get(&mut self, name: String) -> Result<String, variables::Error> {
        self.variables
            .get(&name)
            .cloned()
            .ok_or(variables::Error::Undefined(format!("no variable '{name}' for this component")))
    }
}

/// One component, compiled and pre-linked, with its resolved configuration.
struct LoadedComponent {
    pre: ProxyPre<GuestState>,
    variables: Arc<HashMap<String, String>>,
    allowed: Arc<Vec<AllowedHost>>,
    stores: Arc<Vec<String>>,
}

/// All components of an application, ready to instantiate.
pub struct Runtime {
    components: HashMap<String, LoadedComponent>,
    kv: Arc<KvBackend>,
    /// The guests' wall clock.
    pub clock: VirtualClock,
    /// What guests printed.
    pub log: GuestLog,
    /// Figures over all invocations.
    pub stats: Arc<InvocationStats>,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = Config::new();
        config.wasm_component_model(true);
        // `PORTCULLIS_PERFMAP=1`: guest code is named in `perf report` (wasmtime's perf map;
        // build the guests with `CARGO_PROFILE_RELEASE_STRIP=false` to keep their names).
        if std::env::var_os("PORTCULLIS_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        // Spin instantiates from a pool of memory mapped in advance when the machine lets it
        // reserve the address space, and on demand otherwise; so does this host.
        // `PORTCULLIS_ON_DEMAND=1` compares the two.
        if std::env::var_os("PORTCULLIS_ON_DEMAND").is_none() {
            let mut pooled = config.clone();
            pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool()));
            match Engine::new(&pooled) {
                Ok(engine) => return engine,
                Err(error) => eprintln!("host: no pooling allocator here ({error}); instances are allocated on demand"),
            }
        }
        Engine::new(&config).expect("wasmtime engine")
    })
}

/// The instance pool: room for as many guests at once as a busy test or benchmark runs
/// (each guest is one component instance of a few core instances, one memory and a few
/// tables), with Spin's own per-component limits.
fn pool() -> PoolingAllocationConfig {
    const INSTANCES: u32 = 1_000;
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(INSTANCES)
        .total_core_instances(4 * INSTANCES)
        .total_memories(INSTANCES)
        .total_tables(4 * INSTANCES)
        .total_stacks(INSTANCES)
        .max_memories_per_component(10)
        .max_tables_per_component(20)
        .max_memory_size(1 << 30);
    pool
}

/// Compiles a component once per process (tests start many hosts on the same files).
fn compile(path: &Path) -> Result<Component> {
    static CACHE: OnceLock<Mutex<HashMap<(PathBuf, SystemTime), Component>>> = OnceLock::new();
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("{} is missing: build the components first", path.display()))?;
    let key = (path.to_owned(), modified);
    let cache = CACHE.get_or_init(Default::default);
    if let Some(component) = cache.lock().unwrap().get(&key) {
        return Ok(component.clone());
    }
    let component = Component::from_file(engine(), path)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    cache.lock().unwrap().insert(key, component.clone());
    Ok(component)
}

impl Runtime {
    /// Loads every component of the manifest, resolving variables and outbound hosts.
    pub fn new(
        manifest: &Manifest,
        manifest_dir: &Path,
        guest_dir: Option<&Path>,
        overrides: &HashMap<String, String>,
        kv: Arc<KvBackend>,
        log: GuestLog,
    ) -> Result<Self> {
        let app_variables = manifest.resolve_variables(overrides)?;
        let mut linker: Linker<GuestState> = Linker::new(engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        key_value::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        variables::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        spin_redis_wit::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        wasi_keyvalue::add_to_linker(&mut linker)?;
        let mut components = HashMap::new();
        for (id, def) in &manifest.component {
            let path = manifest.source_path(manifest_dir, id, guest_dir);
            let component = compile(&path)?;
            let pre = ProxyPre::new(
                linker
                    .instantiate_pre(&component)
                    .map_err(anyhow::Error::from)
                    .with_context(|| format!("linking component '{id}'"))?,
            )?;
            let variables = def
                .variables
                .iter()
                .map(|(k, v)| Ok((k.clone(), expand(v, &app_variables)?)))
                .collect::<Result<HashMap<_, _>>>()?;
            let allowed = def
                .allowed_outbound_hosts
                .iter()
                .map(|h| AllowedHost::parse(&expand(h, &app_variables)?))
                .collect::<Result<Vec<_>>>()?;
            components.insert(
                id.clone(),
                LoadedComponent {
                    pre,
                    variables: Arc::new(variables),
                    allowed: Arc::new(allowed),
                    stores: Arc::new(def.key_value_stores.clone()),
                },
            );
        }
        Ok(Self { components, kv, clock: VirtualClock::default(), log, stats: Arc::default() })
    }

    fn store(&self, id: &str) -> Result<(Store<GuestState>, &LoadedComponent, MemoryOutputPipe, MemoryOutputPipe)> {
        let component = self.components.get(id).ok_or_else(|| anyhow!("no component '{id}'"))?;
        let (stdout, stderr) = (MemoryOutputPipe::new(1 << 20), MemoryOutputPipe::new(1 << 20));
        let wasi =
            WasiCtx::builder().stdout(stdout.clone()).stderr(stderr.clone()).wall_clock(self.clock.clone()).build();
        let state = GuestState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: OutboundPolicy {
                allowed: component.allowed.clone(),
                component: id.to_owned(),
                log: self.log.clone(),
            },
            kv: self.kv.clone(),
            stores: component.stores.clone(),
            variables: component.variables.clone(),
            swaps_opened: 0,
            redis_commands: 0,
            redis_scripts: 0,
        };
        Ok((Store::new(engine(), state), component, stdout, stderr))
    }

    fn collect(&self, id: &str, stdout: &MemoryOutputPipe, stderr: &MemoryOutputPipe) {
        self.log.push(id, &String::from_utf8_lossy(&stdout.contents()));
        self.log.push(id, &String::from_utf8_lossy(&stderr.contents()));
    }

    /// Runs a component's `wasi:http/incoming-handler` on a request.
    pub async fn handle_http(
        self: &Arc<Self>,
        id: &str,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<HyperOutgoingBody>> {
        let (mut store, component, stdout, stderr) = self.store(id)?;
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store.data_mut().http().new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let pre = component.pre.clone();
        let runtime = self.clone();
        let id = id.to_owned();
        let task = tokio::task::spawn(async move {
            let result = async {
                let proxy = pre.instantiate_async(&mut store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, incoming, out).await
            }
            .await;
            runtime.stats.record(store.data());
            runtime.collect(&id, &stdout, &stderr);
            if let Err(error) = &result {
                runtime.log.push(&id, &format!("trap: {error:?}"));
            }
            result
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => bail!("guest answered with an error code: {code:?}"),
            Err(_) => match task.await {
                Ok(Ok(())) => bail!("guest never set a response"),
                Ok(Err(error)) => Err(anyhow::Error::from(error).context("guest failed before answering")),
                Err(join) => Err(join.into()),
            },
        }
    }

    /// Runs a component's cron export once, at the guests' current time.
    pub async fn run_cron(&self, id: &str) -> Result<()> {
        let (mut store, component, stdout, stderr) = self.store(id)?;
        let instance = component.pre.instance_pre().instantiate_async(&mut store).await?;
        let cron = cron_bindings::SpinCron::new(&mut store, &instance)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("component '{id}' has no cron export"))?;
        let metadata =
            cron_bindings::fermyon::spin_cron::cron_types::Metadata { timestamp: self.clock.now().timestamp() as u64 };
        let result = cron.call_handle_cron_event(&mut store, metadata).await;
        self.stats.record(store.data());
        self.collect(id, &stdout, &stderr);
        match result? {
            Ok(()) => Ok(()),
            Err(cron_bindings::fermyon::spin_cron::cron_types::Error::Other(message)) => {
                bail!("cron handler of '{id}' failed: {message}")
            }
        }
    }

    /// The key-value store behind every component.
    pub fn kv(&self) -> &KvBackend {
        &self.kv
    }

    /// Every key and value of the default store (values as text), for failure reports.
    pub fn dump_store(&self) -> Vec<(String, String)> {
        let keys = self.kv.keys("default").unwrap_or_default();
        keys.into_iter()
            .map(|k| {
                let value = self
                    .kv
                    .get("default", &k)
                    .ok()
                    .flatten()
                    .map(|v| String::from_utf8_lossy(&v).into_owned())
                    .unwrap_or_default();
                (k, value)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_hosts_match_scheme_host_and_port() {
        let exact = AllowedHost::parse("http://127.0.0.1:3001").unwrap();
        assert!(exact.allows("http", "127.0.0.1", 3001));
        assert!(!exact.allows("http", "127.0.0.1", 3002));
        assert!(!exact.allows("https", "127.0.0.1", 3001));
        let default_port = AllowedHost::parse("https://management.azure.com").unwrap();
        assert!(default_port.allows("https", "management.azure.com", 443));
        assert!(!default_port.allows("https", "evil.example", 443));
        let wildcard = AllowedHost::parse("https://*.azure.com:*").unwrap();
        assert!(wildcard.allows("https", "management.azure.com", 8443));
        assert!(!wildcard.allows("https", "azure.com.evil.example", 443));
    }
}
