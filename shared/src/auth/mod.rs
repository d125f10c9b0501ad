//! Who is calling: API keys (configured as SHA-256 hashes), OIDC bearer tokens, and the
//! caller's network address.

mod jwt_crypto;
pub mod oidc;
pub mod signin;

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::{GroupName, Principal};

/// What a caller may do in general; per-policy lists narrow it further.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Manages policies, sees everything.
    Admin,
    /// Decides requests under policies that list them.
    Approver,
    /// Asks for access under policies that admit them.
    Requester,
    /// Reads requests and the audit trail.
    Auditor,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Who they are.
    pub principal: Principal,
    /// A name for people to read (an OIDC token's `name`), shown beside the principal;
    /// nothing is decided by it.
    pub display_name: Option<String>,
    /// Their groups.
    pub groups: Vec<GroupName>,
    /// Their roles.
    pub roles: Vec<Role>,
}

impl Caller {
    /// Whether the caller holds a role.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// Why authentication failed; deliberately says little to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer ...` header.
    #[error("missing bearer credentials: send 'Authorization: Bearer <API key>'")]
    Missing,
    /// A key that matches no configured hash.
    #[error("unknown or revoked credentials")]
    Unknown,
    /// A bearer token that fails verification; says why (never echoes the token).
    #[error("invalid bearer token: {0}")]
    InvalidToken(String),
    /// The identity provider could not be reached to check a token.
    #[error("cannot verify the token now: {0}")]
    Unavailable(String),
}

/// The configured API keys: SHA-256 hashes of the keys, each with its caller.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Vec<([u8; 32], Caller)>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    sha256: String,
    principal: Principal,
    #[serde(default)]
    groups: Vec<GroupName>,
    roles: Vec<Role>,
}

impl ApiKeys {
    /// Parses the `api_keys` variable: a JSON list of
    /// `{"sha256": "<hex>", "principal": "alice", "groups": ["devs"], "roles": ["requester"]}`.
    pub fn parse(json: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let raw: Vec<RawKey> = serde_json::from_str(json).context("api_keys is not a JSON list of keys")?;
        let mut keys = Vec::with_capacity(raw.len());
        for key in raw {
            check_not_reserved(&key.principal).map_err(anyhow::Error::msg)?;
            let hash: [u8; 32] = hex::decode(&key.sha256)
                .ok()
                .and_then(|bytes| bytes.try_into().ok())
                .with_context(|| format!("api_keys entry for '{}': sha256 must be 64 hex digits", key.principal))?;
            let caller = Caller { principal: key.principal, display_name: None, groups: key.groups, roles: key.roles };
            keys.push((hash, caller));
        }
        Ok(Self(keys))
    }

    /// Whether an API key is held by `principal`. OIDC tokens naming such a principal are
    /// refused, so the two kinds of principal never meet: a person whose username matches a
    /// key's principal does not act as the key (its grants, its approvals, its requests).
    pub fn has_principal(&self, principal: &Principal) -> bool {
        self.0.iter().any(|(_, caller)| &caller.principal == principal)
    }

    /// The caller of the API key held by `principal`, if there is one.
    pub fn caller_of(&self, principal: &Principal) -> Option<Caller> {
        self.0.iter().find(|(_, caller)| &caller.principal == principal).map(|(_, caller)| caller.clone())
    }

    /// Finds the caller for an `Authorization` header value. Every configured hash is compared
    /// in constant time, and all of them are always compared, so timing reveals nothing.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let key = authorization
            .and_then(|value| value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .ok_or(AuthError::Missing)?;
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let mut found = None;
        for (hash, caller) in &self.0 {
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(caller);
            }
        }
        found.cloned().ok_or(AuthError::Unknown)
    }
}

/// The principal of an integration that decides requests (`integration:<name>`), which
/// no API key or token can have.
pub fn integration_principal(name: &crate::domain::WebhookName) -> Principal {
    Principal::parse(&format!("integration:{name}")).expect("a webhook name makes a principal")
}

/// The actors the service itself uses in the audit trail; no caller may be named so.
const RESERVED_PRINCIPALS: [&str; 2] = ["system", "anonymous"];

/// Refuses a principal named like the service's own actors (`system`, the sweep; `anonymous`,
/// a failed login), so that no caller's events can pass for theirs.
pub fn check_not_reserved(principal: &Principal) -> Result<(), String> {
    if RESERVED_PRINCIPALS.contains(&principal.as_str()) {
        return Err(format!("the principal '{principal}' is reserved for the service's own audit events"));
    }
    if principal.as_str().contains(':') {
        return Err(format!("the principal '{principal}' has a ':', which only integrations' principals have"));
    }
    Ok(())
}

/// Checks `Authorization: Bearer <secret>` against a shared secret (the sweep's), comparing
/// SHA-256 digests in constant time so neither content nor length leaks.
pub fn check_shared_secret(authorization: Option<&str>, secret: &str) -> Result<(), AuthError> {
    let presented = authorization.and_then(|v| v.strip_prefix("Bearer ")).ok_or(AuthError::Missing)?;
    let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    let expected: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    if bool::from(presented.ct_eq(&expected)) { Ok(()) } else { Err(AuthError::Unknown) }
}

