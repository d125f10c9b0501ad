//! The ARM REST client: authenticated calls, retries that honour `Retry-After`, and
//! long-running-operation polling, all inside a time budget so a function never hangs.

use std::cell::Cell;
use std::time::Duration;

use serde::Deserialize;

use super::firewall::{self, FirewallGrant, FirewallWant};
use super::inventory::{VmPage, VmSelector};
use super::{
    Arm, ArmError, ArmReceipt, COMPUTE_API_VERSION, ExistingRule, NETWORK_API_VERSION, SecurityRule, VmNetwork,
    inventory, token,
};
use crate::config::ArmSettings;
use crate::domain::{FirewallId, NsgId, VmId};
use crate::http::{Clock, HttpClient, HttpError, HttpRequest, HttpResponse, Method};
use crate::keys;
use crate::store::KvStore;

/// Reads and writes of a firewall before an edit gives up (each failed one met another
/// writer's change).
const FIREWALL_ATTEMPTS: u32 = 5;
/// The priority portcullis's firewall rule collections start from (a free one is taken).
const FIREWALL_PRIORITY: u32 = 200;
/// Attempts per ARM call before it is left for the next sweep.
const MAX_ATTEMPTS: u32 = 4;
/// The longest single wait, whatever `Retry-After` says.
const MAX_WAIT: Duration = Duration::from_secs(5);
/// Poll interval when ARM gives no `Retry-After`.
const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// Wall-clock time one invocation may spend on ARM: no call is sent after it. With a call's
/// timeout of at most 30 s (connect and first byte each), nothing an invocation sends can land
/// later than about two minutes after it began, well inside a grant's PUT lease (5 minutes).
pub const ARM_TIME_LIMIT: Duration = Duration::from_secs(60);

/// The REST implementation of [`Arm`].
pub struct ArmClient<'a> {
    http: &'a dyn HttpClient,
    kv: &'a dyn KvStore,
    clock: &'a dyn Clock,
    settings: &'a ArmSettings,
    /// Time still available for waiting (backoff and polling) in this invocation.
    budget: Cell<Duration>,
    /// No call starts after this reading of the monotonic clock (a wall clock set forward
    /// must not spend the time at once, nor one set back stretch it).
    deadline: Duration,
    /// Whether a write failed in a way that may still take effect.
    uncertain: Cell<bool>,
}

#[derive(Deserialize, Default)]
struct ArmErrorBody {
    #[serde(default)]
    error: ArmErrorDetail,
}

#[derive(Deserialize, Default)]
struct ArmErrorDetail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ArmErrorDetail>,
}

#[derive(Deserialize)]
struct AsyncStatus {
    status: String,
    #[serde(default)]
    error: Option<ArmErrorDetail>,
}

impl<'a> ArmClient<'a> {
    /// A client that may spend at most `wait_budget` waiting on ARM in this invocation.
    pub fn new(
        http: &'a dyn HttpClient,
        kv: &'a dyn KvStore,
        clock: &'a dyn Clock,
        settings: &'a ArmSettings,
        wait_budget: Duration,
    ) -> Self {
        let deadline = clock.monotonic() + ARM_TIME_LIMIT;
        Self { http, kv, clock, settings, budget: Cell::new(wait_budget), deadline, uncertain: Cell::new(false) }
    }

    /// Waits, if the budget allows; `false` means give up and leave the work for later.
    fn wait(&self, duration: Duration) -> bool {
        let duration = duration.min(MAX_WAIT);
        let left = self.budget.get();
        if duration > left {
            return false;
        }
        self.budget.set(left - duration);
        self.clock.sleep(duration);
        true
    }

    fn rule_url(&self, nsg: &NsgId, name: &str) -> String {
        format!("{}{}/securityRules/{name}?api-version={NETWORK_API_VERSION}", self.settings.arm_base_url, nsg.as_str())
    }

