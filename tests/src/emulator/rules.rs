//! Validation of security rule bodies, as ARM does it (codes from ARM's error responses).

use std::net::IpAddr;

use serde_json::Value;

/// A validation failure: ARM's error code and message.
pub type Invalid = (&'static str, String);

fn valid_port_range(range: &str) -> bool {
    let port = |p: &str| p.parse::<u32>().is_ok_and(|n| n <= 65_535);
    match range.split_once('-') {
        _ if range == "*" => true,
        Some((low, high)) => {
            port(low) && port(high) && low.parse::<u32>().unwrap_or(1) <= high.parse::<u32>().unwrap_or(0)
        }
        None => port(range),
    }
}

fn valid_prefix(prefix: &str) -> bool {
    if prefix == "*"
        || (!prefix.is_empty()
            && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
            && prefix.chars().next().is_some_and(|c| c.is_ascii_alphabetic()))
    {
        return true; // "*" or a service tag (VirtualNetwork, Internet, AzureLoadBalancer...)
    }
    match prefix.split_once('/') {
        Some((ip, len)) => ip
            .parse::<IpAddr>()
            .is_ok_and(|ip| len.parse::<u8>().is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 })),
        None => prefix.parse::<IpAddr>().is_ok(),
    }
}

/// A singular/plural field pair (`destinationPortRange`/`destinationPortRanges`): exactly one.
fn one_of<'a>(properties: &'a Value, singular: &str, plural: &str) -> Result<Vec<&'a str>, Invalid> {
    let single = properties[singular].as_str();
    let many: Vec<&str> =
        properties[plural].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    match (single, many.is_empty()) {
        (Some(_), false) => {
            Err(("SecurityRuleParametersInvalid", format!("Specify either {singular} or {plural}, not both.")))
        }
        (Some(one), true) => Ok(vec![one]),
        (None, false) => Ok(many),
        (None, true) => Err((
            "SecurityRuleParametersMissing",
            format!("Security rule parameter {singular} or {plural} is missing."),
        )),
    }
}

/// Checks a rule name and body.
pub fn validate(name: &str, body: &Value) -> Result<(), Invalid> {
    let name_ok = name.len() <= 80
        && name.chars().next().is_some_and(|c| c.is_alphanumeric() || c == '_')
        && name.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_')
        && name.chars().all(|c| c.is_alphanumeric() || "._-".contains(c));
    if !name_ok {
        return Err(("InvalidResourceName", format!("Resource name {name} is invalid.")));
    }
    let properties = &body["properties"];
    if !properties.is_object() {
        return Err(("InvalidRequestFormat", "Cannot parse the request: properties are missing.".into()));
    }
    if properties["description"].as_str().is_some_and(|d| d.chars().count() > 140) {
        return Err(("SecurityRuleDescriptionTooLong", "The description is longer than 140 characters.".into()));
    }
    if !matches!(properties["access"].as_str(), Some("Allow" | "Deny")) {
        return Err(("SecurityRuleInvalidAccess", "Security rule access must be Allow or Deny.".into()));
    }
    if !matches!(properties["direction"].as_str(), Some("Inbound" | "Outbound")) {
        return Err(("SecurityRuleInvalidDirection", "Security rule direction must be Inbound or Outbound.".into()));
    }
    if !matches!(properties["protocol"].as_str(), Some("Tcp" | "Udp" | "Icmp" | "Esp" | "Ah" | "*")) {
        return Err((
            "SecurityRuleInvalidProtocol",
            format!("Security rule protocol {} is invalid.", properties["protocol"]),
        ));
    }
    match properties["priority"].as_u64() {
        Some(100..=4096) => {}
        _ => {
            return Err((
                "SecurityRuleInvalidPriority",
                format!(
                    "Security rule priority {} is invalid: it must be between 100 and 4096.",
                    properties["priority"]
                ),
            ));
        }
    }
    for (singular, plural) in
        [("sourcePortRange", "sourcePortRanges"), ("destinationPortRange", "destinationPortRanges")]
    {
        for range in one_of(properties, singular, plural)? {
            if !valid_port_range(range) {
                return Err((
                    "SecurityRuleInvalidPortRange",
                    format!(
                        "Security rule has invalid Port range. Value provided: {range}. Value should be an integer OR integer range with '-' delimiter. Valid range 0-65535."
                    ),
                ));
            }
        }
    }
    for (singular, plural) in
        [("sourceAddressPrefix", "sourceAddressPrefixes"), ("destinationAddressPrefix", "destinationAddressPrefixes")]
    {
        for prefix in one_of(properties, singular, plural)? {
            if !valid_prefix(prefix) {
                return Err((
                    "SecurityRuleInvalidAddressPrefix",
                    format!("Security rule has invalid Address prefix. Value provided: {prefix}"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body() -> Value {
        json!({"properties": {"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRanges": ["22"], "sourceAddressPrefix": "203.0.113.7/32",
            "destinationAddressPrefix": "10.0.0.4", "access": "Allow", "priority": 110, "direction": "Inbound"}})
    }

    #[test]
    fn a_well_formed_rule_passes_and_each_mistake_has_its_code() {
        assert_eq!(validate("jit-1", &body()), Ok(()));
        type Mutation = fn(&mut Value);
        let cases: Vec<(Mutation, &str)> = vec![
            (|b| b["properties"]["priority"] = json!(99), "SecurityRuleInvalidPriority"),
            (|b| b["properties"]["destinationPortRanges"] = json!(["70000"]), "SecurityRuleInvalidPortRange"),
            (|b| b["properties"]["destinationPortRange"] = json!("22"), "SecurityRuleParametersInvalid"),
            (|b| b["properties"]["sourceAddressPrefix"] = json!("10.0.0.0/33"), "SecurityRuleInvalidAddressPrefix"),
            (|b| b["properties"]["protocol"] = json!("tcp"), "SecurityRuleInvalidProtocol"),
            (
                |b| {
                    b["properties"].as_object_mut().unwrap().remove("destinationPortRanges");
                },
                "SecurityRuleParametersMissing",
            ),
        ];
        for (mutate, code) in cases {
            let mut b = body();
            mutate(&mut b);
            assert_eq!(validate("jit-1", &b).unwrap_err().0, code);
        }
        assert_eq!(validate("-bad", &body()).unwrap_err().0, "InvalidResourceName");
    }
}
