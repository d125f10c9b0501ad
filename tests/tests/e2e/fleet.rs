//! Fleets (issue 15): one policy over many VMs, named by a list, a resource group or a tag;
//! one deny rule per NSG naming every VM behind it; one request for several VMs, opened with
//! one rule per NSG and closed whole; a refused rule fails the whole request closed.

use std::time::Duration;

use portcullis_host::emulator::{Fault, FaultKind, NsgPlacement, SUBSCRIPTION};
use serde_json::{Value, json};

use crate::support::*;

const GROUP: &str = "fleet-rg";

fn nsg_id(name: &str) -> String {
    format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Network/networkSecurityGroups/{name}"
    )
}

/// Twenty VMs in `fleet-rg` behind three subnet NSGs (8, 7 and 5 VMs), and one VM with no
/// NSG at all. Answers the VMs' ids and addresses by NSG name.
fn twenty_vms_behind_three_nsgs(world: &World) -> Vec<(String, Vec<(String, String)>)> {
    let emulator = &world.local.emulator;
    let mut fleet = Vec::new();
    for (nsg, count, net) in [("web-nsg", 8, 1), ("app-nsg", 7, 2), ("db-nsg", 5, 3)] {
        let id = nsg_id(nsg);
        emulator.add_nsg(&id);
        let vms = (1..=count)
            .map(|n| {
                let ip = format!("10.{net}.0.{n}");
                let vm = emulator.add_vm_in(
                    GROUP,
                    &format!("{nsg}-vm{n}"),
                    &ip,
                    NsgPlacement::Subnet(&id),
                    &[("jit", "ssh")],
                );
                (vm, ip)
            })
            .collect();
        fleet.push((id, vms));
    }
    emulator.add_vm_in(GROUP, "bare-vm", "10.9.0.1", NsgPlacement::None, &[("jit", "ssh")]);
    fleet
}

fn fleet_policy(selector: Value) -> Value {
    let mut policy = json!({
        "ports": [{"port": 22, "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8"]}],
        "approval": {"mode": "auto"},
        "quotas": {"per_requester": 5, "per_vm": 5},
    });
    policy.as_object_mut().unwrap().extend(selector.as_object().unwrap().clone());
    policy
}

fn rules_named(world: &World, nsg: &str, prefix: &str) -> Vec<Value> {
    world.local.emulator.rules(nsg).into_iter().filter(|r| r["name"].as_str().unwrap().starts_with(prefix)).collect()
}