    /// Exponential backoff (250 ms, 500 ms, 1 s...) with up to 50% jitter, so instances that
    /// failed together do not retry together. The jitter comes from the clock's nanoseconds:
    /// unpredictable enough to spread retries, and no randomness port needed.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = 250u64 << attempt;
        let nanos = self.clock.now().timestamp_subsec_nanos();
        Duration::from_millis(base + u64::from(nanos) % (base / 2 + 1))
    }

    /// GETs a JSON document.
    fn get_json(&self, url: &str) -> Result<serde_json::Value, ArmError> {
        let response = self.call(Method::Get, url, None)?;
        serde_json::from_slice(&response.body)
            .map_err(|e| ArmError::Transient(format!("unreadable answer from {url}: {e}")))
    }

    fn resource_url(&self, id: &str, api_version: &str) -> String {
        format!("{}{id}?api-version={api_version}", self.settings.arm_base_url)
    }

    /// One ARM call, retried on throttling, server errors and transport failures.
    fn call(&self, method: Method, url: &str, body: Option<&serde_json::Value>) -> Result<HttpResponse, ArmError> {
        self.call_with(method, url, body, None)
    }

    /// Reads, edits and writes back a whole Azure Firewall, with `If-Match` on the etag read;
    /// starts again when another writer got there first (412), waits while an update runs.
    /// `edit` answers whether it changed anything (nothing to write otherwise).
    fn edit_firewall(
        &self,
        id: &FirewallId,
        edit: &mut dyn FnMut(&mut serde_json::Value) -> Result<bool, ArmError>,
    ) -> Result<ArmReceipt, ArmError> {
        let url = self.resource_url(id.as_str(), NETWORK_API_VERSION);
        for attempt in 0..FIREWALL_ATTEMPTS {
            let response = self.call(Method::Get, &url, None)?;
            let mut doc: serde_json::Value = serde_json::from_slice(&response.body)
                .map_err(|e| ArmError::Transient(format!("unreadable firewall {id}: {e}")))?;
            refuse_managed(&doc)?;
            // One writer per firewall: an update already running is waited out.
            if doc["properties"]["provisioningState"] == "Updating" {
                if !self.wait(retry_after(&response).unwrap_or(self.backoff(attempt)).max(DEFAULT_POLL)) {
                    break;
                }
                continue;
            }
            let etag = doc["etag"].as_str().map(str::to_owned).or_else(|| response.header("etag").map(str::to_owned));
            // Without an etag the write could undo another writer's: not made.
            let Some(etag) = etag else {
                return Err(ArmError::Transient(format!("firewall {id} came without an etag; not written")));
            };
            // A firewall whose last update failed may not hold what its document lists: the
            // document is written again even when the edit finds nothing to change.
            let failed = doc["properties"]["provisioningState"] == "Failed";
            if !edit(&mut doc)? && !failed {
                return Ok(receipt(&response));
            }
            let put = firewall::for_put(&doc);
            match self.call_with(Method::Put, &url, Some(&put), Some(("if-match", etag.as_str()))) {
                Err(ArmError::Refused { status: 412, .. }) => continue,
                Err(error) => return Err(error),
                Ok(response) => {
                    if let Some(operation) = response.header("azure-asyncoperation") {
                        self.poll_async_operation(operation, retry_after(&response).unwrap_or(DEFAULT_POLL))?;
                    }
                    return Ok(receipt(&response));
                }
            }
        }
        Err(ArmError::Transient(format!("firewall {id} kept changing while it was being edited")))
    }

    /// The address a firewall's DNAT rules listen on: a hub firewall's own list, else its
    /// first configuration's public IP resource.
    fn firewall_address(&self, doc: &serde_json::Value) -> Result<std::net::IpAddr, ArmError> {
        let (resources, hub) = firewall::public_addresses(doc);
        if let Some(address) = hub.first() {
            return Ok(*address);
        }
        let name = doc["name"].as_str().unwrap_or_default().to_owned();
        let missing = || ArmError::Refused {
            status: 422,
            code: "FirewallWithoutPublicIp".into(),
            message: format!("Azure Firewall '{name}' has no public IP address for DNAT rules"),
            request_id: None,
        };
        let id = resources.first().ok_or_else(missing)?;
        let pip = self.get_json(&self.resource_url(id, NETWORK_API_VERSION))?;
        pip["properties"]["ipAddress"].as_str().and_then(|ip| ip.parse().ok()).ok_or_else(missing)
    }

    /// One ARM call with an extra header (a condition), retried as [`ArmClient::call`] is.
    fn call_with(
        &self,
        method: Method,
        url: &str,
        body: Option<&serde_json::Value>,
        extra: Option<(&str, &str)>,
    ) -> Result<HttpResponse, ArmError> {
        let mut last = String::new();
        for attempt in 0..MAX_ATTEMPTS {
            if self.clock.monotonic() >= self.deadline {
                last = format!("this invocation's {} s for ARM are spent", ARM_TIME_LIMIT.as_secs());
                break;
            }
            let token = token::token(self.http, self.kv, self.settings, self.clock.now())?;
            // Again after the token, which may have taken a while: nothing is sent late.
            if self.clock.monotonic() >= self.deadline {
                last = format!("this invocation's {} s for ARM are spent", ARM_TIME_LIMIT.as_secs());
                break;
            }
            let write = matches!(method, Method::Put | Method::Delete);
            let mut headers = vec![("authorization".to_owned(), format!("Bearer {token}"))];
            if body.is_some() {
                headers.push(("content-type".into(), "application/json".into()));
            }
            headers.extend(extra.map(|(name, value)| (name.to_owned(), value.to_owned())));
            let request = HttpRequest {
                method,
                url: url.to_owned(),
                headers,
                body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
                timeout: self.settings.timeout,
            };
            let backoff = self.backoff(attempt);
            let wait = match self.http.send(request) {
                Ok(response) if response.status < 400 => return Ok(response),
                Ok(response) => {
                    if write && response.status >= 500 {
                        self.uncertain.set(true);
                    }
                    let error = classify(&response);
                    match &error {
                        ArmError::Transient(reason) => last = reason.clone(),
                        ArmError::Refused { status: 401, .. } if attempt == 0 => {
                            // A revoked or rotated token: drop the cache and fetch a new one once.
                            let _ = self.kv.delete(keys::ARM_TOKEN);
                            last = "ARM rejected the token".into();
                            continue;
                        }
                        ArmError::Refused { .. } | ArmError::PriorityConflict => return Err(error),
                    }
                    retry_after(&response).unwrap_or(backoff)
                }
                Err(HttpError::Refused(reason)) => {
                    return Err(ArmError::Refused {
                        status: 0,
                        code: "OutboundRefused".into(),
                        message: reason,
                        request_id: None,
                    });
                }
                Err(error) => {
                    // Sent, maybe received, answer lost: it may still take effect.
                    if write {
                        self.uncertain.set(true);
                    }
                    last = error.to_string();
                    backoff
                }
            };
            if attempt + 1 == MAX_ATTEMPTS || !self.wait(wait) {
                break;
            }
        }
        Err(ArmError::Transient(last))
    }

    /// Follows an `Azure-AsyncOperation` URL to its end. Called only once ARM has accepted a
    /// write: an operation not seen to its end may still take effect (an uncertain write).
    fn poll_async_operation(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let outcome = self.poll_async_operation_unmarked(url, first_wait);
        self.mark_unfinished(&outcome);
        outcome
    }

    /// Notes a write ARM accepted but that was not seen to its end.
    fn mark_unfinished(&self, outcome: &Result<(), ArmError>) {
        if matches!(outcome, Err(ArmError::Transient(_))) {
            self.uncertain.set(true);
        }
    }

    /// An operation URL is followed, with the token, only into ARM.
    fn operation_url<'u>(&self, url: &'u str) -> Result<&'u str, ArmError> {
        if within_arm(&self.settings.arm_base_url, url) {
            Ok(url)
        } else {
            Err(ArmError::Transient(format!(
                "ARM's operation URL points outside ARM ({}); not followed",
                url.chars().take(100).collect::<String>()
            )))
        }
    }

    fn poll_async_operation_unmarked(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let url = self.operation_url(url)?;
        let mut wait = first_wait;
        loop {
            if !self.wait(wait) {
                return Err(ArmError::Transient("the operation is still in progress".into()));
            }
            let response = self.call(Method::Get, url, None)?;
            let status: AsyncStatus = serde_json::from_slice(&response.body)
                .map_err(|e| ArmError::Transient(format!("unreadable operation status: {e}")))?;
            match status.status.as_str() {
                "Succeeded" => return Ok(()),
                "Failed" | "Canceled" => {
                    let detail = status.error.unwrap_or_default();
                    return Err(ArmError::Refused {
                        status: 200,
                        code: detail.code,
                        message: detail.message,
                        request_id: response.header("x-ms-request-id").map(str::to_owned),
                    });
                }
                _ => wait = retry_after(&response).unwrap_or(DEFAULT_POLL),
            }
        }
    }

    /// Follows a `Location` URL: 202 while running, 200 or 204 when done (an uncertain write
    /// when not seen to its end, as above).
    fn poll_location(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let outcome = self.poll_location_unmarked(url, first_wait);
        self.mark_unfinished(&outcome);
        outcome
    }

    fn poll_location_unmarked(&self, url: &str, first_wait: Duration) -> Result<(), ArmError> {
        let url = self.operation_url(url)?;
        let mut wait = first_wait;
        loop {
            if !self.wait(wait) {
                return Err(ArmError::Transient("the operation is still in progress".into()));
            }
            let response = self.call(Method::Get, url, None)?;
            if response.status != 202 {
                return Ok(());
            }
            wait = retry_after(&response).unwrap_or(DEFAULT_POLL);
        }
    }
}

