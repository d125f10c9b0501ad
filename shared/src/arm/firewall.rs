//! A grant's way through an Azure Firewall with classic rule collections, as Defender's JIT
//! opens it: a DNAT rule (a public port of the firewall mapped to the VM's private address and
//! port, Azure's `mappedPort`) and a network rule for the requested source, both removed when
//! the grant ends. Issue 15's ARM layer; grants use it once fleet policies name firewalls.
//!
//! A firewall has no URL per rule: the whole resource is read, its rule arrays edited, and
//! written back with `If-Match` on the etag read (a stale one answers 412 and the edit starts
//! again). portcullis keeps its rules in collections of its own, so nothing an admin wrote is
//! touched, and names each rule after the grant. Firewalls whose rules live in a Firewall
//! Policy (Firewall Manager) are refused, as Defender's JIT refuses them.

use std::net::IpAddr;

use serde_json::{Value, json};

use crate::domain::ports::Protocol;

/// portcullis's DNAT collection on a firewall.
pub const NAT_COLLECTION: &str = "portcullis-jit-dnat";
/// portcullis's network rule collection on a firewall.
pub const NETWORK_COLLECTION: &str = "portcullis-jit-net";
/// Where mapped ports are taken from (NAT rules take ports 1 to 63999).
pub const MAPPED_PORTS: std::ops::RangeInclusive<u16> = 50000..=59999;

/// What a grant asks of a firewall for one port; the firewall's address and the mapped port
/// are chosen when its document is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallWant {
    /// The name both rules take (the grant's rule name and the port).
    pub name: String,
    /// The protocol of the port.
    pub protocol: Protocol,
    /// The requested source (an address or prefix).
    pub source: String,
    /// The VM's private address.
    pub private_ip: IpAddr,
    /// The VM's port.
    pub port: u16,
}

/// The port a DNAT rule of portcullis's already maps, by rule name (a retried write keeps it).
pub fn mapped_port_of(firewall: &Value, name: &str) -> Option<u16> {
    collections(firewall, "natRuleCollections")
        .filter(|c| c["name"] == NAT_COLLECTION)
        .flat_map(|c| c["properties"]["rules"].as_array().cloned().unwrap_or_default())
        .find(|r| r["name"] == name)
        .and_then(|r| r["destinationPorts"][0].as_str()?.parse().ok())
}

/// The rules one grant needs on a firewall, for one port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirewallGrant {
    /// The name both rules take (the grant's rule name and the port).
    pub name: String,
    /// The protocol of the port.
    pub protocol: Protocol,
    /// The requested source (an address or prefix).
    pub source: String,
    /// The firewall's public address the DNAT rule listens on.
    pub public_ip: IpAddr,
    /// The port on the firewall mapped to the VM's (`mappedPort`).
    pub mapped_port: u16,
    /// The VM's private address.
    pub private_ip: IpAddr,
    /// The VM's port.
    pub port: u16,
}

/// Why a firewall cannot take JIT rules.
pub fn refusal(firewall: &Value) -> Option<String> {
    let properties = &firewall["properties"];
    if properties["firewallPolicy"]["id"].is_string() {
        return Some(format!(
            "Azure Firewall '{}' is managed by a Firewall Policy (Firewall Manager); portcullis, like Defender's JIT, \
             writes only classic rule collections",
            firewall["name"].as_str().unwrap_or_default()
        ));
    }
    None
}

/// The public IP resources a firewall's configurations name (to read their addresses), and
/// the addresses a hub firewall lists itself.
pub fn public_addresses(firewall: &Value) -> (Vec<String>, Vec<IpAddr>) {
    let properties = &firewall["properties"];
    let ids = properties["ipConfigurations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["properties"]["publicIPAddress"]["id"].as_str().map(str::to_owned))
        .collect();
    let hub = properties["hubIPAddresses"]["publicIPs"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["address"].as_str()?.parse().ok())
        .collect();
    (ids, hub)
}

/// The first port in [`MAPPED_PORTS`] that no DNAT rule on the firewall listens on, avoiding
/// `also_taken` (ports chosen for this edit already).
pub fn free_mapped_port(firewall: &Value, also_taken: &[u16]) -> Option<u16> {
    // Ports are strings: one number, or a range (`"50000-50100"`); `*` takes them all.
    let used: Vec<(u16, u16)> = collections(firewall, "natRuleCollections")
        .flat_map(|c| c["properties"]["rules"].as_array().cloned().unwrap_or_default())
        .flat_map(|rule| rule["destinationPorts"].as_array().cloned().unwrap_or_default())
        .filter_map(|port| {
            let text = port.as_str()?.trim();
            if text == "*" {
                return Some((0, u16::MAX));
            }
            let (low, high) = text.split_once('-').unwrap_or((text, text));
            Some((low.trim().parse().ok()?, high.trim().parse().ok()?))
        })
        .collect();
    MAPPED_PORTS
        .into_iter()
        .find(|p| !used.iter().any(|(low, high)| (low..=high).contains(&p)) && !also_taken.contains(p))
}

fn collections<'a>(firewall: &'a Value, kind: &str) -> impl Iterator<Item = &'a Value> {
    firewall["properties"][kind].as_array().into_iter().flatten()
}

