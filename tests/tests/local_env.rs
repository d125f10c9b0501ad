//! The local runner (the README's first command) honours `SPIN_VARIABLE_*` over its demo
//! defaults, as Spin does, so someone trying their own API keys locally gets them. A binary of
//! its own: it sets the process's environment.

use portcullis_host::local::{self, LocalOptions};
use sha2::{Digest, Sha256};

#[tokio::test]
async fn spin_variables_in_the_environment_win_over_the_demo_defaults() {
    let mine = "my-own-admin-key";
    let keys = serde_json::json!([{"sha256": hex::encode(Sha256::digest(mine)), "principal": "me", "groups": [], "roles": ["admin"]}]);
    // SAFETY: set before anything else in this process reads the environment or starts a thread.
    unsafe { std::env::set_var("SPIN_VARIABLE_API_KEYS", keys.to_string()) };
    assert!(local::from_environment("api_keys"));
    let state = tempfile::tempdir().unwrap();
    let service = local::start(LocalOptions::ephemeral(state.path())).await.unwrap();
    let client = reqwest::Client::new();
    let status = |key: &'static str| {
        let request = client.get(format!("{}/api/policies", service.host.url())).bearer_auth(key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(mine).await, 200, "the key from the environment works");
    assert_eq!(status("demo-admin").await, 401, "the demo keys are off");
}