impl Arm for ArmClient<'_> {
    fn had_uncertain_writes(&self) -> bool {
        self.uncertain.get()
    }

    fn put_rule(&self, nsg: &NsgId, rule: &SecurityRule) -> Result<ArmReceipt, ArmError> {
        let response = self.call(Method::Put, &self.rule_url(nsg, &rule.name), Some(&rule.to_arm_body()))?;
        if let Some(url) = response.header("azure-asyncoperation") {
            self.poll_async_operation(url, retry_after(&response).unwrap_or(DEFAULT_POLL))?;
        }
        Ok(receipt(&response))
    }

    fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<ArmReceipt, ArmError> {
        let response = match self.call(Method::Delete, &self.rule_url(nsg, name), None) {
            Err(ArmError::Refused { status: 404, request_id, .. }) => return Ok(ArmReceipt { request_id }),
            other => other?,
        };
        let first_wait = retry_after(&response).unwrap_or(DEFAULT_POLL);
        match (response.status, response.header("azure-asyncoperation"), response.header("location")) {
            (202, Some(url), _) => self.poll_async_operation(url, first_wait)?,
            (202, None, Some(url)) => self.poll_location(url, first_wait)?,
            _ => {}
        }
        Ok(receipt(&response))
    }

    fn list_rules(&self, nsg: &NsgId) -> Result<Vec<ExistingRule>, ArmError> {
        let mut rules = Vec::new();
        let mut url = Some(format!(
            "{}{}/securityRules?api-version={NETWORK_API_VERSION}",
            self.settings.arm_base_url,
            nsg.as_str()
        ));
        while let Some(next) = url.take() {
            let page = self.get_json(&next)?;
            for rule in page["value"].as_array().into_iter().flatten() {
                let properties = &rule["properties"];
                let text = |field: &str| properties[field].as_str().unwrap_or_default().to_owned();
                // ARM gives either the single field or the list, never both.
                let many = |one: &str, list: &str| -> Vec<String> {
                    let mut values: Vec<String> = properties[list]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect();
                    values.extend(properties[one].as_str().filter(|v| !v.is_empty()).map(str::to_owned));
                    values
                };
                rules.push(ExistingRule {
                    name: rule["name"].as_str().unwrap_or_default().to_owned(),
                    priority: properties["priority"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
                    inbound: properties["direction"].as_str() == Some("Inbound"),
                    allow: properties["access"].as_str() == Some("Allow"),
                    description: text("description"),
                    protocol: text("protocol"),
                    sources: many("sourceAddressPrefix", "sourceAddressPrefixes"),
                    destinations: many("destinationAddressPrefix", "destinationAddressPrefixes"),
                    ports: many("destinationPortRange", "destinationPortRanges"),
                });
            }
            // The token goes wherever the link says: into ARM only (a listing cut short there
            // would look complete).
            url = match page["nextLink"].as_str().filter(|link| !link.is_empty()) {
                None => None,
                Some(link) if within_arm(&self.settings.arm_base_url, link) => Some(link.to_owned()),
                Some(_) => {
                    return Err(ArmError::Transient("a rule listing's next page is not in ARM; not followed".into()));
                }
            };
        }
        Ok(rules)
    }

    fn put_firewall_rules(
        &self,
        id: &FirewallId,
        wanted: &[FirewallWant],
    ) -> Result<(ArmReceipt, Vec<FirewallGrant>), ArmError> {
        let mut granted = Vec::new();
        let receipt = self.edit_firewall(id, &mut |doc| {
            let address = self.firewall_address(doc)?;
            granted.clear();
            for want in wanted {
                let taken: Vec<u16> = granted.iter().map(|g: &FirewallGrant| g.mapped_port).collect();
                let mapped_port = firewall::mapped_port_of(doc, &want.name)
                    .or_else(|| firewall::free_mapped_port(doc, &taken))
                    .ok_or_else(|| ArmError::Refused {
                        status: 422,
                        code: "NoFreeMappedPort".into(),
                        message: format!("no free port left in {:?} on firewall {id}", firewall::MAPPED_PORTS),
                        request_id: None,
                    })?;
                granted.push(FirewallGrant {
                    name: want.name.clone(),
                    protocol: want.protocol,
                    source: want.source.clone(),
                    public_ip: address,
                    mapped_port,
                    private_ip: want.private_ip,
                    port: want.port,
                });
            }
            let before = doc.clone();
            firewall::add_rules(doc, &granted, FIREWALL_PRIORITY);
            Ok(*doc != before)
        })?;
        Ok((receipt, granted))
    }

    fn list_firewall_rules(&self, id: &FirewallId) -> Result<Vec<String>, ArmError> {
        let doc = self.get_json(&self.resource_url(id.as_str(), NETWORK_API_VERSION))?;
        refuse_managed(&doc)?;
        Ok(firewall::rule_names(&doc))
    }

    fn delete_firewall_rules(&self, id: &FirewallId, names: &[String]) -> Result<ArmReceipt, ArmError> {
        self.edit_firewall(id, &mut |doc| Ok(firewall::remove_rules(doc, names)))
    }

    fn list_vms(&self, selector: &VmSelector, page: Option<&str>) -> Result<VmPage, ArmError> {
        let base = &self.settings.arm_base_url;
        let url = match page {
            None => selector.first_page(base),
            // A link kept from an earlier page: into ARM only, like any `nextLink`.
            Some(link) if within_arm(base, link) => link.to_owned(),
            Some(_) => return Err(ArmError::Transient("a VM listing's next page is not in ARM; not followed".into())),
        };
        inventory::parse_page(&self.get_json(&url)?, selector, base)
    }

    fn resolve_vm(&self, vm: &VmId) -> Result<VmNetwork, ArmError> {
        let not_protectable = |message: String| ArmError::Refused {
            status: 422,
            code: "VmNotProtectable".into(),
            message,
            request_id: None,
        };
        let vm_doc = self.get_json(&self.resource_url(vm.as_str(), COMPUTE_API_VERSION))?;
        let nics = vm_doc["properties"]["networkProfile"]["networkInterfaces"].as_array().cloned().unwrap_or_default();
        let primary = |items: &[serde_json::Value]| {
            items.iter().find(|i| i["properties"]["primary"] == true).or(items.first()).cloned()
        };
        let nic_id = primary(&nics)
            .and_then(|n| n["id"].as_str().map(str::to_owned))
            .ok_or_else(|| not_protectable(format!("VM {vm} has no network interface")))?;
        let nic = self.get_json(&self.resource_url(&nic_id, NETWORK_API_VERSION))?;
        let configurations = nic["properties"]["ipConfigurations"].as_array().cloned().unwrap_or_default();
        let configuration =
            primary(&configurations).ok_or_else(|| not_protectable(format!("NIC {nic_id} has no IP configuration")))?;
        let private_ip = configuration["properties"]["privateIPAddress"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| not_protectable(format!("NIC {nic_id} has no private IP address")))?;
        let mut nsg = nic["properties"]["networkSecurityGroup"]["id"].as_str().map(str::to_owned);
        if nsg.is_none()
            && let Some(subnet) = configuration["properties"]["subnet"]["id"].as_str()
        {
            let subnet = self.get_json(&self.resource_url(subnet, NETWORK_API_VERSION))?;
            nsg = subnet["properties"]["networkSecurityGroup"]["id"].as_str().map(str::to_owned);
        }
        let nsg = nsg.map(|id| NsgId::parse(&id).map_err(|e| not_protectable(e.to_string()))).transpose()?;
        Ok(VmNetwork { nic: nic_id, private_ip, nsg })
    }
}

