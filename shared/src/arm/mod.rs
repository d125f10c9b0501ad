//! Azure Resource Manager: the NSG operations portcullis needs, as a port ([`Arm`]) and its
//! REST implementation ([`ArmClient`]).

mod client;
mod token;

use std::net::IpAddr;

pub use client::ArmClient;
use serde_json::json;

use crate::domain::{NsgId, PortSet, Protocol, SourcePrefix};

/// The api-version of `Microsoft.Network` calls.
pub const NETWORK_API_VERSION: &str = "2024-05-01";

/// An allow rule portcullis puts on an NSG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    /// Rule name (`jit-<id>`).
    pub name: String,
    /// Priority in the JIT band.
    pub priority: u16,
    /// Description: who and until when (at most 140 characters).
    pub description: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Who may connect.
    pub source: SourcePrefix,
    /// The VM's private IP.
    pub destination: IpAddr,
    /// Destination ports.
    pub ports: PortSet,
}

impl AllowRule {
    /// The ARM request body.
    pub fn to_arm_body(&self) -> serde_json::Value {
        let ports: Vec<String> = self.ports.iter().map(|p| p.to_string()).collect();
        let description: String = self.description.chars().take(140).collect();
        json!({"properties": {
            "description": description,
            "protocol": self.protocol.arm_name(),
            "sourcePortRange": "*",
            "destinationPortRanges": ports,
            "sourceAddressPrefix": self.source.to_string(),
            "destinationAddressPrefix": self.destination.to_string(),
            "access": "Allow",
            "priority": self.priority,
            "direction": "Inbound",
        }})
    }
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
    },
    /// Worth trying again later: throttling, server errors, timeouts, operations still running.
    #[error("ARM is unavailable for now: {0}")]
    Transient(String),
}

/// The NSG operations the service needs.
pub trait Arm {
    /// Creates or updates an allow rule and waits until ARM reports it in place.
    fn put_rule(&self, nsg: &NsgId, rule: &AllowRule) -> Result<(), ArmError>;
    /// Deletes a rule and waits until it is gone; an absent rule is success.
    fn delete_rule(&self, nsg: &NsgId, name: &str) -> Result<(), ArmError>;
}
