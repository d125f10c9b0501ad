//! Policies as code: `policy apply -f policies.yaml` (a diff first; `--dry-run` stops there;
//! `--prune` also deletes what the file no longer has), `policy get <name>` in the same form
//! `apply` reads, and `policy list`.
//!
//! The file: `policies:` mapping each name to the document `PUT /api/policies/{name}` takes.
//! What the server fills in (defaults, a placement it resolved from the VM) is compared as the
//! server would fill it, so an unchanged file shows no changes.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use serde_json::{Value, json};
use shared::domain::policy::{Fleet, NsgId, Policy, PolicyLimits, ProtectedVm, RawPolicy, Wanted};
use shared::domain::{AccessDuration, PolicyName};

use crate::api::{Api, Failure, encode};
use crate::show::{self, Format};

/// The policies of a YAML or JSON file, by name.
pub fn read(path: &Path) -> Result<BTreeMap<String, Value>, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("reading {}: {e}", path.display())))?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        policies: BTreeMap<String, Value>,
    }
    let file: File = serde_norway::from_str(&text).map_err(|e| {
        Failure::Usage(format!("{}: {e} (expected `policies:` mapping names to policy documents)", path.display()))
    })?;
    Ok(file.policies)
}

/// A stored policy as a file holds it: without what the server derives (its name, the
/// baseline rules, placements it resolved through ARM, the VMs a selector found). One VM is
/// written as `vm`, several as a `vms` list, a selector as `vms: {scope, tag, value}`.
pub fn file_form(stored: &Value) -> Value {
    let mut doc = stored.clone();
    let Some(fields) = doc.as_object_mut() else { return doc };
    for derived in ["name", "baselines", "unprotected", "resolved_at", "revoked", "revoke_remaining", "cancelled"] {
        fields.remove(derived);
    }
    if let Some(selector) = fields.remove("selector") {
        fields.remove("vms");
        let mut written = json!({"scope": selector["scope"]});
        if let Some(tag) = selector.get("tag").filter(|t| t.is_object()) {
            written["tag"] = tag["name"].clone();
            written["value"] = tag["value"].clone();
        }
        fields.insert("vms".into(), written);
        return doc;
    }
    let Some(Value::Array(vms)) = fields.remove("vms") else { return doc };
    // A placement ARM resolved (it has a NIC) is not the admin's: only the id is.
    let entries: Vec<Value> = vms
        .into_iter()
        .map(|vm| match vm.get("nic") {
            Some(_) => json!({"vm": vm["vm"]}),
            None => json!({"vm": vm["vm"], "nsg": vm["nsg"], "private_ip": vm["private_ip"]}),
        })
        .collect();
    match entries.as_slice() {
        [one] => {
            for (key, value) in one.as_object().expect("an object") {
                fields.insert(key.clone(), value.clone());
            }
        }
        _ => {
            let listed =
                entries.iter().map(|e| if e.get("nsg").is_some() { e.clone() } else { e["vm"].clone() }).collect();
            fields.insert("vms".into(), Value::Array(listed));
        }
    }
    doc
}

/// A file's document as the server would store it, checked by the server's own rules.
fn normalize(name: &str, doc: &Value) -> Result<Value, String> {
    let policy_name = PolicyName::parse(name).map_err(|e| e.to_string())?;
    let raw: RawPolicy = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    // The server applies its own limit (its `max_duration` variable, 24 hours by default, at
    // most 7 days): here only the absolute one, and the server's answer says the rest.
    let limits = PolicyLimits { max_duration: AccessDuration::parse("P7D").expect("a duration") };
    let policy = Policy::from_raw(policy_name, raw, limits, |wanted| {
        // What the server resolves through ARM is not part of the file: any placement stands
        // in for a listed VM, and a selector's VMs are left out.
        let unresolved = NsgId::parse(
            "/subscriptions/0/resourceGroups/unresolved/providers/Microsoft.Network/networkSecurityGroups/unresolved",
        )?;
        let vms = match wanted {
            Wanted::Vms(vms) => vms
                .into_iter()
                .map(|vm| ProtectedVm {
                    vm,
                    nsg: unresolved.clone(),
                    private_ip: [0, 0, 0, 0].into(),
                    nic: Some(String::new()),
                })
                .collect(),
            Wanted::Selected(_) => Vec::new(),
        };
        Ok::<_, shared::domain::policy::PolicyError>(Fleet { vms, ..Fleet::default() })
    })
    .map_err(|e| e.to_string())?;
    Ok(file_form(&serde_json::to_value(policy).expect("a policy serialises")))
}

fn compact(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 { format!("{}…", text.chars().take(79).collect::<String>()) } else { text }
}