/// Refuses a firewall whose rules live in a Firewall Policy: portcullis writes only classic
/// rule collections, as Defender's JIT does.
fn refuse_managed(firewall: &serde_json::Value) -> Result<(), ArmError> {
    match firewall::refusal(firewall) {
        Some(why) => {
            Err(ArmError::Refused { status: 422, code: "FirewallPolicyManaged".into(), message: why, request_id: None })
        }
        None => Ok(()),
    }
}

/// Whether `link` is an address under ARM's `base` (not merely one that starts like it).
fn within_arm(base: &str, link: &str) -> bool {
    link.starts_with(&format!("{}/", base.trim_end_matches('/')))
}

fn receipt(response: &HttpResponse) -> ArmReceipt {
    ArmReceipt { request_id: response.header("x-ms-request-id").map(str::to_owned) }
}

/// Maps an error answer to what the caller should do about it.
fn classify(response: &HttpResponse) -> ArmError {
    let body: ArmErrorBody = serde_json::from_slice(&response.body).unwrap_or_default();
    let codes: Vec<&str> =
        std::iter::once(body.error.code.as_str()).chain(body.error.details.iter().map(|d| d.code.as_str())).collect();
    let busy = codes
        .iter()
        .any(|c| matches!(*c, "AnotherOperationInProgress" | "RetryableError" | "RetryableErrorDueToAnotherOperation"));
    match response.status {
        400 if codes.contains(&"SecurityRuleConflict") => ArmError::PriorityConflict,
        408 | 429 | 500..=599 => ArmError::Transient(format!("ARM answered {} {}", response.status, body.error.code)),
        409 if busy => ArmError::Transient(format!("ARM answered 409 {}", body.error.code)),
        status => ArmError::Refused {
            status,
            code: body.error.code,
            message: body.error.message.chars().take(300).collect(),
            request_id: response.header("x-ms-request-id").map(str::to_owned),
        },
    }
}

