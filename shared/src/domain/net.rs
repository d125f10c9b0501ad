//! Source prefixes: what a request may open to, and what a policy allows.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid source prefix '{input}': {reason}")]
pub struct PrefixError {
    input: String,
    reason: String,
}

/// A network prefix with no host bits set (`203.0.113.0/24`, `203.0.113.7/32`, `2001:db8::/48`).
/// A bare address means a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SourcePrefix(IpNet);

impl SourcePrefix {
    /// Parses an address or a CIDR prefix. Host bits are refused rather than silently dropped,
    /// so `203.0.113.7/24` fails with a message naming `203.0.113.0/24`.
    pub fn parse(input: &str) -> Result<Self, PrefixError> {
        let err = |reason: String| PrefixError { input: input.chars().take(64).collect(), reason };
        let expected = || err("expected an IPv4 or IPv6 address or CIDR prefix, e.g. 203.0.113.0/24".into());
        let (address, length) = match input.split_once('/') {
            Some((address, length)) => (address, Some(length)),
            None => (input, None),
        };
        // The standard parser refuses leading zeros (`010.0.0.1`), which some tools read as
        // octal; ipnet's own parser would accept them, so it is not used on the address.
        let address: IpAddr = address.parse().map_err(|_| expected())?;
        let Some(length) = length else { return Ok(Self::host(address)) };
        let canonical = !length.is_empty()
            && length.bytes().all(|b| b.is_ascii_digit())
            && !(length.len() > 1 && length.starts_with('0'));
        let length: u8 = length.parse().ok().filter(|_| canonical).ok_or_else(expected)?;
        let net = IpNet::new(address, length).map_err(|_| err(format!("prefix length {length} is too long")))?;
        if net.trunc() != net {
            return Err(err(format!("host bits are set; did you mean {}?", net.trunc())));
        }
        Ok(Self(net))
    }

    /// The single-host prefix of an address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Self {
        Self(IpNet::from(addr))
    }

    /// Whether every address of `other` lies inside this prefix.
    pub fn contains(&self, other: &SourcePrefix) -> bool {
        self.0.contains(&other.0)
    }

    /// Whether this prefix covers the whole address space of its family (`0.0.0.0/0`, `::/0`).
    pub fn is_everything(&self) -> bool {
        self.0.prefix_len() == 0
    }
}

impl fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl TryFrom<String> for SourcePrefix {
    type Error = PrefixError;
    fn try_from(value: String) -> Result<Self, PrefixError> {
        Self::parse(&value)
    }
}

impl From<SourcePrefix> for String {
    fn from(value: SourcePrefix) -> String {
        value.to_string()
    }
}

/// One entry of a policy port's `allowed_sources`: a prefix, or the explicit word `any`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum AllowedSource {
    /// Any source at all, including `0.0.0.0/0`; only ever present when an admin wrote `any`.
    Any,
    /// Sources inside this prefix.
    Prefix(SourcePrefix),
}

impl AllowedSource {
    /// Whether a request from `source` is allowed by this entry. A whole-address-space prefix
    /// written as such (`0.0.0.0/0`) is refused at policy level, so only `any` admits it.
    pub fn admits(&self, source: &SourcePrefix) -> bool {
        match self {
            Self::Any => true,
            Self::Prefix(allowed) => allowed.contains(source),
        }
    }
}

impl TryFrom<String> for AllowedSource {
    type Error = PrefixError;
    fn try_from(value: String) -> Result<Self, PrefixError> {
        if value == "any" {
            return Ok(Self::Any);
        }
        let prefix = SourcePrefix::parse(&value)?;
        if prefix.is_everything() {
            return Err(PrefixError {
                input: value,
                reason: "opens the port to the whole internet; write \"any\" if that is really meant".into(),
            });
        }
        Ok(Self::Prefix(prefix))
    }
}

impl From<AllowedSource> for String {
    fn from(value: AllowedSource) -> String {
        match value {
            AllowedSource::Any => "any".into(),
            AllowedSource::Prefix(p) => p.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SourcePrefix {
        SourcePrefix::parse(s).unwrap()
    }

    #[test]
    fn bare_addresses_are_single_hosts() {
        assert_eq!(p("203.0.113.7").to_string(), "203.0.113.7/32");
        assert_eq!(p("2001:db8::1").to_string(), "2001:db8::1/128");
    }

    #[test]
    fn host_bits_are_refused_naming_the_network() {
        let err = SourcePrefix::parse("203.0.113.7/24").unwrap_err().to_string();
        assert!(err.contains("203.0.113.0/24"), "{err}");
        assert!(SourcePrefix::parse("10.0.0.0/33").is_err());
        assert!(SourcePrefix::parse("not-an-ip").is_err());
    }

    #[test]
    fn narrower_prefixes_are_admitted_wider_are_not() {
        let allowed = AllowedSource::try_from("203.0.113.0/24".to_string()).unwrap();
        assert!(allowed.admits(&p("203.0.113.0/28")));
        assert!(allowed.admits(&p("203.0.113.7")));
        assert!(!allowed.admits(&p("203.0.112.0/23")));
        assert!(!allowed.admits(&p("2001:db8::1")));
    }

    #[test]
    fn whole_internet_needs_the_word_any() {
        assert!(AllowedSource::try_from("0.0.0.0/0".to_string()).is_err());
    }

    #[test]
    fn leading_zeros_are_refused_in_prefixes_as_in_addresses() {
        for input in ["010.0.0.1", "010.0.0.1/32", "10.0.0.0/024", "10.0.0.0/+24", "10.0.0.0/", "10.0.0.0/33"] {
            assert!(SourcePrefix::parse(input).is_err(), "{input}");
            assert!(AllowedSource::try_from(input.to_string()).is_err(), "{input}");
        }
        assert_eq!(SourcePrefix::parse("10.0.0.1/32").unwrap().to_string(), "10.0.0.1/32");
        assert_eq!(SourcePrefix::parse("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        assert_eq!(SourcePrefix::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert!(AllowedSource::try_from("::/0".to_string()).is_err());
        assert!(AllowedSource::try_from("any".to_string()).unwrap().admits(&p("0.0.0.0/0")));
    }
}
