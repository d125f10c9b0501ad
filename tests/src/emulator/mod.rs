//! A local stand-in for Azure Resource Manager and the identity platform's token endpoint,
//! answering with ARM's real status codes, headers and error bodies.
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials.
//! - NSG security rules: `GET/PUT/DELETE .../networkSecurityGroups/{nsg}/securityRules/{name}`,
//!   `GET .../securityRules`, `GET .../networkSecurityGroups/{nsg}`; PUT answers 201/200 with
//!   `Azure-AsyncOperation`, DELETE 202 with `Location` (204 when absent); operations report
//!   `InProgress` for a configurable number of polls, then `Succeeded`.
//! - Faults for the next N matching calls, and a log of every call.

mod rules;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::task::JoinHandle;

use state::EmulatorState;
pub use state::{Call, Fault};

/// The demo subscription every seeded resource lives in.
pub const SUBSCRIPTION: &str = "00000000-0000-0000-0000-000000000000";
/// The demo tenant, client and secret the token endpoint accepts.
pub const TENANT: &str = "demo-tenant";
/// The demo client id.
pub const CLIENT_ID: &str = "demo-client";
/// The demo client secret.
pub const CLIENT_SECRET: &str = "demo-secret";
/// The demo VM.
pub const DEMO_VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Compute/virtualMachines/demo-vm";
/// The demo VM's NSG.
pub const DEMO_NSG: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Network/networkSecurityGroups/demo-nsg";
/// The demo VM's private IP.
pub const DEMO_PRIVATE_IP: &str = "10.0.0.4";

/// A running emulator; stops when dropped.
pub struct Emulator {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<EmulatorState>>,
    task: JoinHandle<()>,
}

impl Emulator {
    /// Starts on `listen` (port 0 picks one) with the demo NSG in place. `polls` is how many
    /// status polls report `InProgress` before an operation is done; `retry_after` is the
    /// `Retry-After` it advertises, in seconds.
    pub async fn start(listen: SocketAddr, polls: u32, retry_after: u64) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(EmulatorState::new(format!("http://{addr}"), polls, retry_after)));
        state.lock().unwrap().add_nsg(DEMO_NSG, "westeurope");
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    /// The base URL, for `arm_base_url` and `login_base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The security rules of an NSG as ARM returns them, sorted by name.
    pub fn rules(&self, nsg: &str) -> Vec<serde_json::Value> {
        self.state.lock().unwrap().rules(nsg)
    }

    /// Adds an NSG.
    pub fn add_nsg(&self, id: &str) {
        self.state.lock().unwrap().add_nsg(id, "westeurope");
    }

    /// Puts a rule directly, as another tool or the portal would (no LRO, no validation).
    pub fn seed_rule(&self, nsg: &str, name: &str, properties: serde_json::Value) {
        self.state.lock().unwrap().seed_rule(nsg, name, properties);
    }

    /// Answers the next `times` calls matching `fault` with its error.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push(fault);
    }

    /// Drops every pending fault: ARM has recovered.
    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    AxumState(state): AxumState<Arc<Mutex<EmulatorState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = state.lock().unwrap();
    let (status, response_headers, body) = state.handle(&method, &uri, &headers, &body);
    state.calls.push(Call { method: method.to_string(), path: uri.path().to_owned(), status });
    let mut response =
        (StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), body).into_response();
    for (name, value) in response_headers {
        if let (Ok(name), Ok(value)) =
            (axum::http::HeaderName::from_bytes(name.as_bytes()), axum::http::HeaderValue::from_str(&value))
        {
            response.headers_mut().insert(name, value);
        }
    }
    response.headers_mut().insert("content-type", axum::http::HeaderValue::from_static("application/json"));
    response
}
