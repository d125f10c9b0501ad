//! Azure Resource Manager: the operations portcullis needs, as a port ([`Arm`]) and its REST
//! implementation ([`ArmClient`]).

mod client;
pub mod firewall;
pub mod inventory;
mod token;

use std::net::IpAddr;

pub use client::ArmClient;
use serde_json::json;

use crate::domain::{NsgId, PortSet, Protocol, SourcePrefix, VmId};

/// The api-version of `Microsoft.Network` calls.
pub const NETWORK_API_VERSION: &str = "2024-05-01";
/// The api-version of `Microsoft.Compute` calls.
pub const COMPUTE_API_VERSION: &str = "2024-07-01";

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A grant's rule.
    Allow,
    /// A policy's baseline.
    Deny,
}

/// A security rule portcullis puts on an NSG: a grant's allow rule or a policy's deny rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecurityRule {
    /// Rule name (`jit-<id>`, `jit-deny-<policy>`).
    pub name: String,
    /// Priority.
    pub priority: u16,
    /// Description: who and until when (at most 140 characters).
    pub description: String,
    /// Allow or deny.
    pub access: Access,
    /// Protocol.
    pub protocol: Protocol,
    /// Who may connect; `None` is any source (deny rules).
    pub source: Option<SourcePrefix>,
    /// The private IPs of the VMs it covers on this NSG (never empty).
    pub destinations: Vec<IpAddr>,
    /// Destination ports.
    pub ports: PortSet,
}

impl SecurityRule {
    /// The ARM request body.
    pub fn to_arm_body(&self) -> serde_json::Value {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        let description: String = self.description.chars().take(140).collect();
        let mut body = json!({"properties": {
            "description": description,
            "protocol": self.protocol.arm_name(),
            "sourcePortRange": "*",
            "destinationPortRanges": ports,
            "sourceAddressPrefix": self.source.map_or_else(|| "*".to_owned(), |s| s.to_string()),
            "access": match self.access { Access::Allow => "Allow", Access::Deny => "Deny" },
            "priority": self.priority,
            "direction": "Inbound",
        }});
        // ARM takes one address in the singular field, several in the plural one, never both.
        let destinations: Vec<String> = self.destinations.iter().map(IpAddr::to_string).collect();
        match destinations.as_slice() {
            [one] => body["properties"]["destinationAddressPrefix"] = json!(one),
            _ => body["properties"]["destinationAddressPrefixes"] = json!(destinations),
        }
        body
    }
}

/// A rule already on an NSG: what choosing a priority and the reconciler need to know.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExistingRule {
    /// Its name.
    pub name: String,
    /// Its priority.
    pub priority: u16,
    /// `Inbound` or `Outbound`.
    pub inbound: bool,
    /// Whether it allows (else denies).
    pub allow: bool,
    /// Its description.
    pub description: String,
    /// Its protocol as ARM spells it (`Tcp`, `Udp`, `*`).
    pub protocol: String,
    /// Source prefixes (`sourceAddressPrefix` and `sourceAddressPrefixes`; `*`, `Internet`...).
    pub sources: Vec<String>,
    /// Destination prefixes.
    pub destinations: Vec<String>,
    /// Destination port ranges (`22`, `1000-2000`, `*`).
    pub ports: Vec<String>,
}

impl ExistingRule {
    /// Whether the rule's destination ports include `port`.
    pub fn covers_port(&self, port: u16) -> bool {
        self.ports.iter().any(|range| match range.split_once('-') {
            _ if range == "*" => true,
            Some((low, high)) => {
                low.trim().parse::<u16>().is_ok_and(|l| l <= port)
                    && high.trim().parse::<u16>().is_ok_and(|h| port <= h)
            }
            None => range.trim().parse::<u16>() == Ok(port),
        })
    }

    /// Whether anyone on the internet matches its sources.
    pub fn from_anywhere(&self) -> bool {
        self.sources.iter().any(|s| matches!(s.as_str(), "*" | "Internet" | "0.0.0.0/0" | "::/0" | "Any"))
    }
}

/// Where a VM sits on the network, as ARM describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmNetwork {
    /// The primary NIC's id.
    pub nic: String,
    /// The primary IP configuration's private address.
    pub private_ip: IpAddr,
    /// The NSG that filters its traffic: the NIC's, else the subnet's.
    pub nsg: Option<NsgId>,
}

/// What went wrong talking to ARM, in the terms a caller acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArmError {
    /// Another rule holds this priority and direction: pick another priority.
    #[error("priority already used on the NSG (SecurityRuleConflict)")]
    PriorityConflict,
    /// ARM refused the request for good (validation, missing resource, permission).
    #[error("ARM refused the request: {status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// ARM's error code.
        code: String,
        /// ARM's message.
        message: String,
        /// ARM's `x-ms-request-id` of the refusing answer, for Azure support.
        request_id: Option<String>,
    },
    /// Worth trying again later: throttling, server errors, timeouts, operations still running.
    #[error("ARM is unavailable for now: {0}")]
    Transient(String),
}

/// What ARM said of a write that succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArmReceipt {
    /// ARM's `x-ms-request-id` of the write, which the audit trail keeps.
    pub request_id: Option<String>,
}

impl ArmError {
    /// ARM's request id, when ARM answered.
    pub fn request_id(&self) -> Option<&str> {
        match self {
            Self::Refused { request_id, .. } => request_id.as_deref(),
            Self::PriorityConflict | Self::Transient(_) => None,
        }
    }
}

/// The ARM operations the service needs.
pub trait Arm {
    /// Creates or updates a rule and waits until ARM reports it in place.
    fn put_rule(&self, nsg: &NsgId, rule: &SecurityRule) -> Result<ArmReceipt, ArmError>;
    /// Deletes a rule and waits until it is gone; an absent rule is success.
    fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<ArmReceipt, ArmError>;
    /// The rules on an NSG (to find a free priority).
    fn list_rules(&self, nsg: &NsgId) -> Result<Vec<ExistingRule>, ArmError>;
    /// Resolves a VM to its NIC, private IP and NSG.
    fn resolve_vm(&self, vm: &VmId) -> Result<VmNetwork, ArmError>;
    /// Puts the DNAT and network rules of `wanted` on an Azure Firewall (classic collections),
    /// each with its firewall address and mapped port (kept when its rule is already there),
    /// and answers them with the write's receipt.
    fn put_firewall_rules(
        &self,
        firewall: &crate::domain::FirewallId,
        wanted: &[firewall::FirewallWant],
    ) -> Result<(ArmReceipt, Vec<firewall::FirewallGrant>), ArmError>;
    /// The names of the rules in portcullis's collections on an Azure Firewall (one read; a
    /// firewall managed by a Firewall Policy is refused, as writes to it are).
    fn list_firewall_rules(&self, firewall: &crate::domain::FirewallId) -> Result<Vec<String>, ArmError>;
    /// Removes rules from an Azure Firewall by name; absent ones are success.
    fn delete_firewall_rules(
        &self,
        firewall: &crate::domain::FirewallId,
        names: &[String],
    ) -> Result<ArmReceipt, ArmError>;
    /// One page of the VMs a selector names: the first, or the one at `page` (a `nextLink`
    /// an earlier page gave).
    fn list_vms(&self, selector: &inventory::VmSelector, page: Option<&str>) -> Result<inventory::VmPage, ArmError>;
    /// Whether a write of this invocation failed in a way that may still take effect later (a
    /// timeout, a dropped connection, a 5xx), even if a retry then got a clear answer: a PUT
    /// lease is then kept until it runs out rather than released.
    fn had_uncertain_writes(&self) -> bool;
}