fn retry_after(response: &HttpResponse) -> Option<Duration> {
    response.header("retry-after")?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::domain::VmId;
    use crate::testing::{FakeClock, ScriptedHttp, arm_settings, nsg, rule};

    fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> HttpResponse {
        HttpResponse {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn token_ok() -> HttpResponse {
        answer(200, &[], r#"{"token_type":"Bearer","expires_in":3599,"access_token":"t1"}"#)
    }

    #[test]
    fn put_follows_the_async_operation_and_reuses_the_cached_token() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(201, &[("Azure-AsyncOperation", "https://arm/op/1"), ("Retry-After", "1")], "{}"),
            answer(200, &[], r#"{"status":"InProgress"}"#),
            answer(200, &[], r#"{"status":"Succeeded"}"#),
            answer(200, &[], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        client.put_rule(&nsg(), &rule()).unwrap();
        client.put_rule(&nsg(), &rule()).unwrap();
        let urls = http.urls();
        assert_eq!(urls.iter().filter(|u| u.contains("oauth2")).count(), 1, "{urls:?}");
        assert!(urls[1].ends_with("/securityRules/jit-r1?api-version=2024-05-01"));
        assert_eq!(clock.slept(), Duration::from_secs(2), "two polls of Retry-After: 1");
    }

    #[test]
    fn throttling_is_retried_after_the_advertised_delay() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(
                429,
                &[("Retry-After", "2")],
                r#"{"error":{"code":"RetryableError","details":[{"code":"RetryableErrorDueToAnotherOperation"}]}}"#,
            ),
            answer(200, &[], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).put_rule(&nsg(), &rule()).unwrap();
        assert_eq!(clock.slept(), Duration::from_secs(2));
    }

    /// A wall clock set forward by two minutes at every reading (more than the time limit);
    /// the monotonic clock moves a millisecond.
    struct JumpingClock(Cell<i64>);

    impl Clock for JumpingClock {
        fn now(&self) -> chrono::DateTime<chrono::Utc> {
            self.0.set(self.0.get() + 2);
            crate::testing::at(self.0.get())
        }
        fn sleep(&self, _: Duration) {}
        fn monotonic(&self) -> Duration {
            Duration::from_millis(self.0.get() as u64)
        }
    }

    #[test]
    fn a_wall_clock_set_forward_does_not_spend_the_time_limit() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(429, &[("Retry-After", "1")], r#"{"error":{"code":"RetryableError"}}"#),
            answer(200, &[], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), JumpingClock(Cell::new(0)), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        client.put_rule(&nsg(), &rule()).expect("the retry went out: only a minute of monotonic time counts");
        assert_eq!(http.urls().len(), 3);
    }

    #[test]
    fn persistent_server_errors_become_transient_within_the_budget() {
        let mut script = vec![token_ok()];
        script.extend((0..MAX_ATTEMPTS).map(|_| answer(503, &[], "")));
        let http = ScriptedHttp::new(script);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let err = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30))
            .delete_rule(&nsg(), "jit-r1")
            .unwrap_err();
        assert!(matches!(err, ArmError::Transient(_)), "{err:?}");
        assert!(clock.slept() < Duration::from_secs(5));
    }

    #[test]
    fn conflicts_and_validation_errors_are_not_retried() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(400, &[], r#"{"error":{"code":"SecurityRuleConflict","message":"taken"}}"#),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        assert_eq!(client.put_rule(&nsg(), &rule()), Err(ArmError::PriorityConflict));
        let http = ScriptedHttp::new(vec![answer(
            400,
            &[],
            r#"{"error":{"code":"SecurityRuleInvalidPortRange","message":"bad"}}"#,
        )]);
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        assert!(
            matches!(client.put_rule(&nsg(), &rule()), Err(ArmError::Refused { status: 400, code, .. }) if code == "SecurityRuleInvalidPortRange")
        );
    }

    #[test]
    fn delete_of_an_absent_rule_succeeds_and_202_polls_the_location() {
        let http = ScriptedHttp::new(vec![token_ok(), answer(204, &[], "")]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).delete_rule(&nsg(), "jit-r1").unwrap();
        let http = ScriptedHttp::new(vec![
            answer(202, &[("Location", "https://arm/res/1"), ("Retry-After", "0")], ""),
            answer(202, &[], ""),
            answer(204, &[], ""),
        ]);
        ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).delete_rule(&nsg(), "jit-r1").unwrap();
        assert_eq!(http.urls().last().unwrap(), "https://arm/res/1");
    }

    #[test]
    fn a_vm_resolves_through_its_nic_to_the_subnets_nsg() {
        let vm = VmId::parse(crate::testing::VM).unwrap();
        let nic = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n";
        let subnet = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/default";
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(200, &[], &serde_json::json!({"properties": {"networkProfile": {"networkInterfaces": [{"id": "other"}, {"id": nic, "properties": {"primary": true}}]}}}).to_string()),
            answer(200, &[], &serde_json::json!({"properties": {"ipConfigurations": [{"properties": {"primary": true, "privateIPAddress": "10.1.2.3", "subnet": {"id": subnet}}}]}}).to_string()),
            answer(200, &[], &serde_json::json!({"properties": {"networkSecurityGroup": {"id": crate::testing::NSG}}}).to_string()),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let network = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).resolve_vm(&vm).unwrap();
        assert_eq!(network.nic, nic);
        assert_eq!(network.private_ip.to_string(), "10.1.2.3");
        assert_eq!(network.nsg, Some(nsg()));
        assert!(http.urls()[2].starts_with(&format!("https://arm{nic}?api-version=")));
    }

    #[test]
    fn a_vm_listing_reads_one_page_a_call_and_resumes_from_its_link() {
        let group = "/subscriptions/s1/resourceGroups/fleet";
        let vm = |name: &str| format!("{group}/providers/Microsoft.Compute/virtualMachines/{name}");
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(200, &[], &json!({"value": [{"id": vm("a")}], "nextLink": "https://arm/next?skip=1"}).to_string()),
            answer(200, &[], &json!({"value": [{"id": vm("b")}, {"id": vm("a")}]}).to_string()),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        let selector = VmSelector::new(group, None).unwrap();
        let first = inventory::list(&client, &selector, None, 1).unwrap();
        assert_eq!(first.vms.len(), 1);
        assert_eq!(first.resume.as_deref(), Some("https://arm/next?skip=1"));
        let rest = inventory::list(&client, &selector, first.resume.as_deref(), 5).unwrap();
        let names: Vec<&str> = rest.vms.iter().map(|v| v.as_str().rsplit('/').next().unwrap()).collect();
        assert_eq!((names, rest.resume), (vec!["b", "a"], None));
        assert_eq!(
            http.urls()[1],
            format!("https://arm{group}/providers/Microsoft.Compute/virtualMachines?api-version=2024-07-01")
        );
        assert_eq!(http.urls()[2], "https://arm/next?skip=1");
        // A resume link from elsewhere is never called with the token.
        assert!(inventory::list(&client, &selector, Some("https://elsewhere/x"), 1).is_err());
        assert_eq!(http.urls().len(), 3);
    }

    #[test]
    fn a_firewall_edit_writes_under_its_etag_and_starts_again_when_another_writer_won() {
        let fw =
            FirewallId::parse("/subscriptions/s1/resourceGroups/hub/providers/Microsoft.Network/azureFirewalls/fw")
                .unwrap();
        let doc = |etag: &str, mapped: Option<&str>| {
            let mut rules = json!([]);
            if let Some(port) = mapped {
                rules = json!([{"name": "jit-r1-22", "destinationPorts": [port], "protocols": ["TCP"]}]);
            }
            json!({"name": "fw", "etag": etag, "properties": {"provisioningState": "Succeeded",
                "ipConfigurations": [{"properties": {"publicIPAddress": {"id": "/pip"}}}],
                "natRuleCollections": [{"name": firewall::NAT_COLLECTION, "properties": {"priority": 200, "rules": rules}}]}})
            .to_string()
        };
        let pip = json!({"properties": {"ipAddress": "198.51.100.1"}}).to_string();
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(200, &[], &doc("W/\"1\"", None)),
            answer(200, &[], &pip),
            answer(412, &[], r#"{"error":{"code":"PreconditionFailed","message":"stale"}}"#),
            // Another writer's edit in between: the rule is there already, with its port.
            answer(200, &[], &doc("W/\"2\"", Some("50007"))),
            answer(200, &[], &pip),
            answer(200, &[("azure-asyncoperation", "https://arm/op/1"), ("retry-after", "0")], "{}"),
            answer(200, &[], r#"{"status":"Succeeded"}"#),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        let want = FirewallWant {
            name: "jit-r1-22".into(),
            protocol: crate::domain::ports::Protocol::Tcp,
            source: "203.0.113.7".into(),
            private_ip: "10.0.0.4".parse().unwrap(),
            port: 22,
        };
        let (_, granted) = client.put_firewall_rules(&fw, &[want]).unwrap();
        assert_eq!((granted[0].mapped_port, granted[0].public_ip.to_string()), (50007, "198.51.100.1".into()), "kept");
        let puts: Vec<HttpRequest> = http.requests().into_iter().filter(|r| r.method == Method::Put).collect();
        let condition = |r: &HttpRequest| r.headers.iter().find(|(n, _)| n == "if-match").map(|(_, v)| v.clone());
        assert_eq!(puts.iter().map(condition).collect::<Vec<_>>(), [Some("W/\"1\"".into()), Some("W/\"2\"".into())]);
        let written: serde_json::Value = serde_json::from_slice(&puts[1].body).unwrap();
        assert!(written.get("etag").is_none() && firewall::has_rule(&written, "jit-r1-22"));
        assert_eq!(
            written["properties"]["networkRuleCollections"][0]["properties"]["rules"][0]["destinationPorts"][0],
            "22"
        );
    }

    #[test]
    fn an_operation_url_outside_arm_is_not_followed_and_the_write_counts_as_uncertain() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(201, &[("azure-asyncoperation", "https://arm.evil.example/op/1")], "{}"),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        assert!(matches!(client.put_rule(&nsg(), &rule()), Err(ArmError::Transient(_))));
        assert_eq!(http.urls().len(), 2, "the token never went to the other host");
        assert!(client.had_uncertain_writes(), "ARM accepted the PUT: it may land");
    }

    #[test]
    fn a_firewall_managed_by_a_policy_is_refused_before_anything_is_written() {
        let fw =
            FirewallId::parse("/subscriptions/s1/resourceGroups/hub/providers/Microsoft.Network/azureFirewalls/fw")
                .unwrap();
        let managed = json!({"name": "fw", "properties": {"firewallPolicy": {"id": "/p"}}}).to_string();
        let http = ScriptedHttp::new(vec![token_ok(), answer(200, &[], &managed)]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let client = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30));
        let error = client.delete_firewall_rules(&fw, &["jit-r1-22".into()]).unwrap_err();
        assert!(matches!(&error, ArmError::Refused { code, .. } if code == "FirewallPolicyManaged"), "{error}");
        assert_eq!(http.urls().len(), 2, "a token and one read");
    }

    #[test]
    fn rule_listing_follows_next_links() {
        let http = ScriptedHttp::new(vec![
            token_ok(),
            answer(
                200,
                &[],
                r#"{"value":[{"name":"a","properties":{"priority":100,"direction":"Inbound"}}],"nextLink":"https://arm/page2"}"#,
            ),
            answer(200, &[], r#"{"value":[{"name":"b","properties":{"priority":200,"direction":"Outbound"}}]}"#),
        ]);
        let (kv, clock, settings) = (crate::store::MemStore::default(), FakeClock::default(), arm_settings());
        let rules = ArmClient::new(&http, &kv, &clock, &settings, Duration::from_secs(30)).list_rules(&nsg()).unwrap();
        assert_eq!(
            rules.iter().map(|r| (r.name.as_str(), r.priority, r.inbound)).collect::<Vec<_>>(),
            [("a", 100, true), ("b", 200, false)]
        );
    }
}
