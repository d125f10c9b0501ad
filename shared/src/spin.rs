//! Spin adapters for the ports, and the request/response plumbing the three components share.

use std::net::IpAddr;
use std::time::Duration;

use spin_sdk::http::{Request, Response};
use spin_sdk::key_value::Store;
use spin_sdk::wit::wasi::http0_2_0::{outgoing_handler, types as wasi_http};

use crate::api::{ApiError, Reply};
use crate::arm::ArmClient;
use crate::auth::{self, Caller};
use crate::config::{Config, Variables};
use crate::domain::RequestId;
use crate::http::{Clock, HttpClient, HttpError, HttpRequest, HttpResponse, Method, SystemClock};
use crate::service::Env;
use crate::store::{KvStore, StoreError};

/// How long one invocation may spend waiting on ARM (backoff and polling) before it leaves
/// the rest to the sweep.
const ARM_WAIT_BUDGET: Duration = Duration::from_secs(15);

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

/// The component's Spin variables.
pub struct SpinVariables;

impl Variables for SpinVariables {
    fn get(&self, name: &str) -> Option<String> {
        spin_sdk::variables::get(name).ok()
    }
}

/// Outbound HTTP through `wasi:http/outgoing-handler`, blocking, with timeouts on every call.
pub struct SpinHttp;

impl HttpClient for SpinHttp {
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (scheme, rest) = request
            .url
            .split_once("://")
            .ok_or_else(|| HttpError::Refused(format!("not an absolute URL: {}", request.url)))?;
        let (authority, path) = rest.find('/').map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let entries: Vec<(String, Vec<u8>)> =
            request.headers.iter().map(|(k, v)| (k.clone(), v.as_bytes().to_vec())).collect();
        let headers =
            wasi_http::Fields::from_list(&entries).map_err(|e| HttpError::Refused(format!("bad header: {e:?}")))?;
        let outgoing = wasi_http::OutgoingRequest::new(headers);
        let method = match request.method {
            Method::Get => wasi_http::Method::Get,
            Method::Put => wasi_http::Method::Put,
            Method::Post => wasi_http::Method::Post,
            Method::Delete => wasi_http::Method::Delete,
        };
        let scheme = if scheme == "http" { wasi_http::Scheme::Http } else { wasi_http::Scheme::Https };
        let set = outgoing
            .set_method(&method)
            .and(outgoing.set_scheme(Some(&scheme)))
            .and(outgoing.set_authority(Some(authority)))
            .and(outgoing.set_path_with_query(Some(path)));
        set.map_err(|()| HttpError::Refused(format!("invalid URL: {}", request.url)))?;
        let body = outgoing.body().map_err(|()| HttpError::Refused("body already taken".into()))?;
        {
            let stream = body.write().map_err(|()| HttpError::Refused("body not writable".into()))?;
            for chunk in request.body.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| HttpError::Connection(format!("writing body: {e:?}")))?;
            }
        }
        wasi_http::OutgoingBody::finish(body, None).map_err(|e| HttpError::Connection(format!("{e:?}")))?;

        let nanos = u64::try_from(request.timeout.as_nanos()).unwrap_or(u64::MAX);
        let options = wasi_http::RequestOptions::new();
        // Hosts may not support every timeout; an unsupported one is not an error.
        let _ = options.set_connect_timeout(Some(nanos));
        let _ = options.set_first_byte_timeout(Some(nanos));
        let _ = options.set_between_bytes_timeout(Some(nanos));
        let future = outgoing_handler::handle(outgoing, Some(options)).map_err(map_error_code)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(map_error_code(code)),
            Some(Err(())) | None => return Err(HttpError::Connection("response already taken".into())),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|()| HttpError::Connection("response body already taken".into()))?;
        let stream = incoming.stream().map_err(|()| HttpError::Connection("response body not readable".into()))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(wasi::io::streams::StreamError::Closed) => break,
                Err(e) => return Err(HttpError::Connection(format!("reading body: {e:?}"))),
            }
        }
        Ok(HttpResponse { status, headers, body })
    }
}

