//! OIDC bearer tokens through the components: real RS256/ES256 tokens from the emulator's
//! issuer, and every way a token can be wrong.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::support::*;

async fn who_am_i(world: &World, token: &str) -> (u16, Value) {
    world.request(token, &ssh("PT1H")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_and_es256_tokens_name_the_caller_with_their_groups_and_roles() {
    let world = World::start().await;
    world.manual_policy(1).await;
    let alice = world.token("alice@example.com", &["devs"], &["requester"]);
    let (status, request) = who_am_i(&world, &alice).await;
    assert_eq!((status, request["requester"].as_str()), (201, Some("alice@example.com")), "{request}");

    let bob = world.local.emulator.mint("ec-1", &world.claims("bob@example.com", &["ops"], &["approver"]));
    let (status, approved) = world.decide(&id(&request), "approve", &bob).await;
    assert_eq!((status, approved["state"].as_str()), (200, Some("active")), "{approved}");
    assert_eq!(approved["approvals"][0]["by"], "bob@example.com");
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_early_foreign_and_tampered_tokens_are_refused() {
    let world = World::start().await;
    world.auto_policy().await;
    let now = world.local.host.clock().now().timestamp();
    let base = world.claims("alice@example.com", &["devs"], &["requester"]);
    let with = |patch: Value| {
        let mut claims = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        world.local.emulator.mint("rsa-1", &claims)
    };
    let cases = [
        ("expired", with(json!({"exp": now - 120})), "expired"),
        ("not valid yet", with(json!({"nbf": now + 600})), "not valid yet"),
        ("wrong audience", with(json!({"aud": "api://someone-else"})), "another audience"),
        ("wrong issuer", with(json!({"iss": "https://evil.example/v2.0"})), "another issuer"),
        ("no principal claim", with(json!({"preferred_username": null})), "preferred_username"),
    ];
    for (case, token, reason) in cases {
        let (status, body) = who_am_i(&world, &token).await;
        assert_eq!(status, 401, "{case}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{case}: {body}");
    }
    // Within the 60 s skew an expired token still passes.
    let (status, _) = who_am_i(&world, &with(json!({"exp": now - 30}))).await;
    assert_eq!(status, 201);

    // Tampering with the payload breaks the signature.
    let good = world.token("alice@example.com", &["devs"], &["requester"]);
    let parts: Vec<&str> = good.split('.').collect();
    let mut payload: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["preferred_username"] = json!("root@example.com");
    let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(payload.to_string()), parts[2]);
    let (status, body) = who_am_i(&world, &forged).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("signature"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn algorithm_tricks_are_refused() {
    let world = World::start().await;
    world.auto_policy().await;
    let claims = world.claims("alice@example.com", &["devs"], &["requester"]);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());

    let none = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#));
    // HS256 "signed" with the RSA key's public modulus, the classic confusion attack.
    let jwks: Value =
        reqwest::get(format!("{}/oidc/keys", world.local.emulator.url())).await.unwrap().json().await.unwrap();
    let modulus = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == "rsa-1").unwrap()["n"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let confused =
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(modulus.as_bytes())).unwrap();
    // ES256 claimed over the RSA key.
    let mismatched = format!(
        "{}.{payload}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","typ":"JWT","kid":"rsa-1"}"#),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    );
    // No kid while the issuer publishes two keys.
    let anonymous = world.local.emulator.mint_without_kid("rsa-1", &claims);

    for (case, token) in [
        ("alg none", none),
        ("HS256 with an RSA key", confused),
        ("ES256 on an RSA key", mismatched),
        ("no kid", anonymous),
    ] {
        let (status, body) = who_am_i(&world, &token).await;
        assert_eq!(status, 401, "{case}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_key_is_fetched_at_most_once_a_minute() {
    let world = World::start().await;
    world.auto_policy().await;
    let claims = world.claims("alice@example.com", &["devs"], &["requester"]);
    assert_eq!(who_am_i(&world, &world.local.emulator.mint("rsa-1", &claims)).await.0, 201);
    let fetches = || world.local.emulator.calls().iter().filter(|c| c.path == "/oidc/keys").count();
    assert_eq!(fetches(), 1);

    // The issuer rotates to rsa-2; the cached key set does not know it yet and is fresh.
    world.local.emulator.publish_key("rsa-2");
    let rotated = world.local.emulator.mint("rsa-2", &claims);
    assert_eq!(who_am_i(&world, &rotated).await.0, 401);
    assert_eq!(who_am_i(&world, &rotated).await.0, 401);
    assert_eq!(fetches(), 1, "an unknown kid must not refetch more than once a minute");

    world.advance_minutes(1);
    world.local.host.clock().advance(chrono::TimeDelta::seconds(1));
    let rotated = world.local.emulator.mint("rsa-2", &world.claims("alice@example.com", &["devs"], &["requester"]));
    assert_eq!(who_am_i(&world, &rotated).await.0, 201);
    assert_eq!(fetches(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_principal_can_come_from_the_email_claim_and_api_keys_still_work() {
    let world = World::with_variables(&[("oidc_principal_claim", "email")]).await;
    world.auto_policy().await;
    let (status, request) = who_am_i(&world, &world.token("alice@example.com", &["devs"], &["requester"])).await;
    assert_eq!((status, request["requester"].as_str()), (201, Some("alice.mail@example.com")));
    assert_eq!(world.request(ALICE, &ssh("PT1H")).await.0, 201);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_object_id_as_principal_a_renamed_user_stays_one_person_and_a_reassigned_name_another() {
    let world = World::with_variables(&[("oidc_principal_claim", "oid")]).await;
    world.manual_policy(1).await;
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const ALICE_OID: &str = "4a3b2c1d-0000-4000-8000-00000000a11c";
    let token = |oid: &str, username: &str, roles: &[&str]| {
        let mut claims = world.claims(username, &["devs", "ops"], roles);
        claims["oid"] = json!(oid);
        claims["tid"] = json!(TENANT);
        claims["name"] = json!(format!("{username} (display)"));
        world.local.emulator.mint("rsa-1", &claims)
    };
    let (status, request) = who_am_i(&world, &token(ALICE_OID, "alice@example.com", &["requester"])).await;
    let alice = format!("{ALICE_OID}@{TENANT}");
    assert_eq!((status, request["requester"].as_str()), (201, Some(alice.as_str())), "{request}");
    assert_eq!(request["requester_name"], "alice@example.com (display)");
    let created = world.audit(&format!("request={}&action=request.created", id(&request))).await;
    assert_eq!(
        (created[0]["actor"].as_str(), created[0]["actor_name"].as_str()),
        (Some(alice.as_str()), Some("alice@example.com (display)"))
    );

    // Alice, renamed, is still Alice: she cannot approve her own request.
    let renamed = token(ALICE_OID, "alice.new@example.com", &["approver"]);
    let (status, answer) = world.decide(&id(&request), "approve", &renamed).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (403, Some("self_approval")), "{answer}");
    // Someone else later given the name alice@example.com is someone else: her request is not
    // even visible to them.
    let reassigned = token("9f9f9f9f-0000-4000-8000-000000000b0b", "alice@example.com", &["requester"]);
    let cancel = format!("/api/requests/{}/cancel", id(&request));
    let (status, answer) = world.call("POST", &cancel, Some(&reassigned), None).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("request_not_found")), "{answer}");
    assert_eq!(world.get_request(&id(&request)).await["state"], "pending");

    let mut no_tenant = world.claims("carol@example.com", &["devs"], &["requester"]);
    no_tenant["oid"] = json!(ALICE_OID);
    let (status, answer) = who_am_i(&world, &world.local.emulator.mint("rsa-1", &no_tenant)).await;
    assert_eq!(status, 401, "the object id alone is unique only within a tenant: {answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_naming_an_api_keys_principal_is_refused() {
    let world = World::start().await;
    world.auto_policy().await;
    // `alice` is the demo API key's principal; a token whose username is `alice` is not her.
    let (status, answer) = who_am_i(&world, &world.token("alice", &["devs"], &["requester"])).await;
    assert_eq!(status, 401, "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("API key"), "{answer}");
    assert_eq!(world.request(ALICE, &ssh("PT1H")).await.0, 201, "the key itself still works");
}
