//! Tiny constructors and fakes for unit tests, so cases read like data.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use serde_json::json;

use crate::arm::{Access, Arm, ArmError, ArmReceipt, ExistingRule, SecurityRule, VmNetwork};
use crate::config::{ArmSettings, Identity, Secret};
use crate::domain::policy::{PolicyLimits, RawPolicy};
use crate::domain::{AccessDuration, NsgId, Policy, PolicyName, Port, PortSet, Protocol, SourcePrefix, VmId};
use crate::http::{Clock, HttpClient, HttpError, HttpRequest, HttpResponse};
use crate::store::{KvStore, MemStore, StoreError};

pub const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Compute/virtualMachines/demo-vm";
pub const NSG: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Network/networkSecurityGroups/demo-nsg";

/// `minutes` after a fixed instant.
pub fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap() + TimeDelta::minutes(minutes)
}

pub fn limits() -> PolicyLimits {
    PolicyLimits { max_duration: AccessDuration::parse("PT24H").unwrap() }
}

pub fn policy_json() -> serde_json::Value {
    json!({
        "vm": VM, "nsg": NSG, "private_ip": "10.0.0.4",
        "ports": [{"port": 22, "protocol": "tcp", "max_duration": "PT3H", "allowed_sources": ["203.0.113.0/24"]},
                  {"port": 3389, "protocol": "tcp", "max_duration": "PT1H", "allowed_sources": ["203.0.113.0/24"]}],
        "approval": {"mode": "auto"},
    })
}

pub fn policy() -> Policy {
    let raw: RawPolicy = serde_json::from_value(policy_json()).unwrap();
    Policy::from_raw::<crate::domain::policy::PolicyError>(PolicyName::parse("demo-vm").unwrap(), raw, limits(), |_| {
        unreachable!("the test policy names its NSG")
    })
    .unwrap()
}

pub fn raw_request() -> serde_json::Value {
    json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "203.0.113.7", "justification": "INC-1234"})
}

pub fn arm_settings() -> ArmSettings {
    ArmSettings {
        identity: Identity::ClientSecret,
        identity_endpoint: "http://imds/token".into(),
        timeout: Duration::from_secs(10),
        arm_base_url: "https://arm".into(),
        login_base_url: "https://login".into(),
        tenant_id: "t".into(),
        client_id: "c".into(),
        client_secret: Secret::new("s".into()),
        token_key: None,
    }
}

pub fn nsg() -> NsgId {
    NsgId::parse(NSG).unwrap()
}

pub fn rule() -> SecurityRule {
    SecurityRule {
        name: "jit-r1".into(),
        priority: 100,
        description: "test".into(),
        access: Access::Allow,
        protocol: Protocol::Tcp,
        source: Some(SourcePrefix::parse("203.0.113.7").unwrap()),
        destinations: vec!["10.0.0.4".parse().unwrap()],
        ports: PortSet::new([Port::new(22).unwrap()]).unwrap(),
    }
}

/// A clock that stays at one instant (an invocation whose ARM calls take no time).
pub struct FixedClock(pub DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }

    fn sleep(&self, _: Duration) {}
}

/// A clock whose sleeps only add up.
#[derive(Default)]
pub struct FakeClock {
    slept: Cell<Duration>,
}

impl FakeClock {
    pub fn slept(&self) -> Duration {
        self.slept.get()
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        at(0) + TimeDelta::from_std(self.slept.get()).unwrap()
    }

    fn sleep(&self, duration: Duration) {
        self.slept.set(self.slept.get() + duration);
    }
}

/// Answers requests from a script, in order, and remembers their URLs.
pub struct ScriptedHttp {
    script: RefCell<VecDeque<HttpResponse>>,
    urls: RefCell<Vec<String>>,
    requests: RefCell<Vec<HttpRequest>>,
}

impl ScriptedHttp {
    pub fn new(script: Vec<HttpResponse>) -> Self {
        Self { script: RefCell::new(script.into()), urls: RefCell::default(), requests: RefCell::default() }
    }

    pub fn urls(&self) -> Vec<String> {
        self.urls.borrow().clone()
    }

    /// Every request sent, in order.
    pub fn requests(&self) -> Vec<HttpRequest> {
        self.requests.borrow().clone()
    }
}

impl HttpClient for ScriptedHttp {
    fn send(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        self.requests.borrow_mut().push(request.clone());
        self.urls.borrow_mut().push(request.url);
        self.script.borrow_mut().pop_front().ok_or_else(|| HttpError::Connection("script exhausted".into()))
    }
}

/// An NSG in memory; `outcomes` scripts failures for the next put or delete calls.
#[derive(Default)]
pub struct FakeArm {
    pub rules: RefCell<Vec<SecurityRule>>,
    pub outcomes: RefCell<VecDeque<Result<(), ArmError>>>,
    pub calls: Cell<usize>,
    /// What `had_uncertain_writes` answers.
    pub uncertain: Cell<bool>,
}

impl FakeArm {
    fn scripted(&self) -> Result<(), ArmError> {
        self.calls.set(self.calls.get() + 1);
        self.outcomes.borrow_mut().pop_front().unwrap_or(Ok(()))
    }

    fn receipt(&self) -> ArmReceipt {
        ArmReceipt { request_id: Some(format!("fake-arm-{}", self.calls.get())) }
    }
}

