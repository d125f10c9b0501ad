//! Parity with Azure's JIT on an NSG: VM resolution, baseline deny rules, rules portcullis
//! does not own, token sources, and the ARM cost of one grant.

use portcullis_host::emulator::{DEMO_NIC, DEMO_NSG, DEMO_VM, NsgPlacement, SUBSCRIPTION};
use serde_json::{Value, json};

use crate::support::*;

/// A policy that names only the VM, as an Azure admin would.
fn vm_only(vm: &str) -> Value {
    json!({
        "vm": vm,
        "ports": [
            {"port": 22, "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8", "2001:db8::/32", "::1/128"]},
            {"port": 3389, "max_duration": "PT1H", "allowed_sources": ["127.0.0.0/8"]},
        ],
        "approval": {"mode": "auto"},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn enabling_resolves_the_vm_and_puts_exactly_one_deny_rule_that_disabling_removes() {
    let world = World::start().await;
    let (status, policy) = world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    assert_eq!(status, 201, "{policy}");
    let vm = &policy["vms"][0];
    assert_eq!((vm["nsg"].as_str(), vm["private_ip"].as_str()), (Some(DEMO_NSG), Some("10.0.0.4")));
    assert_eq!(vm["nic"], DEMO_NIC);
    assert!(policy["resolved_at"].is_string());

    let denies = world.deny_rules();
    assert_eq!(denies.len(), 1, "{denies:?}");
    let deny = &denies[0];
    assert_eq!(deny["name"], "jit-deny-demo-vm");
    let p = &deny["properties"];
    assert_eq!(
        (p["access"].as_str(), p["direction"].as_str(), p["protocol"].as_str()),
        (Some("Deny"), Some("Inbound"), Some("Tcp"))
    );
    assert_eq!(
        (p["sourceAddressPrefix"].as_str(), p["destinationAddressPrefix"].as_str()),
        (Some("*"), Some("10.0.0.4"))
    );
    assert_eq!(p["destinationPortRanges"], json!(["22", "3389"]));
    let deny_priority = p["priority"].as_u64().unwrap();
    assert!((4000..=4096).contains(&deny_priority));
    assert_eq!(policy["baselines"][0]["priority"].as_u64(), Some(deny_priority));

    // A grant's allow rule always outranks the deny rule.
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    assert!(grant["rules"][0]["priority"].as_u64().unwrap() < deny_priority);

    // Changing the ports updates the same rule.
    let mut fewer = vm_only(DEMO_VM);
    fewer["ports"].as_array_mut().unwrap().remove(1);
    assert_eq!(world.put_policy("demo-vm", &fewer).await.0, 200);
    let denies = world.deny_rules();
    assert_eq!(denies.len(), 1);
    assert_eq!(denies[0]["properties"]["destinationPortRanges"], json!(["22"]));

    // Disabling removes it and refuses new requests; the running grant keeps its rule.
    fewer["enabled"] = json!(false);
    let (status, disabled) = world.put_policy("demo-vm", &fewer).await;
    assert_eq!(status, 200, "{disabled}");
    assert!(world.deny_rules().is_empty());
    assert!(disabled.get("baselines").is_none());
    assert_eq!(world.request(CAROL, &ssh("PT1H")).await.1["error"]["code"], "policy_disabled");
    assert_eq!(world.jit_rules().len(), 1);

    // Re-enabling puts it back; deleting removes it again.
    fewer["enabled"] = json!(true);
    world.put_policy("demo-vm", &fewer).await;
    assert_eq!(world.deny_rules().len(), 1);
    assert_eq!(world.call("DELETE", "/api/policies/demo-vm", Some(ADMIN), None).await.0, 200);
    assert!(world.deny_rules().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_nsg_on_the_subnet_is_found_when_the_nic_has_none() {
    let world = World::start().await;
    let subnet_nsg = format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/demo-rg/providers/Microsoft.Network/networkSecurityGroups/subnet-nsg"
    );
    world.local.emulator.add_nsg(&subnet_nsg);
    let vm = world.local.emulator.add_vm("web-1", "10.0.1.5", NsgPlacement::Subnet(&subnet_nsg));
    let (status, policy) = world.put_policy("web-1", &vm_only(&vm)).await;
    assert_eq!(
        (status, policy["vms"][0]["nsg"].as_str(), policy["vms"][0]["private_ip"].as_str()),
        (201, Some(subnet_nsg.as_str()), Some("10.0.1.5"))
    );
    assert_eq!(world.local.emulator.rules(&subnet_nsg).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_without_an_nsg_or_that_does_not_exist_is_refused_with_the_fix() {
    let world = World::start().await;
    let bare = world.local.emulator.add_vm("bare-1", "10.0.2.5", NsgPlacement::None);
    let (status, body) = world.put_policy("bare-1", &vm_only(&bare)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("vm_has_no_nsg")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("attach an NSG"));
    let ghost = DEMO_VM.replace("demo-vm", "ghost");
    let (status, body) = world.put_policy("ghost", &vm_only(&ghost)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("vm_not_found")), "{body}");
    assert!(world.store_keys().iter().all(|k| !k.starts_with("policy:")), "{:?}", world.store_keys());
}

#[tokio::test(flavor = "multi_thread")]
async fn native_azure_jit_rules_and_foreign_rules_are_untouched_through_a_whole_lifecycle() {
    let world = World::start().await;
    let rule = |priority: u16, access: &str| {
        json!({"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "22", "sourceAddressPrefix": "198.51.100.0/24",
               "destinationAddressPrefix": "10.0.0.4", "access": access, "priority": priority, "direction": "Inbound"})
    };
    world.local.emulator.seed_rule(DEMO_NSG, "SecurityCenter-JITRule_123_ABC", rule(1000, "Allow"));
    world.local.emulator.seed_rule(DEMO_NSG, "corp-allow-bastion", rule(1001, "Allow"));
    world.local.emulator.seed_rule(DEMO_NSG, "jit-corp-handmade", rule(1002, "Deny"));
    let theirs = |world: &World| -> Vec<Value> {
        world
            .rules()
            .into_iter()
            .filter(|r| !r["properties"]["description"].as_str().unwrap_or_default().starts_with("portcullis"))
            .collect()
    };
    let before = theirs(&world);
    assert_eq!(before.len(), 3);

    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    world.advance_minutes(61);
    world.tick().await;
    assert_eq!(world.get_request(&id(&grant)).await["state"], "expired");
    let mut disabled = vm_only(DEMO_VM);
    disabled["enabled"] = json!(false);
    world.put_policy("demo-vm", &disabled).await;
    world.call("DELETE", "/api/policies/demo-vm", Some(ADMIN), None).await;

    assert_eq!(theirs(&world), before, "a rule portcullis does not own changed");
    let touched: Vec<String> =
        world.arm_calls().into_iter().filter(|c| c.contains("SecurityCenter") || c.contains("corp-")).collect();
    assert!(touched.is_empty(), "{touched:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_serves_many_requests() {
    let world = World::start().await;
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    for key in [ALICE, CAROL, ALICE, CAROL, ALICE] {
        assert_eq!(world.request(key, &ssh("PT1H")).await.1["state"], "active");
    }
    assert_eq!(world.local.emulator.tokens_issued("client_credentials"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_managed_identity_gets_its_token_from_imds() {
    let world = World::with_variables(&[
        ("arm_identity", "managed_identity"),
        ("arm_client_secret", ""),
        ("identity_endpoint", "{emulator}/metadata/identity/oauth2/token"),
        ("identity_host", "{emulator}"),
    ])
    .await;
    assert_eq!(world.put_policy("demo-vm", &vm_only(DEMO_VM)).await.0, 201);
    assert_eq!(world.request(ALICE, &ssh("PT1H")).await.1["state"], "active");
    assert_eq!(
        (world.local.emulator.tokens_issued("imds"), world.local.emulator.tokens_issued("client_credentials")),
        (1, 0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_service_identity_sends_its_header_and_a_wrong_one_is_refused() {
    let world = World::with_variables(&[
        ("arm_identity", "app_service"),
        ("identity_endpoint", "{emulator}/msi/token"),
        ("identity_host", "{emulator}"),
        ("identity_header", portcullis_host::emulator::IDENTITY_HEADER),
    ])
    .await;
    assert_eq!(world.put_policy("demo-vm", &vm_only(DEMO_VM)).await.0, 201);
    assert_eq!(world.local.emulator.tokens_issued("app_service"), 1);

    let world = World::with_variables(&[
        ("arm_identity", "app_service"),
        ("identity_endpoint", "{emulator}/msi/token"),
        ("identity_host", "{emulator}"),
        ("identity_header", "wrong"),
    ])
    .await;
    let (status, body) = world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (502, Some("arm_refused")), "{body}");
    assert!(!body.to_string().contains("wrong"), "the header value leaked: {body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv6_callers_and_prefixes_get_ipv6_rules() {
    let world = World::listening("[::1]:0", &[]).await;
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["source"].as_str()), (201, Some("::1/128")), "{body}");
    let (status, body) = world
        .request(CAROL, &json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "2001:db8:1::/48", "justification": "x"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let sources: Vec<String> =
        world.jit_rules().iter().map(|r| r["properties"]["sourceAddressPrefix"].as_str().unwrap().to_owned()).collect();
    assert!(sources.contains(&"::1/128".to_owned()) && sources.contains(&"2001:db8:1::/48".to_owned()), "{sources:?}");
    let (status, body) = world
        .request(CAROL, &json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "2001:db9::/48", "justification": "x"}))
        .await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("source_not_allowed")));
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_policy_with_revoke_closes_its_running_grants_at_once() {
    let world = World::start().await;
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    let (_, grant) = world.request(ALICE, &ssh("PT1H")).await;
    let (status, body) = world.call("DELETE", "/api/policies/demo-vm?revoke=true", Some(ADMIN), None).await;
    assert_eq!((status, body["revoked"].as_u64()), (200, Some(1)), "{body}");
    assert!(world.rules().is_empty(), "{:?}", world.rules());
    let revoked = world.get_request(&id(&grant)).await;
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["ended"]["by"], "admin");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_grant_lifecycle_costs_one_put_and_one_delete_plus_polling() {
    let world = World::start().await;
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    world.local.emulator.clear_calls();
    world.request(ALICE, &ssh("PT1H")).await;
    world.advance_minutes(61);
    world.tick().await;
    let calls = world.arm_calls();
    let count = |prefix: &str, part: &str| calls.iter().filter(|c| c.starts_with(prefix) && c.contains(part)).count();
    assert_eq!(count("PUT", "/securityRules/jit-"), 1, "{calls:#?}");
    assert_eq!(count("DELETE", "/securityRules/jit-"), 1, "{calls:#?}");
    // The token lives 59 minutes and the grant 60: one renewal falls inside this lifecycle.
    let tokens = count("POST", "/oauth2/v2.0/token");
    assert!(tokens <= 1, "{calls:#?}");
    let polls = count("GET", "/operations/") + count("GET", "/operationResults/");
    // The reconciler lists each policy's NSG once per `reconcile_every` (one tick here).
    let listings = calls.iter().filter(|c| c.starts_with("GET") && c.contains("/securityRules ->")).count();
    assert_eq!(listings, 1, "{calls:#?}");
    assert_eq!(polls, calls.len() - 2 - tokens - listings, "nothing but polling besides: {calls:#?}");
    println!("ARM calls of one grant lifecycle:\n{}", calls.join("\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_without_ports_protects_azures_four_and_admits_nobody_until_sources_are_set() {
    let world = World::start().await;
    let (status, policy) = world.put_policy("demo-vm", &json!({"vm": DEMO_VM, "approval": {"mode": "auto"}})).await;
    assert_eq!(status, 201, "{policy}");
    assert_eq!(world.deny_rules()[0]["properties"]["destinationPortRanges"], json!(["22", "3389", "5985", "5986"]));
    let (status, body) = world.request(ALICE, &ssh("PT1H")).await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("source_not_allowed")));
    assert!(body["error"]["message"].as_str().unwrap().contains("allows no sources yet"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_internet_is_grantable_only_where_the_policy_says_any() {
    let world = World::start().await;
    let anywhere =
        json!({"policy": "demo-vm", "ports": [22], "duration": "PT1H", "source": "0.0.0.0/0", "justification": "x"});
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    assert_eq!(world.request(ALICE, &anywhere).await.1["error"]["code"], "source_not_allowed");
    let mut open = vm_only(DEMO_VM);
    open["ports"][0]["allowed_sources"] = json!(["any"]);
    world.put_policy("demo-vm", &open).await;
    let (status, body) = world.request(ALICE, &anywhere).await;
    assert_eq!((status, body["state"].as_str()), (201, Some("active")), "{body}");
    assert_eq!(world.jit_rules()[0]["properties"]["sourceAddressPrefix"], "0.0.0.0/0");
}

#[tokio::test(flavor = "multi_thread")]
async fn disabling_with_revoke_ends_running_grants_and_without_it_lets_them_run() {
    let world = World::start().await;
    world.put_policy("demo-vm", &vm_only(DEMO_VM)).await;
    world.request(ALICE, &ssh("PT1H")).await;
    let mut disabled = vm_only(DEMO_VM);
    disabled["enabled"] = json!(false);
    let (status, body) =
        world.call("PUT", "/api/policies/demo-vm?revoke=true", Some(ADMIN), Some(&disabled.to_string())).await;
    assert_eq!((status, body["revoked"].as_u64()), (200, Some(1)), "{body}");
    assert!(world.rules().is_empty(), "{:?}", world.rules());
}

/// Fleets (issue 15, its first step): the emulator lists a resource group's VMs and a tag's
/// VMs page by page as ARM does, and the service's listing code reads those pages, follows
/// their `nextLink` and keeps only the VMs in scope.
#[tokio::test(flavor = "multi_thread")]
async fn vms_are_listed_by_resource_group_and_by_tag_page_by_page() {
    use shared::arm::inventory::{TagMatch, VmSelector, parse_page};

    let world = World::start().await;
    let emulator = &world.local.emulator;
    emulator.set_page_size(2);
    let nsg = DEMO_NSG;
    for (n, tag) in [(1, "ssh"), (2, "rdp"), (3, "ssh"), (4, "ssh"), (5, "none")] {
        emulator.add_vm_in(
            "fleet-rg",
            &format!("vm{n}"),
            &format!("10.9.0.{n}"),
            NsgPlacement::Nic(nsg),
            &[("jit", tag)],
        );
    }
    emulator.add_vm_in("other-rg", "vm9", "10.9.1.9", NsgPlacement::Nic(nsg), &[("jit", "ssh")]);
    let base = emulator.url();
    let client = reqwest::Client::new();
    let bearer = arm_bearer(&client, &base).await;
    let list = |selector: VmSelector| {
        let (client, bearer, base) = (client.clone(), bearer.clone(), base.clone());
        async move {
            let (mut names, mut pages) = (Vec::new(), 0);
            let mut next = Some(selector.first_page(&base));
            while let Some(url) = next.take() {
                let response = client.get(&url).header("authorization", &bearer).send().await.unwrap();
                assert_eq!(response.status(), 200, "{url}");
                let page = parse_page(&response.json().await.unwrap(), &selector, &base).unwrap();
                names.extend(page.vms.iter().map(|vm| vm.as_str().rsplit('/').next().unwrap().to_owned()));
                next = page.next;
                pages += 1;
            }
            (names, pages)
        }
    };
    let group = format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/fleet-rg");
    let (all, pages) = list(VmSelector::new(&group, None).unwrap()).await;
    assert_eq!((all, pages), (vec!["vm1", "vm2", "vm3", "vm4", "vm5"].into_iter().map(String::from).collect(), 3));
    let ssh = Some(TagMatch { name: "jit".into(), value: "ssh".into() });
    let (tagged, _) = list(VmSelector::new(&group, ssh.clone()).unwrap()).await;
    assert_eq!(tagged, ["vm1", "vm3", "vm4"]);
    let (subscription, _) = list(VmSelector::new(&format!("/subscriptions/{SUBSCRIPTION}"), ssh).unwrap()).await;
    assert_eq!(subscription, ["vm1", "vm3", "vm4", "vm9"]);
    // A tag filter on the Compute list is refused, as ARM refuses it.
    let url = format!("{base}{group}/providers/Microsoft.Compute/virtualMachines?api-version=2024-07-01&$filter=x");
    let refused = client.get(url).header("authorization", &bearer).send().await.unwrap();
    assert_eq!(refused.status(), 400);
}

/// Azure Firewall in the emulator (issue 15's ARM layer): the whole resource is read and
/// written back under its etag (a stale one answers 412), one update at a time (409 while
/// one runs, until its operation is polled to the end), and ARM's checks of classic rules
/// (NAT ports below 64000) hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_firewall_is_edited_whole_under_its_etag_one_update_at_a_time() {
    use shared::arm::firewall::{FirewallGrant, add_rules, for_put, has_rule};
    use shared::domain::ports::Protocol;

    let world = World::start().await;
    let emulator = &world.local.emulator;
    let id = emulator.add_firewall("hub-fw", "198.51.100.1", false);
    let base = emulator.url();
    let client = reqwest::Client::new();
    let bearer = arm_bearer(&client, &base).await;
    let url = format!("{base}{id}?api-version=2024-05-01");
    let get = || async {
        let answer = client.get(&url).header("authorization", &bearer).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        answer.json::<Value>().await.unwrap()
    };
    let put = |doc: Value, etag: String| {
        let (client, url, bearer) = (client.clone(), url.clone(), bearer.clone());
        async move {
            let answer = client
                .put(&url)
                .header("authorization", &bearer)
                .header("if-match", etag)
                .json(&doc)
                .send()
                .await
                .unwrap();
            (
                answer.status().as_u16(),
                answer.headers().get("azure-asyncoperation").map(|v| v.to_str().unwrap().to_owned()),
            )
        }
    };
    let mut doc = get().await;
    let etag = doc["etag"].as_str().unwrap().to_owned();
    let grant = |port: u16| FirewallGrant {
        name: "jit-r1-22".into(),
        protocol: Protocol::Tcp,
        source: "203.0.113.7".into(),
        public_ip: "198.51.100.1".parse().unwrap(),
        mapped_port: port,
        private_ip: "10.0.0.4".parse().unwrap(),
        port: 22,
    };
    add_rules(&mut doc, &[grant(64000)], 200);
    assert_eq!(put(for_put(&doc), etag.clone()).await.0, 400, "NAT ports stop at 63999");
    let mut doc = get().await;
    add_rules(&mut doc, &[grant(50000)], 200);
    let (status, operation) = put(for_put(&doc), etag.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(put(for_put(&doc), etag.clone()).await.0, 412, "the etag moved on");
    let fresh = get().await;
    assert_eq!(fresh["properties"]["provisioningState"], "Updating");
    let fresh_etag = fresh["etag"].as_str().unwrap().to_owned();
    assert_eq!(put(for_put(&fresh), fresh_etag.clone()).await.0, 409, "one update at a time");
    let operation = operation.expect("a long-running update");
    loop {
        let status: Value =
            client.get(&operation).header("authorization", &bearer).send().await.unwrap().json().await.unwrap();
        if status["status"] == "Succeeded" {
            break;
        }
    }
    let stored = emulator.firewall(&id).unwrap();
    assert_eq!(stored["properties"]["provisioningState"], "Succeeded");
    assert!(has_rule(&stored, "jit-r1-22"));
    // A firewall run by Firewall Manager says so in its document.
    let managed = emulator.add_firewall("managed-fw", "198.51.100.2", true);
    assert!(shared::arm::firewall::refusal(&emulator.firewall(&managed).unwrap()).is_some());
}

/// An `Authorization` value for the emulator's ARM, from its token endpoint.
async fn arm_bearer(client: &reqwest::Client, base: &str) -> String {
    let token: Value = client
        .post(format!("{base}/{}/oauth2/v2.0/token", portcullis_host::emulator::TENANT))
        .form(&[
            ("client_id", portcullis_host::emulator::CLIENT_ID),
            ("client_secret", portcullis_host::emulator::CLIENT_SECRET),
            ("grant_type", "client_credentials"),
            ("scope", "https://management.azure.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    format!("Bearer {}", token["access_token"].as_str().unwrap())
}