fn protocols(protocol: Protocol) -> Value {
    match protocol {
        Protocol::Tcp => json!(["TCP"]),
        Protocol::Udp => json!(["UDP"]),
        Protocol::Any => json!(["TCP", "UDP"]),
    }
}

/// Adds the grants' rules to portcullis's collections (creating them at `priority`, or the
/// next free priority, when absent); a rule of the same name is replaced.
pub fn add_rules(firewall: &mut Value, grants: &[FirewallGrant], priority: u32) {
    for grant in grants {
        let nat = json!({"name": grant.name, "protocols": protocols(grant.protocol),
            "sourceAddresses": [grant.source], "destinationAddresses": [grant.public_ip.to_string()],
            "destinationPorts": [grant.mapped_port.to_string()], "translatedAddress": grant.private_ip.to_string(),
            "translatedPort": grant.port.to_string()});
        let network = json!({"name": grant.name, "protocols": protocols(grant.protocol),
            "sourceAddresses": [grant.source], "destinationAddresses": [grant.private_ip.to_string()],
            "destinationPorts": [grant.port.to_string()]});
        put_rule(firewall, "natRuleCollections", NAT_COLLECTION, "Dnat", priority, nat);
        put_rule(firewall, "networkRuleCollections", NETWORK_COLLECTION, "Allow", priority, network);
    }
}

fn put_rule(firewall: &mut Value, kind: &str, name: &str, action: &str, priority: u32, rule: Value) {
    if !firewall["properties"][kind].is_array() {
        firewall["properties"][kind] = json!([]);
    }
    let list = firewall["properties"][kind].as_array_mut().expect("made an array above");
    let at = match list.iter().position(|c| c["name"] == name) {
        Some(at) => at,
        None => {
            let taken: Vec<u64> = list.iter().filter_map(|c| c["properties"]["priority"].as_u64()).collect();
            let free = |p: &u64| !taken.contains(p);
            let priority = (u64::from(priority)..=65000).chain(100..u64::from(priority)).find(free).unwrap_or(65000);
            list.push(
                json!({"name": name, "properties": {"priority": priority, "action": {"type": action}, "rules": []}}),
            );
            list.len() - 1
        }
    };
    let rules = &mut list[at]["properties"]["rules"];
    if !rules.is_array() {
        *rules = json!([]);
    }
    let rules = rules.as_array_mut().expect("made an array above");
    rules.retain(|r| r["name"] != rule["name"]);
    rules.push(rule);
}

/// Removes the named rules from portcullis's collections (a collection left empty goes too);
/// answers whether anything changed.
pub fn remove_rules(firewall: &mut Value, names: &[String]) -> bool {
    let mut changed = false;
    for (kind, collection) in [("natRuleCollections", NAT_COLLECTION), ("networkRuleCollections", NETWORK_COLLECTION)] {
        let Some(list) = firewall["properties"][kind].as_array_mut() else { continue };
        for entry in list.iter_mut().filter(|c| c["name"] == collection) {
            if let Some(rules) = entry["properties"]["rules"].as_array_mut() {
                let before = rules.len();
                rules.retain(|r| !names.iter().any(|n| r["name"] == n.as_str()));
                changed |= rules.len() != before;
            }
        }
        let before = list.len();
        list.retain(|c| c["name"] != collection || c["properties"]["rules"].as_array().is_some_and(|r| !r.is_empty()));
        changed |= list.len() != before;
    }
    changed
}