fn map_error_code(code: wasi_http::ErrorCode) -> HttpError {
    match code {
        wasi_http::ErrorCode::ConnectionTimeout
        | wasi_http::ErrorCode::ConnectionReadTimeout
        | wasi_http::ErrorCode::ConnectionWriteTimeout => HttpError::Timeout,
        wasi_http::ErrorCode::HttpRequestDenied => {
            HttpError::Refused("the host does not allow this destination (allowed_outbound_hosts)".into())
        }
        other => HttpError::Connection(format!("{other:?}")),
    }
}

/// Everything one invocation works with, built from Spin's variables and store.
pub struct Ctx {
    kv: SpinStore,
    http: SpinHttp,
    clock: SystemClock,
    /// Configuration, read once.
    pub config: Config,
}

impl Ctx {
    /// Reads configuration and opens the default store; failures are logged, not shown.
    pub fn load() -> Result<Self, ApiError> {
        let config = Config::load(&SpinVariables).map_err(|e| ApiError::internal(format!("configuration: {e:#}")))?;
        let kv = SpinStore::open().map_err(ApiError::internal)?;
        Ok(Self { kv, http: SpinHttp, clock: SystemClock, config })
    }

    /// The caller behind the request's bearer credential: an OIDC token when an issuer is
    /// configured and the credential is a JWT, else an API key.
    pub fn authenticate(&self, request: &Request) -> Result<Caller, ApiError> {
        let header = request.header("authorization").and_then(|v| v.as_str());
        let bearer = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
        match (&self.config.oidc, bearer) {
            (Some(oidc), Some(token)) if auth::oidc::looks_like_jwt(token) => {
                Ok(auth::oidc::authenticate(token, oidc, &self.kv, &self.http, self.clock.now())?)
            }
            _ => Ok(self.config.api_keys.authenticate(header)?),
        }
    }

    /// The caller's IP address (see [`auth::client_ip`]).
    pub fn client_ip(&self, request: &Request) -> Option<IpAddr> {
        let peer = request.header("spin-client-addr").and_then(|v| v.as_str());
        let forwarded = request.header("x-forwarded-for").and_then(|v| v.as_str());
        auth::client_ip(peer, forwarded, &self.config.trusted_proxies)
    }

    /// Runs an operation with the ports wired up and the time read once.
    pub fn run<T>(&self, operation: impl FnOnce(&Env) -> T) -> T {
        let arm = ArmClient::new(&self.http, &self.kv, &self.clock, &self.config.arm, ARM_WAIT_BUDGET);
        operation(&Env { kv: &self.kv, arm: &arm, config: &self.config, now: self.clock.now() })
    }
}

/// Serves an authenticated API call: reads configuration, authenticates the caller, runs
/// `route` with the ports wired up, and renders the outcome. Every `/api` component is this
/// plus its route table.
pub fn serve_api(request: &Request, route: impl FnOnce(&Ctx, &Env, &Caller) -> Result<Reply, ApiError>) -> Response {
    let outcome = Ctx::load().and_then(|ctx| {
        let caller = ctx.authenticate(request)?;
        ctx.run(|env| route(&ctx, env, &caller))
    });
    respond(outcome)
}

/// The path below `prefix` as segments (`/api/requests/x/approve` -> `["requests", "x", "approve"]`).
pub fn segments<'a>(request: &'a Request, prefix: &str) -> Vec<&'a str> {
    let path = request.path();
    let path = path.strip_prefix(prefix).unwrap_or(path);
    path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect()
}

/// A fresh request id: 96 random bits as hex.
pub fn new_request_id() -> RequestId {
    let bytes = wasi::random::random::get_random_bytes(12);
    RequestId::parse(&hex::encode(bytes)).expect("hex is a valid id")
}

/// Renders an operation's outcome; a 5xx's cause goes to stderr (the host's log), never to
/// the client.
pub fn respond(result: Result<Reply, ApiError>) -> Response {
    let (status, body) = match result {
        Ok(reply) => (reply.status, reply.body),
        Err(error) => {
            if let Some(cause) = &error.internal {
                eprintln!("error {}: {cause}", error.code);
            }
            (error.status, error.body())
        }
    };
    Response::builder().status(status).header("content-type", "application/json").body(body.to_string()).build()
}