impl Arm for FakeArm {
    fn put_firewall_rules(
        &self,
        _firewall: &crate::domain::FirewallId,
        _wanted: &[crate::arm::firewall::FirewallWant],
    ) -> Result<(ArmReceipt, Vec<crate::arm::firewall::FirewallGrant>), ArmError> {
        self.scripted()?;
        Ok((self.receipt(), Vec::new()))
    }

    fn list_firewall_rules(&self, _firewall: &crate::domain::FirewallId) -> Result<Vec<String>, ArmError> {
        Ok(Vec::new())
    }

    fn delete_firewall_rules(
        &self,
        _firewall: &crate::domain::FirewallId,
        _names: &[String],
    ) -> Result<ArmReceipt, ArmError> {
        self.scripted()?;
        Ok(self.receipt())
    }

    fn list_vms(
        &self,
        _selector: &crate::arm::inventory::VmSelector,
        _page: Option<&str>,
    ) -> Result<crate::arm::inventory::VmPage, ArmError> {
        self.scripted()?;
        Ok(crate::arm::inventory::VmPage::default())
    }

    fn put_rule(&self, _nsg: &NsgId, rule: &SecurityRule) -> Result<ArmReceipt, ArmError> {
        self.scripted()?;
        let mut rules = self.rules.borrow_mut();
        rules.retain(|r| r.name != rule.name);
        rules.push(rule.clone());
        Ok(self.receipt())
    }

    fn delete_rule(&self, _nsg: &NsgId, name: &str) -> Result<ArmReceipt, ArmError> {
        self.scripted()?;
        self.rules.borrow_mut().retain(|r| r.name != name);
        Ok(self.receipt())
    }

    fn list_rules(&self, _nsg: &NsgId) -> Result<Vec<ExistingRule>, ArmError> {
        Ok(self
            .rules
            .borrow()
            .iter()
            .map(|r| ExistingRule {
                name: r.name.clone(),
                priority: r.priority,
                inbound: true,
                allow: r.access == Access::Allow,
                description: r.description.clone(),
                protocol: r.protocol.arm_name().to_owned(),
                sources: vec![r.source.map_or_else(|| "*".to_owned(), |s| s.to_string())],
                destinations: r.destinations.iter().map(|d| d.to_string()).collect(),
                ports: r.ports.iter().map(|p| p.to_string()).collect(),
            })
            .collect())
    }

    fn had_uncertain_writes(&self) -> bool {
        self.uncertain.get()
    }

    fn resolve_vm(&self, _vm: &VmId) -> Result<VmNetwork, ArmError> {
        Ok(VmNetwork { nic: "nic".into(), private_ip: "10.0.0.4".parse().unwrap(), nsg: Some(nsg()) })
    }
}

/// What runs before each compare-and-swap of a [`HookedStore`].
pub type SwapHook = Box<dyn FnMut(&MemStore, &str) -> Result<(), StoreError>>;

/// An in-memory store that runs a hook before each compare-and-swap: to let a rival writer in
/// first, or to fail.
#[derive(Default)]
pub struct HookedStore {
    pub mem: MemStore,
    hook: RefCell<Option<SwapHook>>,
    /// Keys whose reads fail with a backend error (a timeout, a throttled Cosmos read).
    pub unreadable: RefCell<Vec<String>>,
}

impl HookedStore {
    pub fn over(mem: MemStore) -> Self {
        Self { mem, ..Self::default() }
    }

    /// Makes every read of `key` fail until [`HookedStore::heal`].
    pub fn fail_reads_of(&self, key: &str) {
        self.unreadable.borrow_mut().push(key.to_owned());
    }

    pub fn heal(&self) {
        self.unreadable.borrow_mut().clear();
    }

    pub fn before_swap(&self, hook: impl FnMut(&MemStore, &str) -> Result<(), StoreError> + 'static) {
        *self.hook.borrow_mut() = Some(Box::new(hook));
    }

    pub fn clear_hook(&self) {
        *self.hook.borrow_mut() = None;
    }

    pub fn keys(&self) -> Vec<String> {
        self.mem.keys()
    }
}

impl KvStore for HookedStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if self.unreadable.borrow().iter().any(|k| k == key) {
            return Err(StoreError::Backend(format!("injected read failure of '{key}'")));
        }
        self.mem.get(key)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.mem.set(key, value)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.mem.delete(key)
    }

    fn compare_and_swap(&self, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, StoreError> {
        if let Some(hook) = self.hook.borrow_mut().as_mut() {
            hook(&self.mem, key)?;
        }
        self.mem.compare_and_swap(key, expected, value)
    }

    fn increment(&self, key: &str, delta: i64) -> Result<i64, StoreError> {
        self.mem.increment(key, delta)
    }
}

/// Alice's valid request (port 22, PT1H, from 203.0.113.7) under [`policy`], made at `at(0)`.
pub fn request() -> crate::domain::AccessRequest {
    let raw: crate::domain::RawRequest = serde_json::from_value(raw_request()).unwrap();
    let alice = crate::domain::Principal::parse("alice").unwrap();
    let devs = [crate::domain::GroupName::parse("devs").unwrap()];
    crate::domain::AccessRequest::from_raw(
        raw,
        &policy(),
        &alice,
        &devs,
        None,
        crate::domain::RequestId::parse("r1").unwrap(),
        at(0),
    )
    .unwrap()
}