/// The names of the rules in portcullis's collections (each once).
pub fn rule_names(firewall: &Value) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (kind, collection) in [("natRuleCollections", NAT_COLLECTION), ("networkRuleCollections", NETWORK_COLLECTION)] {
        let rules = collections(firewall, kind)
            .filter(|c| c["name"] == collection)
            .flat_map(|c| c["properties"]["rules"].as_array().cloned().unwrap_or_default());
        for rule in rules {
            if let Some(name) = rule["name"].as_str().filter(|n| !names.iter().any(|known| known == n)) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

/// The request id in a firewall rule's name (`jit-<id>-<n>-<port>`).
pub fn request_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("jit-")?;
    let (rest, port) = rest.rsplit_once('-')?;
    let (id, n) = rest.rsplit_once('-')?;
    (port.parse::<u16>().is_ok() && n.parse::<u16>().is_ok() && !id.is_empty()).then_some(id)
}

/// Whether the firewall holds portcullis's rule `name` (in either collection).
pub fn has_rule(firewall: &Value, name: &str) -> bool {
    [("natRuleCollections", NAT_COLLECTION), ("networkRuleCollections", NETWORK_COLLECTION)].iter().any(
        |(kind, collection)| {
            collections(firewall, kind)
                .filter(|c| c["name"] == *collection)
                .flat_map(|c| c["properties"]["rules"].as_array().cloned().unwrap_or_default())
                .any(|r| r["name"] == name)
        },
    )
}

/// The document to write back: the resource as read, without what ARM computes.
pub fn for_put(firewall: &Value) -> Value {
    let mut doc = firewall.clone();
    if let Some(fields) = doc.as_object_mut() {
        fields.remove("etag");
    }
    if let Some(properties) = doc["properties"].as_object_mut() {
        properties.remove("provisioningState");
    }
    doc
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_rules_name_gives_its_request_and_only_a_rules_name_does() {
        assert_eq!(super::request_of("jit-abc-0-22"), Some("abc"));
        assert_eq!(super::request_of("jit-a-b.c-12-3389"), Some("a-b.c"));
        for other in ["jit-abc", "jit-abc-22", "web-0-22", "jit--0-22", "jit-abc-x-22"] {
            assert_eq!(super::request_of(other), None, "{other}");
        }
    }

    use super::*;

    fn firewall() -> Value {
        json!({"name": "fw", "properties": {
            "natRuleCollections": [{"name": "admin-dnat", "properties": {"priority": 100, "action": {"type": "Dnat"},
                "rules": [{"name": "web", "protocols": ["TCP"], "destinationPorts": ["50000"], "translatedPort": "80"}]}}],
            "networkRuleCollections": [],
            "ipConfigurations": [{"properties": {"publicIPAddress": {"id": "/pip/fw"}}}],
        }})
    }

    fn grant(name: &str, mapped_port: u16) -> FirewallGrant {
        FirewallGrant {
            name: name.into(),
            protocol: Protocol::Tcp,
            source: "203.0.113.7".into(),
            public_ip: "198.51.100.1".parse().unwrap(),
            mapped_port,
            private_ip: "10.0.0.4".parse().unwrap(),
            port: 22,
        }
    }

    #[test]
    fn rules_go_into_collections_of_their_own_and_leave_the_admins_alone() {
        let mut fw = firewall();
        let port = free_mapped_port(&fw, &[]).unwrap();
        assert_eq!(port, 50001, "50000 is the admin's");
        let mut ranged = firewall();
        ranged["properties"]["natRuleCollections"][0]["properties"]["rules"][0]["destinationPorts"] =
            json!(["50000-50010"]);
        assert_eq!(free_mapped_port(&ranged, &[50011]), Some(50012), "a range and this edit's own ports are taken");
        add_rules(&mut fw, &[grant("jit-r1-22", port)], 100);
        let nat = &fw["properties"]["natRuleCollections"];
        assert_eq!(nat[0]["properties"]["rules"].as_array().unwrap().len(), 1, "the admin's collection is as it was");
        assert_eq!(nat[1]["name"], NAT_COLLECTION);
        assert_eq!(nat[1]["properties"]["priority"], 101, "100 is taken");
        let rule = &nat[1]["properties"]["rules"][0];
        assert_eq!(
            (rule["destinationPorts"][0].as_str(), rule["translatedPort"].as_str()),
            (Some("50001"), Some("22"))
        );
        assert_eq!(rule["translatedAddress"], "10.0.0.4");
        let network = &fw["properties"]["networkRuleCollections"][0];
        assert_eq!(
            (network["name"].as_str(), network["properties"]["action"]["type"].as_str()),
            (Some(NETWORK_COLLECTION), Some("Allow"))
        );
        assert!(has_rule(&fw, "jit-r1-22"));
        // Again: replaced, not doubled.
        add_rules(&mut fw, &[grant("jit-r1-22", port)], 100);
        assert_eq!(fw["properties"]["natRuleCollections"][1]["properties"]["rules"].as_array().unwrap().len(), 1);
        assert!(remove_rules(&mut fw, &["jit-r1-22".into()]));
        assert!(!has_rule(&fw, "jit-r1-22"));
        assert_eq!(fw["properties"]["natRuleCollections"].as_array().unwrap().len(), 1, "the emptied collection went");
        assert!(!remove_rules(&mut fw, &["jit-r1-22".into()]), "absent is no change");
    }

    #[test]
    fn a_firewall_policy_is_refused_and_what_arm_computes_is_not_written_back() {
        let mut fw = firewall();
        assert!(refusal(&fw).is_none());
        fw["etag"] = json!("W/\"3\"");
        fw["properties"]["provisioningState"] = json!("Succeeded");
        let put = for_put(&fw);
        assert!(put.get("etag").is_none() && put["properties"].get("provisioningState").is_none());
        fw["properties"]["firewallPolicy"] = json!({"id": "/policies/p"});
        assert!(refusal(&fw).unwrap().contains("Firewall Policy"));
        assert_eq!(public_addresses(&firewall()).0, ["/pip/fw"]);
    }
}
