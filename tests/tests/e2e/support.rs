//! The test harness: one host and one emulator per test, typed helpers, and a report of
//! guest logs, ARM calls and store contents when a test fails.

use std::collections::HashMap;

use chrono::TimeDelta;
pub use portcullis_host::emulator::{DEMO_NSG, DEMO_VM, Fault};
use portcullis_host::local::{self, DemoKey, Local, LocalOptions};
use portcullis_host::receiver::Receiver;
use portcullis_host::redis_server::RedisServer;
use serde_json::{Value, json};

pub const ADMIN: &str = "demo-admin";
pub const ALICE: &str = "demo-alice";
pub const BOB: &str = "demo-bob";
/// Both a requester and an approver, in `devs` and `ops`.
pub const CAROL: &str = "carol-key";
/// An approver in `ops`.
pub const DAVE: &str = "dave-key";
/// A requester on call (group `oncall`), allowed to break the glass where policies say so.
pub const ERIN: &str = "erin-key";

const KEYS: [DemoKey; 6] = [
    DemoKey { key: ADMIN, principal: "admin", groups: &[], roles: &["admin", "auditor"] },
    DemoKey { key: ALICE, principal: "alice", groups: &["devs"], roles: &["requester"] },
    DemoKey { key: BOB, principal: "bob", groups: &["ops"], roles: &["approver"] },
    DemoKey { key: CAROL, principal: "carol", groups: &["devs", "ops"], roles: &["requester", "approver"] },
    DemoKey { key: DAVE, principal: "dave", groups: &["ops"], roles: &["approver"] },
    DemoKey { key: ERIN, principal: "erin", groups: &["oncall"], roles: &["requester"] },
];

/// The audience tokens are minted for.
pub const AUDIENCE: &str = "api://portcullis";

/// Decision links, and signing in to them (and to the page) at the emulator's provider, as
/// the API's own registration.
pub const SIGN_IN_VARIABLES: [(&str, &str); 5] = [
    ("decision_link_secret", "a-long-random-decision-link-secret-value"),
    ("oidc_client_id", AUDIENCE),
    ("oidc_authorize_url", "{emulator}/oidc/authorize"),
    ("oidc_token_url", "{emulator}/oidc/token"),
    ("oidc_token_host", "{emulator}"),
];

pub struct World {
    pub local: Local,
    pub client: reqwest::Client,
    /// The webhook receiver.
    pub receiver: Receiver,
    /// The Redis server of a world on the outbound-Redis store.
    pub redis: Option<RedisServer>,
    _state: tempfile::TempDir,
}

impl World {
    pub async fn start() -> Self {
        Self::with_variables(&[]).await
    }

    pub async fn with_variables(variables: &[(&str, &str)]) -> Self {
        Self::listening("127.0.0.1:0", variables).await
    }

    /// A world with extra requester keys besides the usual ones: each key is its own
    /// principal (the key's name), in group `devs`.
    pub async fn with_keys(extra: &[String], variables: &[(&str, &str)]) -> Self {
        use sha2::Digest;
        let mut keys: Vec<Value> = serde_json::from_str(&local::api_keys_json(&KEYS)).unwrap();
        for key in extra {
            keys.push(json!({"sha256": hex::encode(sha2::Sha256::digest(key.as_bytes())), "principal": key, "groups": ["devs"], "roles": ["requester"]}));
        }
        let keys = Value::Array(keys).to_string();
        let mut variables = variables.to_vec();
        variables.push(("api_keys", &keys));
        Self::listening("127.0.0.1:0", &variables).await
    }

    /// A world whose API listens on `listen` (`[::1]:0` for IPv6 callers).
    pub async fn listening(listen: &str, variables: &[(&str, &str)]) -> Self {
        Self::build(listen, variables, None, None).await
    }

    /// A world on the outbound-Redis store (`store = "redis"`), against a Redis of its own.
    pub async fn on_redis(variables: &[(&str, &str)]) -> Self {
        let redis = RedisServer::start().expect("starting redis-server");
        let (url, host) = (redis.url(), redis.host());
        // The test's own variables come last and win.
        let mut all = vec![("store", "redis"), ("redis_url", url.as_str()), ("redis_host", host.as_str())];
        all.extend_from_slice(variables);
        Self::build("127.0.0.1:0", &all, None, Some(redis)).await
    }