/// What changes between two documents in file form: fields, and ports by number.
pub fn diff(old: &Value, new: &Value) -> Vec<String> {
    let mut changes = Vec::new();
    let empty = serde_json::Map::new();
    let (old_fields, new_fields) = (old.as_object().unwrap_or(&empty), new.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = old_fields.keys().chain(new_fields.keys()).collect();
    keys.sort();
    keys.dedup();
    for key in keys {
        let (before, after) = (old_fields.get(key), new_fields.get(key));
        if before == after {
            continue;
        }
        if key == "ports" {
            let by_port = |v: Option<&Value>| -> BTreeMap<u64, Value> {
                v.and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|p| (p["port"].as_u64().unwrap_or(0), p.clone()))
                    .collect()
            };
            let (before, after) = (by_port(before), by_port(after));
            for (port, rule) in &after {
                match before.get(port) {
                    None => changes.push(format!("+ port {port}: {}", compact(rule))),
                    Some(old_rule) if old_rule != rule => {
                        for field in ["protocol", "max_duration", "allowed_sources"] {
                            if old_rule[field] != rule[field] {
                                changes.push(format!(
                                    "~ port {port} {field}: {} -> {}",
                                    compact(&old_rule[field]),
                                    compact(&rule[field])
                                ));
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
            for port in before.keys().filter(|p| !after.contains_key(p)) {
                changes.push(format!("- port {port} (removed)"));
            }
            continue;
        }
        match (before, after) {
            (None, Some(after)) => changes.push(format!("+ {key}: {}", compact(after))),
            (Some(_), None) => changes.push(format!("- {key}")),
            (Some(before), Some(after)) => changes.push(format!("~ {key}: {} -> {}", compact(before), compact(after))),
            (None, None) => {}
        }
    }
    changes
}

/// One policy's fate in an apply.
#[derive(serde::Serialize)]
struct Plan {
    name: String,
    /// create, update, unchanged, delete, or keep (on the server only, not pruned).
    change: &'static str,
    changes: Vec<String>,
    /// applied, failed (with `error`), or not_tried (after a failure); absent in a dry run.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `policy apply`.
pub fn apply(api: &Api, format: Format, path: &Path, dry_run: bool, prune: bool, yes: bool) -> Result<(), Failure> {
    let wanted = read(path)?;
    let on_server: BTreeMap<String, Value> = api.call("GET", "/api/policies", None)?["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (p["name"].as_str().unwrap_or_default().to_owned(), p.clone()))
        .collect();
    let mut plans = Vec::new();
    for (name, doc) in &wanted {
        let current = on_server.get(name);
        let normalized =
            normalize(name, doc).map_err(|e| Failure::Usage(format!("{}: policy {name}: {e}", path.display())))?;
        plans.push(match current {
            None => Plan {
                name: name.clone(),
                change: "create",
                changes: diff(&json!({}), &normalized),
                outcome: None,
                error: None,
            },
            Some(current) => {
                let changes = diff(&file_form(current), &normalized);
                let change = if changes.is_empty() { "unchanged" } else { "update" };
                Plan { name: name.clone(), change, changes, outcome: None, error: None }
            }
        });
    }
    for name in on_server.keys().filter(|n| !wanted.contains_key(*n)) {
        let change = if prune { "delete" } else { "keep" };
        plans.push(Plan { name: name.clone(), change, changes: vec![], outcome: None, error: None });
    }
    let deletions = plans.iter().filter(|p| p.change == "delete").count();
    if format == Format::Table {
        print_plan(&plans);
    }
    if !dry_run && deletions > 0 && !yes {
        if !std::io::stdin().is_terminal() {
            return Err(Failure::Usage(format!("--prune would delete {deletions} polic(ies): confirm with --yes")));
        }
        eprint!("Delete {deletions} polic(ies) not in the file? [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            return Err(Failure::Local("nothing applied".into()));
        }
    }
    // Applied in order; after a failure the rest is not tried, and the summary says which
    // policies were applied, which failed and which were not tried.
    let mut failure = None;
    if !dry_run {
        for plan in plans.iter_mut().filter(|p| matches!(p.change, "create" | "update" | "delete")) {
            if failure.is_some() {
                plan.outcome = Some("not_tried");
                continue;
            }
            let path = format!("/api/policies/{}", encode(&plan.name));
            let outcome = match plan.change {
                "delete" => api.call("DELETE", &path, None),
                _ => api.call("PUT", &path, Some(&wanted[&plan.name])),
            };
            match outcome {
                Ok(_) => plan.outcome = Some("applied"),
                Err(error) => {
                    plan.outcome = Some("failed");
                    plan.error = Some(error.to_string());
                    failure = Some(error);
                }
            }
        }
    }
    if format == Format::Table && failure.is_some() {
        for plan in plans.iter().filter(|p| p.outcome.is_some()) {
            let error = plan.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            println!("{} {}{error}", plan.outcome.unwrap_or_default(), plan.name);
        }
    }
    let summary = json!({"dry_run": dry_run, "policies": plans});
    if let Some(failure) = failure {
        show::machine(format, &summary);
        return Err(failure);
    }
    if !show::machine(format, &summary) {
        let changed = plans.iter().filter(|p| matches!(p.change, "create" | "update" | "delete")).count();
        println!(
            "{}",
            match (dry_run, changed) {
                (_, 0) => "No changes.".to_owned(),
                (true, n) => format!("Dry run: {n} polic(ies) would change; nothing applied."),
                (false, n) => format!("Applied: {n} polic(ies) changed."),
            }
        );
    }
    Ok(())
}

fn print_plan(plans: &[Plan]) {
    for plan in plans {
        let (mark, note) = match plan.change {
            "create" => ("+", "(new)"),
            "update" => ("~", ""),
            "unchanged" => ("=", "(unchanged)"),
            "delete" => ("-", "(deleted: not in the file)"),
            _ => (" ", "(on the server, not in the file: kept; --prune deletes it)"),
        };
        println!("{mark} {} {note}", plan.name);
        for change in &plan.changes {
            println!("    {change}");
        }
    }
}

/// `policy get <name>`: with `-o yaml` or `-o json`, a file `apply` takes back unchanged.
pub fn get(api: &Api, format: Format, name: &str) -> Result<(), Failure> {
    let stored = api.call("GET", &format!("/api/policies/{}", encode(name)), None)?;
    let file = json!({"policies": {name: file_form(&stored)}});
    if !show::machine(format, &file) {
        print!("{}", serde_norway::to_string(&file).expect("JSON is YAML"));
    }
    Ok(())
}

/// `policy list`.
pub fn list(api: &Api, format: Format) -> Result<(), Failure> {
    let answer = api.call("GET", "/api/policies", None)?;
    if show::machine(format, &answer) {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answer["policies"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ports: Vec<String> =
                p["ports"].as_array().into_iter().flatten().map(|r| r["port"].to_string()).collect();
            let approval = match p["approval"]["mode"].as_str() {
                Some("manual") => format!(
                    "{} of {}",
                    p["approval"]["required"],
                    p["approval"]["approvers"].as_array().map_or(0, Vec::len)
                ),
                other => other.unwrap_or("-").to_owned(),
            };
            vec![
                p["name"].as_str().unwrap_or_default().to_owned(),
                match p["vms"].as_array().map(Vec::as_slice) {
                    _ if p["selector"].is_object() => {
                        format!("{} VMs by selector", p["vms"].as_array().map_or(0, Vec::len))
                    }
                    Some([one]) => {
                        one["vm"].as_str().unwrap_or_default().rsplit('/').next().unwrap_or_default().to_owned()
                    }
                    Some(many) => format!("{} VMs", many.len()),
                    None => String::new(),
                },
                ports.join(","),
                approval,
                if p["enabled"] == json!(false) { "disabled".into() } else { "enabled".into() },
            ]
        })
        .collect();
    println!("{}", show::table(&["NAME", "VM", "PORTS", "APPROVAL", "STATE"], &rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_diff_names_fields_and_ports() {
        let old = json!({"enabled": true, "ports": [{"port": 22, "max_duration": "PT3H"}, {"port": 3389, "max_duration": "PT1H"}]});
        let new = json!({"enabled": false, "ports": [{"port": 22, "max_duration": "PT1H"}, {"port": 5985, "max_duration": "PT1H"}]});
        assert_eq!(
            diff(&old, &new),
            [
                "~ enabled: true -> false",
                "~ port 22 max_duration: \"PT3H\" -> \"PT1H\"",
                "+ port 5985: {\"max_duration\":\"PT1H\",\"port\":5985}",
                "- port 3389 (removed)"
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn a_stored_policy_in_file_form_keeps_only_what_an_admin_writes() {
        let stored = json!({"name": "x", "vms": [{"vm": "v", "nsg": "n", "private_ip": "10.0.0.4", "nic": "i"}],
            "resolved_at": "2026-01-01T00:00:00Z", "baselines": [{}], "enabled": true});
        assert_eq!(file_form(&stored), json!({"vm": "v", "enabled": true}));
        let given = json!({"name": "x", "vms": [{"vm": "v", "nsg": "n", "private_ip": "10.0.0.4"}]});
        assert_eq!(file_form(&given), json!({"vm": "v", "nsg": "n", "private_ip": "10.0.0.4"}));
        let fleet = json!({"vms": [{"vm": "a", "nsg": "n", "private_ip": "10.0.0.4", "nic": "i"},
            {"vm": "b", "nsg": "n", "private_ip": "10.0.0.5"}]});
        assert_eq!(file_form(&fleet), json!({"vms": ["a", {"vm": "b", "nsg": "n", "private_ip": "10.0.0.5"}]}));
        let tagged = json!({"vms": [{"vm": "a", "nsg": "n", "private_ip": "10.0.0.4", "nic": "i"}],
            "selector": {"scope": "/subscriptions/s", "tag": {"name": "jit", "value": "ssh"}}, "unprotected": [{}]});
        assert_eq!(file_form(&tagged), json!({"vms": {"scope": "/subscriptions/s", "tag": "jit", "value": "ssh"}}));
    }
}