/// The SHA-256 of an API key as hex, the form `api_keys` stores.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The caller's address: the connection's peer (`spin-client-addr`), or the last hop of
/// `X-Forwarded-For` when, and only when, the peer is a configured trusted proxy.
pub fn client_ip(peer: Option<&str>, forwarded_for: Option<&str>, trusted_proxies: &[IpNet]) -> Option<IpAddr> {
    let peer = peer.and_then(address)?;
    if !trusted_proxies.iter().any(|proxy| proxy.contains(&peer)) {
        return Some(peer);
    }
    // Walk from the right: the nearest untrusted hop is the client.
    let hops = forwarded_for.unwrap_or_default().split(',').map(str::trim).filter(|h| !h.is_empty());
    for hop in hops.rev() {
        match address(hop) {
            Some(ip) if trusted_proxies.iter().any(|proxy| proxy.contains(&ip)) => continue,
            Some(ip) => return Some(ip),
            // A hop that is no address: the caller is unknown (never the proxy: its address
            // would become the default source of a grant).
            None => return None,
        }
    }
    Some(peer)
}

/// An address as peers and proxies write it: `203.0.113.7`, `203.0.113.7:5000` (Azure
/// Application Gateway adds the port), `2001:db8::1` or `[2001:db8::1]:443`.
fn address(text: &str) -> Option<IpAddr> {
    let ip = text.parse::<SocketAddr>().map(|s| s.ip()).ok().or_else(|| text.parse::<IpAddr>().ok())?;
    Some(canonical(ip))
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) are IPv4 callers.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::parse(&format!(
            r#"[{{"sha256":"{}","principal":"alice","groups":["devs"],"roles":["requester"]}},
               {{"sha256":"{}","principal":"bob","roles":["approver"]}}]"#,
            hash_key("alice-key"),
            hash_key("bob-key")
        ))
        .unwrap()
    }

    #[test]
    fn known_keys_map_to_their_caller() {
        let alice = keys().authenticate(Some("Bearer alice-key")).unwrap();
        assert_eq!(alice.principal.as_str(), "alice");
        assert!(alice.has(Role::Requester) && !alice.has(Role::Approver));
        assert_eq!(keys().authenticate(Some("Bearer bob-key")).unwrap().principal.as_str(), "bob");
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_refused() {
        assert_eq!(keys().authenticate(None), Err(AuthError::Missing));
        assert_eq!(keys().authenticate(Some("Basic YWxpY2U6eA==")), Err(AuthError::Missing));
        assert_eq!(keys().authenticate(Some("Bearer ")), Err(AuthError::Missing));
        assert_eq!(keys().authenticate(Some("Bearer alice-key2")), Err(AuthError::Unknown));
    }

    #[test]
    fn bad_configuration_is_an_error_not_an_empty_key_set() {
        assert!(ApiKeys::parse("{}").is_err());
        assert!(ApiKeys::parse(r#"[{"sha256":"abc","principal":"x","roles":[]}]"#).is_err());
        let system = format!(r#"[{{"sha256":"{}","principal":"system","roles":["admin"]}}]"#, hash_key("k"));
        assert!(format!("{:#}", ApiKeys::parse(&system).unwrap_err()).contains("reserved"));
    }

    #[test]
    fn the_shared_secret_must_match_exactly() {
        assert_eq!(check_shared_secret(Some("Bearer s3cret"), "s3cret"), Ok(()));
        assert_eq!(check_shared_secret(Some("Bearer s3cre"), "s3cret"), Err(AuthError::Unknown));
        assert_eq!(check_shared_secret(None, "s3cret"), Err(AuthError::Missing));
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let proxies: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(client_ip(Some("198.51.100.9:5000"), Some("203.0.113.7"), &proxies), ip("198.51.100.9"));
        assert_eq!(client_ip(Some("10.1.2.3:5000"), Some("203.0.113.7, 10.1.0.5"), &proxies), ip("203.0.113.7"));
        assert_eq!(client_ip(Some("10.1.2.3:5000"), None, &proxies), ip("10.1.2.3"));
        assert_eq!(client_ip(Some("[2001:db8::1]:443"), None, &[]), ip("2001:db8::1"));
        assert_eq!(client_ip(Some("[::ffff:203.0.113.7]:443"), None, &[]), ip("203.0.113.7"));
        assert_eq!(client_ip(None, Some("203.0.113.7"), &proxies), None);
        // Proxies that add the port, and hops that are no address.
        assert_eq!(client_ip(Some("10.1.2.3:5000"), Some("203.0.113.7:61000"), &proxies), ip("203.0.113.7"));
        assert_eq!(client_ip(Some("10.1.2.3:5000"), Some("[2001:db8::7]:443"), &proxies), ip("2001:db8::7"));
        assert_eq!(client_ip(Some("10.1.2.3:5000"), Some("unknown, 10.1.0.5"), &proxies), None);
    }
}