    /// A world whose host reads a Spin runtime configuration file with this text.
    pub async fn with_runtime_config(text: &str) -> Self {
        Self::build("127.0.0.1:0", &[], Some(text), None).await
    }

    async fn build(
        listen: &str,
        variables: &[(&str, &str)],
        runtime_config: Option<&str>,
        redis: Option<RedisServer>,
    ) -> Self {
        let state = tempfile::tempdir().unwrap();
        let runtime_config = runtime_config.map(|text| {
            let path = state.path().join("runtime-config.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        let receiver = Receiver::start().await.expect("starting the webhook receiver");
        // `{receiver}` in a value stands for the webhook receiver's origin.
        let mut overrides: HashMap<String, String> =
            variables.iter().map(|(k, v)| (k.to_string(), v.replace("{receiver}", &receiver.origin()))).collect();
        overrides.entry("api_keys".into()).or_insert_with(|| local::api_keys_json(&KEYS));
        for (name, value) in [
            ("oidc_issuer", "{emulator}/oidc"),
            ("oidc_audience", AUDIENCE),
            ("oidc_jwks_url", "{emulator}/oidc/keys"),
            ("oidc_host", "{emulator}"),
            // Tests make hundreds of changes a minute (of the emulated clock) from one address;
            // the rate limits' own tests turn them on.
            ("rate_limits", "off"),
        ] {
            overrides.entry(name.into()).or_insert_with(|| value.into());
        }
        // Webhooks may reach the test receiver (plain HTTP on loopback: a development host).
        overrides.entry("webhook_host_1".into()).or_insert_with(|| receiver.origin());
        overrides.entry("webhook_dev_hosts".into()).or_insert_with(|| receiver.authority());
        overrides.entry("public_url".into()).or_insert_with(|| "https://jit.example.com".into());
        let local = local::start(LocalOptions {
            listen: listen.parse().unwrap(),
            emulator_listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.path().to_owned(),
            run_cron: false,
            echo_guest_logs: false,
            polls: 1,
            retry_after: 0,
            variables: overrides,
            manifest: None,
            runtime_config,
        })
        .await
        .expect("starting the host and emulator");
        Self { local, client: reqwest::Client::new(), receiver, redis, _state: state }
    }

    /// One API call; answers the status and the JSON body (`Null` when empty).
    pub async fn call(&self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let url = format!("{}{path}", self.local.host.url());
        let mut request = self.client.request(method.parse().unwrap(), url);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_owned());
        }
        let response = request.send().await.expect("the host answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        crate::contract::check(method, path, status, &text);
        (
            status,
            if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON answer: {text}"))
            },
        )
    }

    /// A GET answered as text (exports), with the response headers.
    pub async fn get_text(&self, path: &str, key: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let url = format!("{}{path}", self.local.host.url());
        let response = self.client.get(url).bearer_auth(key).send().await.expect("the host answers");
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, headers, response.text().await.unwrap())
    }

