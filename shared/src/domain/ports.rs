//! Ports and protocols, and sets of ports a request asks for.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A TCP/UDP port number, 1 to 65535.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u16")]
pub struct Port(u16);

/// Why a port was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port {0}: ports are 1 to 65535")]
pub struct PortError(u32);

impl Port {
    /// Accepts 1..=65535.
    pub fn new(value: u32) -> Result<Self, PortError> {
        match u16::try_from(value) {
            Ok(port) if port > 0 => Ok(Self(port)),
            _ => Err(PortError(value)),
        }
    }

    /// The number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u32> for Port {
    type Error = PortError;
    fn try_from(value: u32) -> Result<Self, PortError> {
        Self::new(value)
    }
}

impl From<Port> for u16 {
    fn from(value: Port) -> u16 {
        value.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The transport a policy port opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    /// TCP.
    #[serde(rename = "tcp")]
    Tcp,
    /// UDP.
    #[serde(rename = "udp")]
    Udp,
    /// Any protocol.
    #[serde(rename = "*")]
    Any,
}

impl Protocol {
    /// The spelling ARM uses in a security rule.
    pub fn arm_name(self) -> &'static str {
        match self {
            Self::Tcp => "Tcp",
            Self::Udp => "Udp",
            Self::Any => "*",
        }
    }
}

/// A non-empty set of distinct ports, kept sorted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Port>", into = "Vec<Port>")]
pub struct PortSet(BTreeSet<Port>);

/// Why a port list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortSetError {
    /// No ports at all.
    #[error("at least one port is needed")]
    Empty,
    /// A port listed twice.
    #[error("port {0} is listed twice")]
    Duplicate(Port),
}

impl PortSet {
    /// Builds a set, refusing an empty list and duplicates (a duplicate is usually a typo).
    pub fn new(ports: impl IntoIterator<Item = Port>) -> Result<Self, PortSetError> {
        let mut set = BTreeSet::new();
        for port in ports {
            if !set.insert(port) {
                return Err(PortSetError::Duplicate(port));
            }
        }
        if set.is_empty() {
            return Err(PortSetError::Empty);
        }
        Ok(Self(set))
    }

    /// The ports, ascending.
    pub fn iter(&self) -> impl Iterator<Item = Port> + '_ {
        self.0.iter().copied()
    }
}

impl TryFrom<Vec<Port>> for PortSet {
    type Error = PortSetError;
    fn try_from(value: Vec<Port>) -> Result<Self, PortSetError> {
        Self::new(value)
    }
}

impl From<PortSet> for Vec<Port> {
    fn from(value: PortSet) -> Vec<Port> {
        value.0.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_the_range_are_refused() {
        assert!(Port::new(0).is_err());
        assert!(Port::new(65_536).is_err());
        assert_eq!(Port::new(65_535).unwrap().get(), 65_535);
        assert!(serde_json::from_str::<Port>("70000").is_err());
        assert!(serde_json::from_str::<Port>("-1").is_err());
    }

    #[test]
    fn port_sets_refuse_empty_and_duplicates() {
        let p = |n| Port::new(n).unwrap();
        assert_eq!(PortSet::new([]), Err(PortSetError::Empty));
        assert_eq!(PortSet::new([p(22), p(22)]), Err(PortSetError::Duplicate(p(22))));
        let set = PortSet::new([p(3389), p(22)]).unwrap();
        assert_eq!(set.iter().map(Port::get).collect::<Vec<_>>(), [22, 3389]);
    }
}