/// The addresses a rule names, sorted.
fn destinations(rule: &Value) -> Vec<String> {
    let p = &rule["properties"];
    let mut addresses: Vec<String> = match p["destinationAddressPrefix"].as_str() {
        Some(one) => vec![one.to_owned()],
        None => {
            p["destinationAddressPrefixes"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect()
        }
    };
    addresses.sort();
    addresses
}

fn sorted_ips(vms: &[(String, String)]) -> Vec<String> {
    let mut ips: Vec<String> = vms.iter().map(|(_, ip)| ip.clone()).collect();
    ips.sort();
    ips
}

/// Writes (PUT or DELETE) of rules named `prefix...` among the ARM calls so far.
fn rule_writes(world: &World, method: &str, prefix: &str) -> usize {
    let needle = format!("/securityRules/{prefix}");
    world.arm_calls().iter().filter(|c| c.starts_with(method) && c.contains(&needle)).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resource_group_policy_puts_one_deny_rule_per_nsg_and_a_twenty_vm_grant_costs_one_write_per_nsg() {
    let world = World::start().await;
    let fleet = twenty_vms_behind_three_nsgs(&world);
    world.local.emulator.set_page_size(7);
    let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}");
    let (status, policy) = world.put_policy("fleet", &fleet_policy(json!({"resource_group": group}))).await;
    assert_eq!(status, 201, "{policy}");
    assert_eq!(policy["vms"].as_array().unwrap().len(), 20, "{policy}");
    assert_eq!(policy["selector"]["scope"], group);
    let unprotected = policy["unprotected"].as_array().unwrap();
    assert_eq!(unprotected.len(), 1, "{policy}");
    assert!(unprotected[0]["vm"].as_str().unwrap().ends_with("/bare-vm"));
    assert!(unprotected[0]["reason"].as_str().unwrap().contains("no network security group"), "{policy}");
    assert_eq!(policy["baselines"].as_array().unwrap().len(), 3, "{policy}");

    // One deny rule per NSG, naming exactly the VMs behind it.
    for (nsg, vms) in &fleet {
        let denies = rules_named(&world, nsg, "jit-deny-");
        assert_eq!(denies.len(), 1, "{nsg}: {denies:?}");
        assert_eq!(destinations(&denies[0]), sorted_ips(vms), "{nsg}");
        assert_eq!(denies[0]["properties"]["access"], "Deny");
    }
    // What GET shows is what was stored.
    let (status, shown) = world.call("GET", "/api/policies/fleet", Some(ADMIN), None).await;
    assert_eq!((status, &shown["vms"], &shown["unprotected"]), (200, &policy["vms"], &policy["unprotected"]));

    // One request for all twenty: one allow rule per NSG, each naming its VMs.
    world.local.emulator.clear_calls();
    let all: Vec<&str> = fleet.iter().flat_map(|(_, vms)| vms.iter().map(|(vm, _)| vm.as_str())).collect();
    let ask = json!({"policy": "fleet", "vms": all, "ports": [22], "duration": "PT1H", "justification": "INC-20"});
    let (status, grant) = world.request(ALICE, &ask).await;
    assert_eq!((status, grant["state"].as_str()), (201, Some("active")), "{grant}");
    assert_eq!(grant["rules"].as_array().unwrap().len(), 3, "{grant}");
    assert_eq!(rule_writes(&world, "PUT", "jit-"), 3, "one PUT per NSG: {:#?}", world.arm_calls());
    let opened = world.arm_calls().len();
    for (nsg, vms) in &fleet {
        let allows: Vec<Value> =
            rules_named(&world, nsg, "jit-").into_iter().filter(|r| r["properties"]["access"] == "Allow").collect();
        assert_eq!(allows.len(), 1, "{nsg}");
        assert_eq!(destinations(&allows[0]), sorted_ips(vms), "{nsg}");
    }

    // It ends whole at expiry: one DELETE per NSG.
    world.local.emulator.clear_calls();
    world.advance_minutes(61);
    world.tick().await;
    let ended = world.get_request(&id(&grant)).await;
    assert_eq!(ended["state"], "expired", "{ended}");
    assert_eq!(rule_writes(&world, "DELETE", "jit-"), 3, "one DELETE per NSG: {:#?}", world.arm_calls());
    for (nsg, _) in &fleet {
        let left: Vec<Value> =
            rules_named(&world, nsg, "jit-").into_iter().filter(|r| r["properties"]["access"] == "Allow").collect();
        assert!(left.is_empty(), "{nsg}: {left:?}");
        assert_eq!(rules_named(&world, nsg, "jit-deny-").len(), 1, "the baseline stays");
    }
    println!("ARM calls for a 20-VM grant over 3 NSGs: open {opened}, close {}", world.arm_calls().len());
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_name_vms_the_policy_protects_and_a_tag_selects_only_tagged_vms() {
    let world = World::start().await;
    let fleet = twenty_vms_behind_three_nsgs(&world);
    let emulator = &world.local.emulator;
    let web = &fleet[0].0;
    let untagged = emulator.add_vm_in(GROUP, "untagged", "10.1.0.99", NsgPlacement::Subnet(web), &[("jit", "rdp")]);
    let selector = json!({"vms": {"scope": format!("/subscriptions/{SUBSCRIPTION}"), "tag": "jit", "value": "ssh"}});
    let (status, policy) = world.put_policy("tagged", &fleet_policy(selector)).await;
    assert_eq!(status, 201, "{policy}");
    let protected: Vec<&str> = policy["vms"].as_array().unwrap().iter().map(|v| v["vm"].as_str().unwrap()).collect();
    assert_eq!(protected.len(), 20);
    assert!(!protected.contains(&untagged.as_str()));
    // The untagged VM's address is not behind the deny rule of its NSG.
    assert!(!destinations(&rules_named(&world, web, "jit-deny-")[0]).contains(&"10.1.0.99".to_owned()));

    let ask =
        |vm: Value| json!({"policy": "tagged", "vm": vm, "ports": [22], "duration": "PT1H", "justification": "x"});
    let before = world.rules_everywhere(&fleet);
    for (vm, status, code) in [
        (Value::Null, 400, "vm_required"),
        (json!(untagged), 422, "vm_not_in_policy"),
        (json!("vm-1"), 400, "invalid_vm"),
    ] {
        let (got, body) = world.request(ALICE, &ask(vm.clone())).await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{vm}: {body}");
    }
    let bare_vm = format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Compute/virtualMachines/bare-vm"
    );
    let (status, body) = world.request(ALICE, &ask(json!(bare_vm))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("vm_not_in_policy")));
    assert!(body["error"]["message"].as_str().unwrap().contains("no network security group"), "{body}");
    let twice = json!({"policy": "tagged", "vms": [protected[0], protected[0].to_uppercase()], "ports": [22], "duration": "PT1H", "justification": "x"});
    assert_eq!(world.request(ALICE, &twice).await.1["error"]["code"], "invalid_vms");
    let mixed = json!({"policy": "tagged", "vms": [{"vm": protected[0], "ports": [3389]}], "ports": [22], "duration": "PT1H", "justification": "x"});
    assert_eq!(world.request(ALICE, &mixed).await.1["error"]["code"], "mixed_ports");
    let elsewhere = json!({"policy": "tagged", "vms": [{"vm": protected[0], "policy": "other"}], "ports": [22], "duration": "PT1H", "justification": "x"});
    assert_eq!(world.request(ALICE, &elsewhere).await.1["error"]["code"], "one_policy_per_request");
    let same = json!({"policy": "tagged", "vms": [{"vm": protected[1], "policy": "tagged", "ports": [22]}], "ports": [22], "duration": "PT1H", "justification": "x"});
    let (status, body) = world.request(CAROL, &same).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    world.decide(&id(&body), "revoke", ADMIN).await;
    assert_eq!(world.rules_everywhere(&fleet), before, "refused requests change nothing");

    // One VM of the fleet: one rule, on its NSG, for its address only.
    let (status, grant) = world.request(ALICE, &ask(json!(fleet[2].1[0].0))).await;
    assert_eq!((status, grant["state"].as_str()), (201, Some("active")), "{grant}");
    let allows: Vec<Value> =
        rules_named(&world, &fleet[2].0, "jit-").into_iter().filter(|r| r["properties"]["access"] == "Allow").collect();
    assert_eq!(allows.len(), 1);
    assert_eq!(destinations(&allows[0]), [fleet[2].1[0].1.clone()]);
    assert!(rules_named(&world, &fleet[0].0, "jit-").iter().all(|r| r["properties"]["access"] == "Deny"));

    // A revoke ends the whole request.
    let both = json!({"policy": "tagged", "vms": [fleet[0].1[1].0, fleet[1].1[1].0], "ports": [22], "duration": "PT1H", "justification": "x"});
    let (_, pair) = world.request(ALICE, &both).await;
    assert_eq!(pair["rules"].as_array().unwrap().len(), 2, "{pair}");
    let (status, revoked) = world.decide(&id(&pair), "revoke", ADMIN).await;
    assert_eq!((status, revoked["state"].as_str()), (200, Some("revoked")), "{revoked}");
    for (nsg, _) in &fleet[..2] {
        assert!(rules_named(&world, nsg, "jit-").iter().all(|r| r["properties"]["access"] == "Deny"), "{nsg}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_refused_on_one_nsg_fails_the_request_closed_on_every_nsg() {
    let world = World::start().await;
    let fleet = twenty_vms_behind_three_nsgs(&world);
    let listed: Vec<Value> = fleet.iter().map(|(_, vms)| json!(vms[0].0)).collect();
    let (status, policy) = world.put_policy("listed", &fleet_policy(json!({"vms": listed}))).await;
    assert_eq!(status, 201, "{policy}");
    assert_eq!(policy["baselines"].as_array().unwrap().len(), 3);
    // Each NSG's deny rule names only its listed VM.
    for (nsg, vms) in &fleet {
        assert_eq!(destinations(&rules_named(&world, nsg, "jit-deny-")[0]), [vms[0].1.clone()]);
    }
    // The third NSG refuses the allow rule for good; the first two accepted theirs.
    let mut refused = Fault::new("PUT", 400, "SecurityRuleInvalidAddressPrefix", 1);
    refused.path_contains = Some("db-nsg/securityRules/jit-".into());
    world.inject(refused);
    let ask = json!({"policy": "listed", "vms": listed, "ports": [22], "duration": "PT1H", "justification": "x"});
    let (status, body) = world.request(ALICE, &ask).await;
    assert!(status >= 400 || body["state"] == "failed", "{status} {body}");
    let requests = world.call("GET", "/api/requests", Some(ADMIN), None).await.1;
    let request = &requests["requests"][0];
    assert_eq!(request["state"], "failed", "{request}");
    let why = request["last_error"].as_str().unwrap();
    assert!(
        why.contains("refused") && why.contains("db-nsg") && why.contains("db-nsg-vm1"),
        "names the NSG and VM: {request}"
    );
    for (nsg, _) in &fleet {
        let allows: Vec<Value> =
            rules_named(&world, nsg, "jit-").into_iter().filter(|r| r["properties"]["access"] == "Allow").collect();
        assert!(allows.is_empty(), "{nsg} kept {allows:?}");
    }
    let events = world.audit("?action=rule.deleted").await;
    assert!(events.len() >= 3, "each NSG's rule is deleted and recorded: {events:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_restores_each_nsgs_deny_rule_and_removes_ownerless_rules_on_every_nsg() {
    let world = World::start().await;
    let fleet = twenty_vms_behind_three_nsgs(&world);
    let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}");
    assert_eq!(world.put_policy("fleet", &fleet_policy(json!({"resource_group": group}))).await.0, 201);
    let (app, app_vms) = &fleet[1];
    assert!(world.local.emulator.remove_rule(app, "jit-deny-fleet"));
    world.local.emulator.seed_rule(
        &fleet[2].0,
        "jit-00000000-0000-0000-0000-000000000000",
        json!({"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "22", "sourceAddressPrefix": "*",
            "destinationAddressPrefix": "10.3.0.1", "access": "Allow", "priority": 150, "direction": "Inbound",
            "description": "portcullis JIT left behind"}),
    );
    // A rule with no request record is a suspect at the first scan and removed at the next.
    for _ in 0..2 {
        world.advance_minutes(16);
        world.tick().await;
    }
    let restored = rules_named(&world, app, "jit-deny-");
    assert_eq!(restored.len(), 1, "the deny rule of {app} is back");
    assert_eq!(destinations(&restored[0]), sorted_ips(app_vms));
    assert!(rules_named(&world, &fleet[2].0, "jit-0").is_empty(), "{:?}", world.local.emulator.rules(&fleet[2].0));
    let (_, drift) = world.call("GET", "/api/drift", Some(ADMIN), None).await;
    let scan = &drift["scans"][0];
    assert_eq!(scan["nsgs"].as_array().unwrap().len(), 3, "{scan}");
}

impl World {
    /// Every rule on the fleet's NSGs.
    fn rules_everywhere(&self, fleet: &[(String, Vec<(String, String)>)]) -> Vec<Value> {
        fleet.iter().flat_map(|(nsg, _)| self.local.emulator.rules(nsg)).collect()
    }
}

/// A policy over one VM behind each of the three NSGs; answers the NSGs and the policy's VMs.
async fn one_vm_per_nsg(world: &World) -> (Vec<String>, Vec<Value>) {
    let fleet = twenty_vms_behind_three_nsgs(world);
    let listed: Vec<Value> = fleet.iter().map(|(_, vms)| json!(vms[0].0)).collect();
    let (status, policy) = world.put_policy("listed", &fleet_policy(json!({"vms": listed}))).await;
    assert_eq!(status, 201, "{policy}");
    (fleet.into_iter().map(|(nsg, _)| nsg).collect(), listed)
}

fn allow_rules_on(world: &World, nsgs: &[String]) -> Vec<Value> {
    nsgs.iter()
        .flat_map(|nsg| rules_named(world, nsg, "jit-"))
        .filter(|r| r["properties"]["access"] == "Allow")
        .collect()
}

/// The trouble `kind` for the next `times` calls of `method` on grant rules of one NSG.
fn trouble_on(world: &World, nsg: &str, method: &'static str, kind: FaultKind, times: u32) {
    let mut fault = Fault::of(Some(method), kind, times);
    let name = nsg.rsplit('/').next().unwrap();
    fault.path_contains = Some(format!("{name}/securityRules/jit-"));
    world.inject(fault);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoke_while_the_second_nsgs_put_is_in_flight_leaves_no_rule_on_any_nsg() {
    let world = World::start().await;
    let (nsgs, vms) = one_vm_per_nsg(&world).await;
    // The first NSG's rule lands at once; the second's PUT is slow.
    trouble_on(&world, &nsgs[1], "PUT", FaultKind::Slow(Duration::from_secs(2)), 1);
    let ask = json!({"policy": "listed", "vms": vms, "ports": [22], "duration": "PT1H", "justification": "x"});
    let create = world.request(ALICE, &ask);
    let revoke = async {
        // Once the first rule is on its NSG, the request is approved and mid-open.
        for _ in 0..200 {
            if !allow_rules_on(&world, &nsgs[..1]).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, list) = world.call("GET", "/api/requests?mine=true", Some(ALICE), None).await;
        let id = list["requests"][0]["id"].as_str().unwrap().to_owned();
        let answer = world.call("POST", &format!("/api/requests/{id}/revoke"), Some(ALICE), Some("{}")).await;
        (id, answer)
    };
    let ((created_status, created), (id, (revoked_status, revoked))) = tokio::join!(create, revoke);
    assert_eq!((created_status, revoked_status), (201, 200), "{created} {revoked}");
    assert!(allow_rules_on(&world, &nsgs).is_empty(), "{:?}", allow_rules_on(&world, &nsgs));
    assert_eq!(world.get_request(&id).await["state"], "revoked");
    // Nothing brings any of them back later either.
    world.advance_minutes(6);
    world.tick().await;
    assert!(allow_rules_on(&world, &nsgs).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_that_fails_on_one_nsg_keeps_the_grant_closing_until_every_rule_is_gone() {
    let world = World::start().await;
    let (nsgs, vms) = one_vm_per_nsg(&world).await;
    let ask = json!({"policy": "listed", "vms": vms, "ports": [22], "duration": "PT10M", "justification": "x"});
    let (_, grant) = world.request(ALICE, &ask).await;
    assert_eq!(allow_rules_on(&world, &nsgs).len(), 3);
    // The second NSG's DELETE fails at expiry (ARM answers 500 twice: the client retries).
    trouble_on(&world, &nsgs[1], "DELETE", FaultKind::Error { status: 500, code: "InternalServerError" }, 6);
    world.advance_minutes(11);
    world.tick().await;
    let closing = world.get_request(&id(&grant)).await;
    assert_eq!(closing["state"], "revoking", "{closing}");
    let left = allow_rules_on(&world, &nsgs);
    assert_eq!(left.len(), 1, "every other NSG's rule went: {left:?}");
    assert_eq!(
        rules_named(&world, &nsgs[1], "jit-").iter().filter(|r| r["properties"]["access"] == "Allow").count(),
        1
    );
    world.local.emulator.clear_faults();
    world.advance_minutes(1);
    world.tick().await;
    assert_eq!(world.get_request(&id(&grant)).await["state"], "expired");
    assert!(allow_rules_on(&world, &nsgs).is_empty(), "{:?}", allow_rules_on(&world, &nsgs));
}

/// ARM calls to open and to close one request for 1, 20 and 200 VMs (behind 1, 3 and 10
/// NSGs): writes are one per NSG each way, whatever the number of VMs. Prints the figures
/// (`-- --nocapture`), which README quotes.
#[tokio::test(flavor = "multi_thread")]
async fn arm_writes_per_open_and_close_follow_nsgs_not_vms() {
    for (vms, nsgs) in [(1, 1), (20, 3), (200, 10)] {
        let world = World::start().await;
        let emulator = &world.local.emulator;
        let group = format!("size-{vms}");
        let mut ids = Vec::new();
        for n in 0..vms {
            let nsg = format!(
                "/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.Network/networkSecurityGroups/nsg-{}",
                n % nsgs
            );
            if n < nsgs {
                emulator.add_nsg(&nsg);
            }
            let ip = format!("10.{}.{}.{}", n % nsgs, n / 250, n % 250 + 1);
            ids.push(emulator.add_vm_in(&group, &format!("vm-{n}"), &ip, NsgPlacement::Subnet(&nsg), &[]));
        }
        let scope = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}");
        let (status, policy) = world.put_policy("sized", &fleet_policy(json!({"resource_group": scope}))).await;
        assert_eq!((status, policy["vms"].as_array().map(Vec::len)), (201, Some(vms)), "{policy}");
        emulator.clear_calls();
        let ask = json!({"policy": "sized", "vms": ids, "ports": [22], "duration": "PT10M", "justification": "x"});
        let (status, grant) = world.request(ALICE, &ask).await;
        assert_eq!((status, grant["state"].as_str()), (201, Some("active")), "{grant}");
        let (open_calls, open_writes) = (world.arm_calls().len(), rule_writes(&world, "PUT", "jit-"));
        emulator.clear_calls();
        let (status, _) = world.decide(&id(&grant), "revoke", ADMIN).await;
        assert_eq!(status, 200);
        let (close_calls, close_writes) = (world.arm_calls().len(), rule_writes(&world, "DELETE", "jit-"));
        assert_eq!((open_writes, close_writes), (nsgs, nsgs), "one write per NSG each way");
        println!(
            "{vms} VMs behind {nsgs} NSGs: open {open_writes} writes ({open_calls} ARM calls with polling), close {close_writes} writes ({close_calls} calls)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweep_refreshes_a_tag_so_joiners_get_the_deny_rule_and_leavers_lose_it_and_their_grants() {
    let world = World::start().await;
    let fleet = twenty_vms_behind_three_nsgs(&world);
    let emulator = &world.local.emulator;
    let mut policy =
        fleet_policy(json!({"vms": {"scope": format!("/subscriptions/{SUBSCRIPTION}"), "tag": "jit", "value": "ssh"}}));
    policy["leavers"] = json!("end");
    assert_eq!(world.put_policy("tagged", &policy).await.0, 201);
    let (web, web_vms) = &fleet[0];
    let (db, db_vms) = &fleet[2];
    // A grant on a VM that will leave, and one on a VM that stays.
    let leaver = &db_vms[0].0;
    let ask = |vm: &str| json!({"policy": "tagged", "vm": vm, "ports": [22], "duration": "PT3H", "justification": "x"});
    let (_, leaving) = world.request(ALICE, &ask(leaver)).await;
    let (_, staying) = world.request(CAROL, &ask(&web_vms[0].0)).await;
    assert_eq!((leaving["state"].as_str(), staying["state"].as_str()), (Some("active"), Some("active")));

    // Every VM behind db-nsg leaves the tag; a new VM joins behind web-nsg.
    for (vm, _) in db_vms {
        emulator.set_tags(vm, &[("jit", "off")]);
    }
    let joiner = emulator.add_vm_in(GROUP, "joiner", "10.1.0.50", NsgPlacement::Subnet(web), &[("jit", "ssh")]);
    // Within the hour, nothing changes.
    world.advance_minutes(30);
    world.tick().await;
    assert_eq!(world.request(ALICE, &ask(&joiner)).await.1["error"]["code"], "vm_not_in_policy");
    world.advance_minutes(31);
    world.tick().await;

    let (_, refreshed) = world.call("GET", "/api/policies/tagged", Some(ADMIN), None).await;
    let vms: Vec<&str> = refreshed["vms"].as_array().unwrap().iter().map(|v| v["vm"].as_str().unwrap()).collect();
    assert_eq!(vms.len(), 20 - 5 + 1, "{refreshed}");
    assert!(vms.contains(&joiner.as_str()) && !vms.contains(&leaver.as_str()));
    let mut expected = sorted_ips(web_vms);
    expected.push("10.1.0.50".into());
    expected.sort();
    assert_eq!(destinations(&rules_named(&world, web, "jit-deny-")[0]), expected, "the joiner is behind the deny rule");
    assert!(rules_named(&world, db, "jit-deny-").is_empty(), "no VM of the policy is behind {db} any more");
    assert_eq!(refreshed["baselines"].as_array().unwrap().len(), 2, "{refreshed}");
    // `leavers: end`: the grant on the leaver ended, with its rule; the other runs on.
    let ended = world.get_request(&id(&leaving)).await;
    assert_eq!(ended["state"], "revoked", "{ended}");
    assert!(ended["ended"]["reason"].as_str().unwrap().contains("left the policy"), "{ended}");
    assert!(rules_named(&world, db, "jit-").is_empty());
    assert_eq!(world.get_request(&id(&staying)).await["state"], "active");
    let refresh = world.audit("action=policy.refreshed").await;
    assert_eq!(refresh.len(), 1, "{refresh:#?}");
    assert_eq!(refresh[0]["details"]["left"].as_array().unwrap().len(), 5);
    // The joiner may be asked for now.
    let (status, joined) = world.request(ALICE, &ask(&joiner)).await;
    assert_eq!((status, joined["state"].as_str()), (201, Some("active")), "{joined}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_that_fails_on_one_nsg_for_now_leaves_no_rule_open_until_every_nsg_takes_its_own() {
    let world = World::start().await;
    let (nsgs, vms) = one_vm_per_nsg(&world).await;
    // The third NSG answers 503 to every PUT for now (the client's own retries included).
    trouble_on(&world, &nsgs[2], "PUT", FaultKind::Error { status: 503, code: "ServiceUnavailable" }, 100);
    let ask = json!({"policy": "listed", "vms": vms, "ports": [22], "duration": "PT1H", "justification": "x"});
    let (status, pending) = world.request(ALICE, &ask).await;
    assert_eq!((status, pending["state"].as_str()), (201, Some("approved")), "{pending}");
    assert!(
        allow_rules_on(&world, &nsgs).is_empty(),
        "no rule stays open without an end: {:?}",
        allow_rules_on(&world, &nsgs)
    );
    let reasons = world.audit("action=rule.deleted").await;
    assert!(reasons.iter().any(|e| e["details"]["reason"] == "the open failed part-way"), "{reasons:#?}");
    // ARM recovers: the sweep opens all three, and only then is the grant active.
    world.local.emulator.clear_faults();
    world.advance_minutes(2);
    world.tick().await;
    let active = world.get_request(&id(&pending)).await;
    assert_eq!(active["state"], "active", "{active}");
    assert_eq!(allow_rules_on(&world, &nsgs).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_opens_at_most_ten_nsgs() {
    let world = World::start().await;
    let emulator = &world.local.emulator;
    let mut vms = Vec::new();
    for n in 0..11 {
        let nsg = nsg_id(&format!("own-{n}"));
        emulator.add_nsg(&nsg);
        vms.push(emulator.add_vm_in(
            GROUP,
            &format!("own-vm{n}"),
            &format!("10.8.{n}.4"),
            NsgPlacement::Nic(&nsg),
            &[],
        ));
    }
    assert_eq!(world.put_policy("spread", &fleet_policy(json!({"vms": vms}))).await.0, 201);
    let ask = |vms: &[String]| json!({"policy": "spread", "vms": vms, "ports": [22], "duration": "PT1H", "justification": "x"});
    let (status, body) = world.request(ALICE, &ask(&vms)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("too_many_nsgs")), "{body}");
    let (status, body) = world.request(ALICE, &ask(&vms[..10])).await;
    assert_eq!((status, body["rules"].as_array().map(Vec::len)), (201, Some(10)), "{body}");
}

/// As [`one_vm_per_nsg`], the policy reaching its VMs through firewall `hub-fw`; answers the
/// firewall's id too.
async fn one_vm_per_nsg_behind_a_firewall(world: &World) -> (Vec<String>, Vec<Value>, String) {
    let (nsgs, vms) = one_vm_per_nsg(world).await;
    let firewall = world.local.emulator.add_firewall("hub-fw", "198.51.100.10", false);
    let mut policy = fleet_policy(json!({"vms": vms}));
    policy["firewall"] = json!(firewall);
    let (status, stored) = world.put_policy("listed", &policy).await;
    assert_eq!((status, stored["firewall"].as_str()), (200, Some(firewall.as_str())), "{stored}");
    (nsgs, vms, firewall)
}

/// Rules of portcullis's collection `kind` (`natRuleCollections`, `networkRuleCollections`) on
/// a firewall, by name.
fn firewall_rules(world: &World, firewall: &str, kind: &str) -> Vec<Value> {
    let doc = world.local.emulator.firewall(firewall).expect("the firewall exists");
    doc["properties"][kind]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"].as_str().unwrap().starts_with("portcullis-jit"))
        .flat_map(|c| c["properties"]["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_through_an_azure_firewall_gets_a_dnat_and_a_network_rule_that_end_with_it() {
    let world = World::start().await;
    let (nsgs, vms, firewall) = one_vm_per_nsg_behind_a_firewall(&world).await;
    let emulator = &world.local.emulator;
    let (_, stored) = world.call("GET", "/api/policies/listed", Some(ADMIN), None).await;
    assert_eq!(stored["firewall"].as_str(), Some(firewall.as_str()), "{stored}");

    emulator.clear_calls();
    let ask = json!({"policy": "listed", "vms": &vms[..2], "ports": [22], "duration": "PT10M", "justification": "x"});
    let (status, grant) = world.request(ALICE, &ask).await;
    assert_eq!((status, grant["state"].as_str()), (201, Some("active")), "{grant}");
    let fw_writes = world.arm_calls().iter().filter(|c| c.starts_with("PUT") && c.contains("/azureFirewalls/")).count();
    assert_eq!(fw_writes, 1, "one write of the firewall for both VMs: {:#?}", world.arm_calls());
    // Where to connect: the firewall's public address, a mapped port per VM.
    let mapped = grant["firewall"]["mapped"].as_array().unwrap();
    assert_eq!(mapped.len(), 2, "{grant}");
    let mut ports: Vec<u64> = mapped.iter().map(|m| m["mapped_port"].as_u64().unwrap()).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 2, "each VM its own mapped port");
    assert!(mapped.iter().all(|m| m["public_ip"] == "198.51.100.10" && m["port"] == 22));
    let nat = firewall_rules(&world, &firewall, "natRuleCollections");
    assert_eq!(nat.len(), 2, "{nat:?}");
    for rule in &nat {
        assert_eq!(rule["sourceAddresses"], json!(["127.0.0.1/32"]));
        assert_eq!(rule["translatedPort"], "22");
        let mapping = mapped
            .iter()
            .find(|m| Some(m["mapped_port"].to_string().as_str()) == rule["destinationPorts"][0].as_str())
            .unwrap();
        assert_eq!(rule["translatedAddress"], mapping["private_ip"]);
    }
    assert_eq!(firewall_rules(&world, &firewall, "networkRuleCollections").len(), 2);
    assert_eq!(allow_rules_on(&world, &nsgs).len(), 2, "and the NSG rules as ever");

    // At its end, both ways close.
    world.advance_minutes(11);
    world.tick().await;
    assert_eq!(world.get_request(&id(&grant)).await["state"], "expired");
    assert!(firewall_rules(&world, &firewall, "natRuleCollections").is_empty());
    assert!(firewall_rules(&world, &firewall, "networkRuleCollections").is_empty());
    assert!(allow_rules_on(&world, &nsgs).is_empty());
    let trail: Vec<String> = world
        .audit(&format!("request={}", id(&grant)))
        .await
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        trail.contains(&"firewall.rules_put".to_owned()) && trail.contains(&"firewall.rules_deleted".to_owned()),
        "{trail:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_firewall_managed_by_a_firewall_policy_or_unknown_is_refused_and_a_refused_write_fails_the_request_closed() {
    let world = World::start().await;
    let (nsgs, vms) = one_vm_per_nsg(&world).await;
    let emulator = &world.local.emulator;
    let managed = emulator.add_firewall("managed-fw", "198.51.100.11", true);
    let mut policy = fleet_policy(json!({"vms": vms}));
    policy["firewall"] = json!(managed);
    let (status, body) = world.put_policy("listed", &policy).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("firewall_not_supported")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("Firewall Policy"), "{body}");
    policy["firewall"] = json!(managed.replace("managed-fw", "nowhere-fw"));
    let (status, body) = world.put_policy("listed", &policy).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("firewall_not_found")), "{body}");

    // A firewall that refuses the write: the NSG rules that opened close again.
    let firewall = emulator.add_firewall("hub-fw", "198.51.100.10", false);
    policy["firewall"] = json!(firewall);
    assert_eq!(world.put_policy("listed", &policy).await.0, 200);
    let mut refused = Fault::new("PUT", 400, "AzureFirewallRuleInvalid", 1);
    refused.path_contains = Some("/azureFirewalls/".into());
    world.inject(refused);
    let ask = json!({"policy": "listed", "vms": vms, "ports": [22], "duration": "PT10M", "justification": "x"});
    world.request(ALICE, &ask).await;
    let (_, list) = world.call("GET", "/api/requests?mine=true", Some(ALICE), None).await;
    assert_eq!(list["requests"][0]["state"], "failed", "{list}");
    assert!(allow_rules_on(&world, &nsgs).is_empty(), "{:?}", allow_rules_on(&world, &nsgs));
    assert!(firewall_rules(&world, &firewall, "natRuleCollections").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_firewall_write_failing_for_now_leaves_no_rule_open_until_the_sweep_opens_both_ways() {
    let world = World::start().await;
    let (nsgs, vms, firewall) = one_vm_per_nsg_behind_a_firewall(&world).await;
    let emulator = &world.local.emulator;
    let mut busy = Fault::new("PUT", 503, "ServiceUnavailable", 100);
    busy.path_contains = Some("/azureFirewalls/".into());
    world.inject(busy);
    let ask = json!({"policy": "listed", "vms": &vms[..1], "ports": [22], "duration": "PT1H", "justification": "x"});
    let (status, pending) = world.request(ALICE, &ask).await;
    assert_eq!((status, pending["state"].as_str()), (201, Some("approved")), "{pending}");
    assert!(allow_rules_on(&world, &nsgs).is_empty(), "the NSG rule came off again");
    assert!(firewall_rules(&world, &firewall, "natRuleCollections").is_empty());
    emulator.clear_faults();
    world.advance_minutes(2);
    world.tick().await;
    let active = world.get_request(&id(&pending)).await;
    assert_eq!(active["state"], "active", "{active}");
    assert_eq!(active["firewall"]["mapped"].as_array().unwrap().len(), 1, "{active}");
    assert_eq!(allow_rules_on(&world, &nsgs).len(), 1);
    assert_eq!(firewall_rules(&world, &firewall, "natRuleCollections").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reconciler_removes_firewall_rules_no_open_request_owns_and_keeps_the_rest() {
    let world = World::start().await;
    let (_, vms, firewall) = one_vm_per_nsg_behind_a_firewall(&world).await;
    let emulator = &world.local.emulator;
    let ask = json!({"policy": "listed", "vm": vms[0], "ports": [22], "duration": "PT3H", "justification": "x"});
    let (_, grant) = world.request(ALICE, &ask).await;
    assert_eq!(grant["state"], "active", "{grant}");
    // A rule left in portcullis's collection by no request at all (a crash before any record,
    // or a hand-made copy), next to the live grant's.
    emulator.change_firewall(&firewall, |doc| {
        let rules = doc["properties"]["natRuleCollections"][0]["properties"]["rules"].as_array_mut().unwrap();
        let mut stray = rules[0].clone();
        stray["name"] = json!("jit-0000000000000000000000ff-0-22");
        stray["sourceAddresses"] = json!(["*"]);
        rules.push(stray);
    });
    assert_eq!(firewall_rules(&world, &firewall, "natRuleCollections").len(), 2);
    // A suspect at the first scan, removed at the next; the live grant's rule stays.
    world.advance_minutes(16);
    world.tick().await;
    assert_eq!(firewall_rules(&world, &firewall, "natRuleCollections").len(), 2, "only a suspect yet");
    world.advance_minutes(16);
    world.tick().await;
    let left: Vec<String> = firewall_rules(&world, &firewall, "natRuleCollections")
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, [format!("jit-{}-0-22", id(&grant))]);
    let removed = world.audit("action=drift.rule_removed").await;
    assert_eq!(removed.len(), 1, "{removed:#?}");
    assert_eq!(removed[0]["details"]["firewall"], firewall.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_recreated_with_another_address_takes_it_at_the_refresh_and_its_grants_end() {
    let world = World::start().await;
    let emulator = &world.local.emulator;
    let nsg = nsg_id("move-nsg");
    emulator.add_nsg(&nsg);
    let a = emulator.add_vm_in("move-rg", "vm-a", "10.7.0.4", NsgPlacement::Subnet(&nsg), &[]);
    let b = emulator.add_vm_in("move-rg", "vm-b", "10.7.0.5", NsgPlacement::Subnet(&nsg), &[]);
    let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/move-rg");
    assert_eq!(world.put_policy("moving", &fleet_policy(json!({"resource_group": group}))).await.0, 201);
    let ask = json!({"policy": "moving", "vm": a, "ports": [22], "duration": "PT3H", "justification": "x"});
    let (_, grant) = world.request(ALICE, &ask).await;
    assert_eq!(grant["state"], "active", "{grant}");
    let on_b = json!({"policy": "moving", "vm": b, "ports": [22], "duration": "PT3H", "justification": "x"});
    let (_, other) = world.request(CAROL, &on_b).await;
    assert_eq!(other["state"], "active", "{other}");
    // vm-a is deleted and created again under its name, with another address, and a new VM
    // gets its old one.
    emulator.add_vm_in("move-rg", "vm-a", "10.7.0.9", NsgPlacement::Subnet(&nsg), &[]);
    let c = emulator.add_vm_in("move-rg", "vm-c", "10.7.0.4", NsgPlacement::Subnet(&nsg), &[]);
    world.advance_minutes(61);
    world.tick().await;
    let (_, policy) = world.call("GET", "/api/policies/moving", Some(ADMIN), None).await;
    let placed = policy["vms"].as_array().unwrap().iter().find(|v| v["vm"] == a.as_str()).unwrap().clone();
    assert_eq!(placed["private_ip"], "10.7.0.9", "{policy}");
    assert_eq!(destinations(&rules_named(&world, &nsg, "jit-deny-")[0]), ["10.7.0.4", "10.7.0.5", "10.7.0.9"]);
    // The grant let in to 10.7.0.4, which is vm-c's now: it ended, with its rule; the grant
    // on vm-b runs on.
    let ended = world.get_request(&id(&grant)).await;
    assert_eq!(ended["state"], "revoked", "{ended}");
    assert_eq!(world.get_request(&id(&other)).await["state"], "active");
    let allows: Vec<Vec<String>> = rules_named(&world, &nsg, "jit-")
        .iter()
        .filter(|r| r["properties"]["access"] == "Allow")
        .map(destinations)
        .collect();
    assert_eq!(allows, [vec!["10.7.0.5".to_owned()]], "nothing lets in to vm-c");
    let (status, _) = world
        .request(ALICE, &json!({"policy": "moving", "vm": c, "ports": [22], "duration": "PT1H", "justification": "x"}))
        .await;
    assert_eq!(status, 201, "vm-c may be asked for in its own right");
    let refreshed = world.audit("action=policy.refreshed").await;
    assert_eq!(refreshed[0]["details"]["moved"], json!([a]), "{refreshed:#?}");
}
