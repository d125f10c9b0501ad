//! The real `portcullis` binary against the local service (the real components in the test
//! host, with the ARM emulator), as people and scripts run it: asking, waiting, deciding,
//! policies as code, the audit trail, logging in, and the documented exit codes.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use portcullis_host::local::{self, Local, LocalOptions};
use serde_json::{Value, json};

const ADMIN: &str = "demo-admin";
const ALICE: &str = "demo-alice";
const BOB: &str = "demo-bob";
const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo-rg/providers/Microsoft.Compute/virtualMachines/demo-vm";

async fn service(state: &Path) -> Local {
    local::start(LocalOptions::ephemeral(state)).await.expect("the local service starts")
}

/// Runs the binary with `token` (none: no credential at all) against `url`.
fn portcullis(url: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_portcullis"));
    command.args(args).env("PORTCULLIS_URL", url).env("PORTCULLIS_CONFIG", "/nonexistent/portcullis.json");
    command.env_remove("PORTCULLIS_TOKEN");
    if let Some(token) = token {
        command.env("PORTCULLIS_TOKEN", token);
    }
    command.stdin(Stdio::null()).output().expect("the binary runs")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!("not JSON: {}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    })
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("an exit code")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn policy_file(dir: &Path, name: &str, policies: Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_norway::to_string(&json!({"policies": policies})).unwrap()).unwrap();
    path.display().to_string()
}

fn manual(ports: Value) -> Value {
    json!({"vm": VM, "ports": ports, "approval": {"mode": "manual", "approvers": ["group:ops"]}})
}

/// Applies `demo-vm` (port 22 from loopback, approved by group `ops`) as the admin.
fn apply_demo_policy(dir: &Path, url: &str) {
    let port = json!([{"port": 22, "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8"]}]);
    let file = policy_file(dir, "demo.yaml", json!({"demo-vm": manual(port)}));
    let applied = portcullis(url, Some(ADMIN), &["policy", "apply", "-f", &file]);
    assert_eq!(code(&applied), 0, "{}", text(&applied));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waits_for_its_approval_then_is_extended_and_revoked() {
    let state = tempfile::tempdir().unwrap();
    let local = service(state.path()).await;
    let url = local.host.url();
    apply_demo_policy(state.path(), &url);

    // Alice asks and waits; Bob approves from his own terminal; her wait ends with the grant.
    let waiting = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["request", "demo-vm", "--port", "22", "--for", "1h30m", "--reason", "INC-123", "--wait", "-o", "json"])
        .env("PORTCULLIS_URL", &url)
        .env("PORTCULLIS_TOKEN", ALICE)
        .env("PORTCULLIS_CONFIG", "/nonexistent/portcullis.json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pending = loop {
        let listed = json_of(&portcullis(&url, Some(BOB), &["list", "--awaiting-me", "-o", "json"]));
        if let Some(first) = listed["requests"].as_array().and_then(|r| r.first()) {
            break first.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let id = pending["id"].as_str().unwrap().to_owned();
    assert_eq!(pending["duration"], "PT1H30M", "90 minutes as ISO 8601");
    let own = portcullis(&url, Some(ALICE), &["approve", &id]);
    assert_eq!(code(&own), 1, "refused by policy: {}", text(&own));
    assert!(text(&own).contains("HTTP 403"), "{}", text(&own));
    let approved = portcullis(&url, Some(BOB), &["approve", &id, "--comment", "ok"]);
    assert_eq!(code(&approved), 0, "{}", text(&approved));
    let waited = tokio::task::spawn_blocking(move || waiting.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(code(&waited), 0, "{}", text(&waited));
    let active = json_of(&waited);
    assert_eq!((active["id"].as_str(), active["state"].as_str()), (Some(id.as_str()), Some("active")));
    let ends_at = active["ends_at"].as_str().unwrap().to_owned();

    // People get a table and relative times.
    let status = portcullis(&url, Some(ALICE), &["status"]);
    assert!(text(&status).contains(&id) && text(&status).contains("ends in 1 h 29 min"), "{}", text(&status));

    let extended = json_of(&portcullis(&url, Some(ALICE), &["extend", &id, "--for", "30m", "-o", "json"]));
    assert!(extended["ends_at"].as_str().unwrap() > ends_at.as_str(), "{extended}");
    let revoked = json_of(&portcullis(&url, Some(ALICE), &["revoke", &id, "--reason", "done", "-o", "json"]));
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    assert!(
        local.emulator.rules(portcullis_host::emulator::DEMO_NSG).iter().all(|r| r["properties"]["access"] != "Allow")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_failure_has_its_documented_exit_code() {
    let state = tempfile::tempdir().unwrap();
    let local = service(state.path()).await;
    let url = local.host.url();
    let cases: [(&str, Option<&str>, Vec<&str>, i32); 6] = [
        (
            "usage: a duration nobody writes",
            Some(ALICE),
            vec!["request", "demo-vm", "-p", "22", "--for", "10x", "--reason", "r"],
            2,
        ),
        ("usage: a missing argument", Some(ALICE), vec!["deny", "abc"], 2),
        ("authentication: a wrong key", Some("not-a-key"), vec!["list"], 3),
        ("authentication: no key at all", None, vec!["list"], 3),
        ("not found", Some(ALICE), vec!["status", "0123456789abcdef01234567"], 4),
        (
            "refused by policy: no such policy to ask under",
            Some(ALICE),
            vec!["request", "nope", "-p", "22", "--for", "1h", "--reason", "r"],
            4,
        ),
    ];
    for (why, token, args, expected) in cases {
        let output = portcullis(&url, token, &args);
        assert_eq!(code(&output), expected, "{why}: {}", text(&output));
    }
    let refused = portcullis(&url, Some(BOB), &["request", "nope", "-p", "22", "--for", "1h", "--reason", "r"]);
    assert_eq!(code(&refused), 1, "an approver is not a requester: {}", text(&refused));
    assert!(text(&refused).contains("requester_role_required"), "the API's code is shown: {}", text(&refused));
    let unreachable = portcullis("http://127.0.0.1:9", Some(ALICE), &["list"]);
    assert_eq!(code(&unreachable), 5, "{}", text(&unreachable));
    let clear_text = portcullis("http://jit.example.com", Some(ALICE), &["list"]);
    assert_eq!(code(&clear_text), 2, "a token never goes over plain http to another host: {}", text(&clear_text));

    // The dry run: a request the policy would refuse exits as a refusal.
    apply_demo_policy(state.path(), &url);
    let evaluate = |port: &str| {
        portcullis(
            &url,
            Some(ADMIN),
            &[
                "evaluate",
                "demo-vm",
                "--as",
                "carol",
                "--group",
                "devs",
                "-p",
                port,
                "--for",
                "1h",
                "--source",
                "127.0.0.1",
                "--reason",
                "r",
            ],
        )
    };
    let allowed = evaluate("22");
    assert_eq!(code(&allowed), 0, "{}", text(&allowed));
    assert!(text(&allowed).contains("needs 1 approval"), "{}", text(&allowed));
    let refused = evaluate("3389");
    assert_eq!(code(&refused), 1, "{}", text(&refused));
    assert!(text(&refused).contains("port_not_in_policy"), "{}", text(&refused));

    // A policy that fails half-way through a file: what was applied, what failed, what was not
    // tried, and the failure's exit code.
    let broken = policy_file(
        state.path(),
        "broken.yaml",
        json!({
            "a-first": manual(json!([{"port": 22, "allowed_sources": ["127.0.0.0/8"]}])),
            "b-missing-vm": {"vm": VM.replace("demo-vm", "no-such-vm"), "approval": {"mode": "auto"}},
            "c-last": manual(json!([{"port": 22, "allowed_sources": ["127.0.0.0/8"]}])),
        }),
    );
    let output = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &broken, "-o", "json"]);
    assert_eq!(code(&output), 1, "{}", text(&output));
    let outcomes: Vec<(String, String)> = json_of(&output)["policies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["outcome"].is_string())
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["outcome"].as_str().unwrap().to_owned()))
        .collect();
    let expected = [("a-first", "applied"), ("b-missing-vm", "failed"), ("c-last", "not_tried")];
    assert_eq!(outcomes, expected.map(|(n, o)| (n.to_owned(), o.to_owned())));
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_as_code_diff_dry_run_prune_and_round_trip() {
    let state = tempfile::tempdir().unwrap();
    let local = service(state.path()).await;
    let url = local.host.url();
    let two = json!({
        "web": manual(json!([{"port": 22, "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8"]}, {"port": 3389, "allowed_sources": ["127.0.0.0/8"]}])),
        "db": {"vm": VM, "ports": [{"port": 5985, "allowed_sources": ["10.1.0.0/16"]}], "approval": {"mode": "auto"}},
    });
    let file = policy_file(state.path(), "two.yaml", two.clone());
    let names = || -> Vec<String> {
        let list = json_of(&portcullis(&url, Some(ADMIN), &["policy", "list", "-o", "json"]));
        list["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect()
    };

    let dry = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &file, "--dry-run"]);
    assert_eq!(code(&dry), 0, "{}", text(&dry));
    assert!(text(&dry).contains("+ web (new)") && text(&dry).contains("+ db (new)"), "{}", text(&dry));
    assert!(names().is_empty(), "a dry run applies nothing");
    assert_eq!(code(&portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &file])), 0);
    assert_eq!(names(), ["db", "web"]);
    let again = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &file]);
    assert!(text(&again).contains("No changes."), "defaults filled by the server are no change: {}", text(&again));

    // A port's maximum changes and another port goes: the diff says so, field by field.
    let mut changed = two.clone();
    changed["web"]["ports"] = json!([{"port": 22, "max_duration": "PT1H", "allowed_sources": ["127.0.0.0/8"]}]);
    let file = policy_file(state.path(), "changed.yaml", changed);
    let diff = text(&portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &file, "--dry-run"]));
    assert!(diff.contains("~ web") && diff.contains("~ port 22 max_duration: \"PT3H\" -> \"PT1H\""), "{diff}");
    assert!(diff.contains("- port 3389 (removed)") && diff.contains("= db (unchanged)"), "{diff}");

    // What `get -o yaml` writes, `apply` takes back unchanged.
    let got = portcullis(&url, Some(ADMIN), &["policy", "get", "web", "-o", "yaml"]);
    let round = state.path().join("web.yaml");
    std::fs::write(&round, &got.stdout).unwrap();
    let plan =
        json_of(&portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", round.to_str().unwrap(), "-o", "json"]));
    let web = plan["policies"].as_array().unwrap().iter().find(|p| p["name"] == "web").unwrap().clone();
    assert_eq!(web["change"], "unchanged", "{plan}");
    let again = portcullis(&url, Some(ADMIN), &["policy", "get", "web", "-o", "yaml"]);
    assert_eq!(again.stdout, got.stdout, "the round trip is exact");

    // Pruning: db is not in web.yaml. Without a terminal to confirm, nothing without --yes.
    let refused = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", round.to_str().unwrap(), "--prune"]);
    assert_eq!(code(&refused), 2, "{}", text(&refused));
    assert_eq!(names(), ["db", "web"]);
    let pruned = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", round.to_str().unwrap(), "--prune", "--yes"]);
    assert_eq!(code(&pruned), 0, "{}", text(&pruned));
    assert_eq!(names(), ["web"]);
    // A file the server would refuse is refused before anything is applied.
    let bad =
        policy_file(state.path(), "bad.yaml", json!({"x": {"vm": VM, "approval": {"mode": "auto"}, "colour": "red"}}));
    let output = portcullis(&url, Some(ADMIN), &["policy", "apply", "-f", &bad]);
    assert_eq!(code(&output), 2, "{}", text(&output));
    assert!(text(&output).contains("colour"), "{}", text(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trail_exports_and_verifies_offline_and_a_login_is_kept_for_its_owner_alone() {
    let state = tempfile::tempdir().unwrap();
    let local = service(state.path()).await;
    let url = local.host.url();
    apply_demo_policy(state.path(), &url);
    portcullis(&url, Some(ALICE), &["request", "demo-vm", "-p", "22", "--for", "1h", "--reason", "INC-9"]);
    let export = portcullis(&url, Some(ADMIN), &["audit", "export"]);
    assert_eq!(code(&export), 0, "{}", text(&export));
    let trail = state.path().join("trail.jsonl");
    std::fs::write(&trail, &export.stdout).unwrap();
    assert!(String::from_utf8_lossy(&export.stdout).lines().count() >= 3);
    let verified = portcullis(&url, None, &["audit", "verify", trail.to_str().unwrap()]);
    assert_eq!(code(&verified), 0, "{}", text(&verified));
    assert!(text(&verified).starts_with("valid: "), "{}", text(&verified));
    let tampered = String::from_utf8_lossy(&export.stdout).replacen("INC-9", "INC-0", 1);
    std::fs::write(&trail, tampered).unwrap();
    let broken = portcullis(&url, None, &["audit", "verify", trail.to_str().unwrap(), "-o", "json"]);
    assert_eq!(code(&broken), 1);
    assert!(json_of(&broken)["broken"]["seq"].as_u64().is_some());

    // Login keeps the URL and token, readable by their owner alone, and later calls use them.
    let config = state.path().join("config").join("portcullis.json");
    let login = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["login", "--url", &url, "--token", BOB])
        .env("PORTCULLIS_CONFIG", &config)
        .output()
        .unwrap();
    assert_eq!(code(&login), 0, "{}", text(&login));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let me = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["whoami", "-o", "json"])
        .env("PORTCULLIS_CONFIG", &config)
        .env_remove("PORTCULLIS_TOKEN")
        .env_remove("PORTCULLIS_URL")
        .output()
        .unwrap();
    assert_eq!(json_of(&me)["principal"], "bob");
    // The saved token goes only to the portcullis it was saved for.
    let elsewhere = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["whoami", "--url", &url.replace("127.0.0.1", "localhost")])
        .env("PORTCULLIS_CONFIG", &config)
        .env_remove("PORTCULLIS_TOKEN")
        .output()
        .unwrap();
    assert_eq!(code(&elsewhere), 3, "{}", text(&elsewhere));
    let wrong = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["login", "--url", &url, "--token", "wrong"])
        .env("PORTCULLIS_CONFIG", state.path().join("other.json"))
        .output()
        .unwrap();
    assert_eq!(code(&wrong), 3, "a token is checked before it is kept");
    assert!(!state.path().join("other.json").exists());
}