    /// Audit events matching `query` (`request=...&action=...`), every page followed.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let mut events = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page_query = match &cursor {
                Some(cursor) => format!("{query}&cursor={cursor}"),
                None => query.to_owned(),
            };
            let (status, body) = self.call("GET", &format!("/api/audit?{page_query}"), Some(ADMIN), None).await;
            assert_eq!(status, 200, "{body}");
            events.extend(body["events"].as_array().unwrap().iter().cloned());
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return events,
            }
        }
    }

    pub async fn put_policy(&self, name: &str, policy: &Value) -> (u16, Value) {
        self.call("PUT", &format!("/api/policies/{name}"), Some(ADMIN), Some(&policy.to_string())).await
    }

    pub async fn request(&self, key: &str, body: &Value) -> (u16, Value) {
        self.call("POST", "/api/requests", Some(key), Some(&body.to_string())).await
    }

    pub async fn decide(&self, id: &str, decision: &str, key: &str) -> (u16, Value) {
        self.call("POST", &format!("/api/requests/{id}/{decision}"), Some(key), Some("{}")).await
    }

    pub async fn get_request(&self, id: &str) -> Value {
        let (status, body) = self.call("GET", &format!("/api/requests/{id}"), Some(ADMIN), None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Claims of a valid token for `who`, valid for an hour of guest time.
    pub fn claims(&self, who: &str, groups: &[&str], roles: &[&str]) -> Value {
        let now = self.local.host.clock().now().timestamp();
        json!({
            "iss": self.local.emulator.oidc_issuer(), "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 3600,
            "preferred_username": who, "email": format!("{}.mail@example.com", who.split('@').next().unwrap()), "groups": groups, "roles": roles,
        })
    }

    /// A valid RS256 token.
    pub fn token(&self, who: &str, groups: &[&str], roles: &[&str]) -> String {
        self.local.emulator.mint("rsa-1", &self.claims(who, groups, roles))
    }

    /// The demo NSG's rules as ARM returns them.
    pub fn rules(&self) -> Vec<Value> {
        self.local.emulator.rules(DEMO_NSG)
    }

    /// The grants' allow rules.
    pub fn jit_rules(&self) -> Vec<Value> {
        self.rules()
            .into_iter()
            .filter(|r| r["properties"]["access"] == "Allow" && r["name"].as_str().unwrap().starts_with("jit-"))
            .collect()
    }

    /// The baseline deny rules.
    pub fn deny_rules(&self) -> Vec<Value> {
        self.rules()
            .into_iter()
            .filter(|r| r["properties"]["access"] == "Deny" && r["name"].as_str().unwrap().starts_with("jit-deny-"))
            .collect()
    }

    pub fn advance_minutes(&self, minutes: i64) {
        self.local.host.clock().advance(TimeDelta::minutes(minutes));
    }

    /// One cron tick of expire-fn.
    pub async fn tick(&self) {
        self.local.host.tick().await.expect("the cron handler succeeds");
    }

    pub fn inject(&self, fault: Fault) {
        self.local.emulator.inject(fault);
    }

    pub fn arm_calls(&self) -> Vec<String> {
        self.local.emulator.calls().into_iter().map(|c| format!("{} {} -> {}", c.method, c.path, c.status)).collect()
    }

    pub fn store_keys(&self) -> Vec<String> {
        self.local.host.dump_store().into_iter().map(|(k, _)| k).collect()
    }

    /// An auto-approving policy for port 22 (max PT3H) and 3389 (max PT1H) from loopback.
    pub async fn auto_policy(&self) {
        let (status, body) = self.put_policy("demo-vm", &policy(json!({"mode": "auto"}))).await;
        assert_eq!(status, 201, "{body}");
        self.local.emulator.clear_calls();
    }

    /// A policy that needs `required` approvals from group `ops`.
    pub async fn manual_policy(&self, required: u32) {
        let (status, body) = self
            .put_policy("demo-vm", &policy(json!({"mode": "manual", "approvers": ["group:ops"], "required": required})))
            .await;
        assert_eq!(status, 201, "{body}");
        self.local.emulator.clear_calls();
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- guest and host log ----\n{}", self.local.host.guest_logs());
            eprintln!("---- ARM calls ----\n{}", self.arm_calls().join("\n"));
            eprintln!("---- key-value store ----");
            for (key, value) in self.local.host.dump_store() {
                eprintln!("{key} = {}", value.chars().take(400).collect::<String>());
            }
        }
    }
}

pub fn policy(approval: Value) -> Value {
    json!({
        "vm": DEMO_VM,
        "nsg": DEMO_NSG,
        "private_ip": "10.0.0.4",
        "ports": [
            {"port": 22, "protocol": "tcp", "max_duration": "PT3H", "allowed_sources": ["127.0.0.0/8", "203.0.113.0/24"]},
            {"port": 3389, "protocol": "tcp", "max_duration": "PT1H", "allowed_sources": ["127.0.0.0/8"]},
        ],
        "approval": approval,
    })
}

/// A request for port 22 from the caller's address (loopback in tests).
pub fn ssh(duration: &str) -> Value {
    json!({"policy": "demo-vm", "ports": [22], "duration": duration, "justification": "INC-1234"})
}

pub fn id(body: &Value) -> String {
    body["id"].as_str().unwrap_or_else(|| panic!("no id in {body}")).to_owned()
}
