//! A local stand-in for Azure Resource Manager and the identity platform's token endpoint,
//! answering with ARM's real status codes, headers and error bodies.
//!
//! - `POST /{tenant}/oauth2/v2.0/token`: client credentials.
//! - NSG security rules: `GET/PUT/DELETE .../networkSecurityGroups/{nsg}/securityRules/{name}`,
//!   `GET .../securityRules`, `GET .../networkSecurityGroups/{nsg}`; PUT answers 201/200 with
//!   `Azure-AsyncOperation`, DELETE 202 with `Location` (204 when absent); operations report
//!   `InProgress` for a configurable number of polls, then `Succeeded`.
//! - Faults for the next N matching calls, and a log of every call.

mod oidc;
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

pub use state::{Call, Fault, FaultKind};
use state::{Delivery, EmulatorState};

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
/// The secret the App Service identity endpoint expects in `X-IDENTITY-HEADER`.
pub const IDENTITY_HEADER: &str = "demo-identity-header";
/// The demo VM's NIC.
pub const DEMO_NIC: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Network/networkInterfaces/demo-vm-nic";
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
        let emulator_state = state.clone();
        let app = Router::new().fallback(handle).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let emulator = Self { addr, state: emulator_state, task };
        emulator.add_nsg(DEMO_NSG);
        emulator.add_vm("demo-vm", DEMO_PRIVATE_IP, NsgPlacement::Nic(DEMO_NSG));
        Ok(emulator)
    }

    /// Adds a VM in `demo-rg` with one NIC and its subnet, the NSG where `nsg` says.
    /// Answers the VM's id.
    pub fn add_vm(&self, name: &str, private_ip: &str, nsg: NsgPlacement) -> String {
        self.add_vm_in("demo-rg", name, private_ip, nsg, &[])
    }

    /// Adds an Azure Firewall named `name` in `demo-rg` with classic rule collections (none
    /// yet) and a public IP `public_ip`; `managed` puts its rules in a Firewall Policy
    /// instead, as Firewall Manager does. Answers its id.
    pub fn add_firewall(&self, name: &str, public_ip: &str, managed: bool) -> String {
        let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/demo-rg/providers/Microsoft.Network");
        let id = format!("{group}/azureFirewalls/{name}");
        let pip = format!("{group}/publicIPAddresses/{name}-pip");
        let mut properties = serde_json::json!({
            "sku": {"name": "AZFW_VNet", "tier": "Standard"},
            "ipConfigurations": [{"name": "config", "properties": {"privateIPAddress": "10.0.100.4",
                "publicIPAddress": {"id": pip}, "subnet": {"id": format!("{group}/virtualNetworks/hub/subnets/AzureFirewallSubnet")}}}],
            "natRuleCollections": [], "networkRuleCollections": [], "applicationRuleCollections": [],
        });
        if managed {
            properties["firewallPolicy"] = serde_json::json!({"id": format!("{group}/firewallPolicies/{name}-policy")});
        }
        let mut state = self.state.lock().unwrap();
        state.add_resource(
            &pip,
            serde_json::json!({"id": pip, "name": format!("{name}-pip"), "type": "Microsoft.Network/publicIPAddresses",
            "sku": {"name": "Standard"}, "properties": {"ipAddress": public_ip, "publicIPAllocationMethod": "Static"}}),
        );
        state.add_firewall(
            &id,
            serde_json::json!({"id": id, "name": name, "type": "Microsoft.Network/azureFirewalls",
            "location": "westeurope", "properties": properties}),
        );
        id
    }

    /// A firewall's resource document as the emulator holds it.
    pub fn firewall(&self, id: &str) -> Option<serde_json::Value> {
        self.state.lock().unwrap().firewall(id)
    }

    /// Changes a firewall's document directly, as someone in the portal would.
    pub fn change_firewall(&self, id: &str, change: impl FnOnce(&mut serde_json::Value)) {
        self.state.lock().unwrap().change_firewall(id, change);
    }

    /// Entries per page of the VM lists (ARM's are larger; small pages exercise `nextLink`).
    pub fn set_page_size(&self, entries: usize) {
        self.state.lock().unwrap().page_size = entries;
    }

    /// As [`Emulator::add_vm`], in resource group `group` of the demo subscription, with tags.
    pub fn add_vm_in(
        &self,
        group: &str,
        name: &str,
        private_ip: &str,
        nsg: NsgPlacement,
        tags: &[(&str, &str)],
    ) -> String {
        let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}");
        let tags: serde_json::Map<String, serde_json::Value> =
            tags.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect();
        let vm = format!("{group}/providers/Microsoft.Compute/virtualMachines/{name}");
        let nic = format!("{group}/providers/Microsoft.Network/networkInterfaces/{name}-nic");
        let subnet = format!("{group}/providers/Microsoft.Network/virtualNetworks/{name}-vnet/subnets/default");
        let reference = |id: &str| serde_json::json!({"id": id});
        let (nic_nsg, subnet_nsg) = match nsg {
            NsgPlacement::Nic(id) => (Some(reference(id)), None),
            NsgPlacement::Subnet(id) => (None, Some(reference(id))),
            NsgPlacement::None => (None, None),
        };
        let mut state = self.state.lock().unwrap();
        state.add_resource(&vm, serde_json::json!({"id": vm, "name": name, "location": "westeurope", "type": "Microsoft.Compute/virtualMachines", "tags": tags,
            "properties": {"networkProfile": {"networkInterfaces": [{"id": nic, "properties": {"primary": true}}]}}}));
        let mut nic_properties = serde_json::json!({"ipConfigurations": [{"name": "ipconfig1", "properties": {"primary": true, "privateIPAddress": private_ip, "subnet": {"id": subnet}}}]});
        if let Some(nsg) = nic_nsg {
            nic_properties["networkSecurityGroup"] = nsg;
        }
        state.add_resource(&nic, serde_json::json!({"id": nic, "name": format!("{name}-nic"), "type": "Microsoft.Network/networkInterfaces", "properties": nic_properties}));
        let mut subnet_properties = serde_json::json!({"addressPrefix": "10.0.0.0/24"});
        if let Some(nsg) = subnet_nsg {
            subnet_properties["networkSecurityGroup"] = nsg;
        }
        state.add_resource(
            &subnet,
            serde_json::json!({"id": subnet, "name": "default", "properties": subnet_properties}),
        );
        vm
    }

    /// Replaces a VM's tags (an admin tagging or untagging it); panics on an unknown VM.
    pub fn set_tags(&self, vm: &str, tags: &[(&str, &str)]) {
        let tags: serde_json::Map<String, serde_json::Value> =
            tags.iter().map(|(k, v)| ((*k).to_owned(), serde_json::json!(v))).collect();
        assert!(self.state.lock().unwrap().set_tags(vm, tags.into()), "no VM {vm}");
    }

    /// The OIDC issuer's `iss`.
    pub fn oidc_issuer(&self) -> String {
        format!("{}/oidc", self.url())
    }

    /// A token from the OIDC issuer, signed with fixture key `kid` (`rsa-1`, `rsa-2`, `ec-1`).
    pub fn mint(&self, kid: &str, claims: &serde_json::Value) -> String {
        self.state.lock().unwrap().oidc.mint(kid, claims, true)
    }

    /// A token whose header names no key.
    pub fn mint_without_kid(&self, kid: &str, claims: &serde_json::Value) -> String {
        self.state.lock().unwrap().oidc.mint(kid, claims, false)
    }

    /// Lets `login_hint` sign in through the authorization endpoint, with these claims.
    pub fn add_oidc_user(&self, login_hint: &str, claims: serde_json::Value) {
        self.state.lock().unwrap().oidc.add_user(login_hint, claims);
    }

    /// Lays `claims` over the next ID token the token endpoint issues.
    pub fn override_next_id_token(&self, claims: serde_json::Value) {
        self.state.lock().unwrap().oidc.next_override = Some(claims);
    }

    /// Authorization codes the token endpoint was asked to redeem.
    pub fn codes_redeemed(&self) -> u32 {
        self.state.lock().unwrap().oidc.redeemed
    }

    /// Publishes another key in the JWKS (a rotation).
    pub fn publish_key(&self, kid: &'static str) {
        self.state.lock().unwrap().oidc.publish(kid);
    }

    /// Tokens issued so far by one endpoint (`client_credentials`, `imds`, `app_service`).
    pub fn tokens_issued(&self, endpoint: &str) -> u32 {
        self.state.lock().unwrap().tokens_issued.get(endpoint).copied().unwrap_or(0)
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

    /// Removes a rule directly, as someone in the portal would; answers whether it was there.
    pub fn remove_rule(&self, nsg: &str, name: &str) -> bool {
        self.state.lock().unwrap().remove_rule(nsg, name)
    }

    /// Answers the next `times` calls matching `fault` with its error.
    pub fn inject(&self, fault: Fault) {
        self.state.lock().unwrap().faults.push(fault);
    }

    /// The faults injected so far, with how many calls each has hit.
    pub fn faults(&self) -> Vec<Fault> {
        self.state.lock().unwrap().faults.clone()
    }

    /// Drops every pending fault: ARM has recovered.
    pub fn clear_faults(&self) {
        self.state.lock().unwrap().faults.clear();
    }

    /// Forgets the calls so far (tests assert on what comes next).
    pub fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
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

/// Where a VM's NSG sits.
pub enum NsgPlacement<'a> {
    /// On its NIC.
    Nic(&'a str),
    /// On its subnet.
    Subnet(&'a str),
    /// Nowhere: the VM cannot be protected.
    None,
}

async fn handle(
    AxumState(state): AxumState<Arc<Mutex<EmulatorState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ((status, mut response_headers, body), delivery) = {
        let mut state = state.lock().unwrap();
        let mut answer = state.handle(&method, &uri, &headers, &body);
        let recorded = if matches!(answer.1, Delivery::Drop) { 0 } else { answer.0.0 };
        // ARM names every answer, errors and successes alike.
        let request_id = match answer.0.1.iter().find(|(name, _)| name == "x-ms-request-id") {
            Some((_, id)) => id.clone(),
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                answer.0.1.push(("x-ms-request-id".into(), id.clone()));
                id
            }
        };
        state.calls.push(Call {
            method: method.to_string(),
            path: uri.path().to_owned(),
            status: recorded,
            request_id,
        });
        answer
    };
    response_headers.dedup();
    match delivery {
        Delivery::Now => {}
        Delivery::After(delay) => tokio::time::sleep(delay).await,
        Delivery::Drop => {
            let broken = futures_util::stream::once(async {
                Err::<Bytes, _>(std::io::Error::other("connection dropped by the emulator"))
            });
            return Response::builder()
                .status(200)
                .body(axum::body::Body::from_stream(broken))
                .expect("static response");
        }
    }
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
